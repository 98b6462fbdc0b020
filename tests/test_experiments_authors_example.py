"""``reproduce authors-example`` (experiments/authors_example.py) at a tiny width (from the suite's
one ``reproduce all`` run): both published configurations, a large one-step cut, and predictions
that agree with an independent route through the NTK."""

from __future__ import annotations

import pytest
import torch

import natural_tangents as nat
from natural_tangents.experiments import Settings
from natural_tangents.experiments import authors_example as ae

TINY = Settings(quick=True, progress=False, max_width=128)  # what the suite's reproduce run uses


@pytest.fixture(scope="module")
def result(reproduced):
    return reproduced.results["authors-example"], reproduced.out


def ours(rows, config):
    return [r for r in rows if r["source"] == "ours" and r["configuration"] == config]


def test_both_configurations_with_several_seeds_and_their_numbers(result):
    r, out = result
    rows = r["rows"]
    for config in ("analytic", "empirical"):
        mine = ours(rows, config)
        assert {x["step"] for x in mine} == {0, 1, 2}
        assert len({x["seed"] for x in mine}) == ae.SEEDS_QUICK >= 3
        assert all(x["width"] == 128 for x in mine)
        theirs = [x for x in rows if x["source"].startswith("authors") and x["configuration"] == config]
        assert [x["train_loss"] for x in theirs] == list(ae.PUBLISHED[config].train_loss)
    # the two configurations train different networks on the same data draws
    a0 = [x["train_loss"] for x in ours(rows, "analytic") if x["step"] == 0]
    b0 = [x["train_loss"] for x in ours(rows, "empirical") if x["step"] == 0]
    assert a0 != b0
    assert ae.PUBLISHED["analytic"].cut == pytest.approx(660.2, abs=0.1)
    assert ae.PUBLISHED["empirical"].cut == pytest.approx(627.6, abs=0.1)
    # the report table: their value in the second column, one row per quantity and configuration
    papers = [c["paper"] for c in r["checks"]]
    assert any("0.000203484" in c for c in papers) and any("0.00467353" in c for c in papers)
    assert "660×" in r["summary"] and "628×" in r["summary"]
    for ext in ("png", "csv"):
        assert (out / f"authors-example.{ext}").stat().st_size > 0


def test_one_ngd_step_cuts_the_training_loss_by_a_large_factor(result):
    """At M = 128 the residual of the first step is still ~100× that of M = 4096; the cut is
    large for every seed, the second step nearly finishes the job, and theory says 0 after one."""
    rows = result[0]["rows"]
    for config in ("analytic", "empirical"):
        mine = ours(rows, config)
        for seed in {x["seed"] for x in mine}:
            loss = {x["step"]: x for x in mine if x["seed"] == seed}
            assert loss[0]["train_loss"] / loss[1]["train_loss"] > 3
            assert loss[2]["train_loss"] < 1e-2 * loss[0]["train_loss"]
            assert loss[1]["train_loss_theory"] < 1e-20 * loss[0]["train_loss"]
            assert loss[1]["train_accuracy"] == 1.0
    cut_checks = [c for c in result[0]["checks"] if "cut" in c["quantity"]]
    assert len(cut_checks) == 2


def _first_step_test_loss(kernel_test, kernel_train, f0t, y, f0, yt) -> float:
    """(S.26) at t = 1, η = 1, written with the NTK: f_1(x′) = f_0(x′) + Θ(x′, x) Θ(x, x)^{-1} (y − f_0)."""
    f1t = f0t + kernel_test @ torch.linalg.solve(kernel_train, y - f0)
    return float(0.5 * ((f1t - yt) ** 2).sum(-1).mean())


def test_predictions_match_the_ntk_route(result):
    """Exact NGD's Θ̄(x′, x) = Θ(x′, x) Θ(x, x)^{-1}: the analytic prediction from nat.theory.ntk
    and the empirical one from nat.empirical_ntk of the same initial network."""
    rows = result[0]["rows"]
    seed = TINY.seed
    ds = nat.data.mnist_binary((0, 1), 100, 50, seed=seed, target_scale=0.5, standardize=True)
    x, y, xt, yt = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    kw = {"depth": 3, "activation": "relu", "sigma_w2": 2.0, "sigma_b2": 0.0}
    for config, net_seed in (("analytic", seed), ("empirical", seed + ae.SECOND_NETWORK_OFFSET)):
        net = TINY.network([784, 128, 128, 1], "relu", 2.0, 0.0, seed=net_seed)
        with torch.no_grad():
            f0, f0t = net(x).double(), net(xt).double()
        if config == "analytic":
            k, kt = nat.theory.ntk(x, **kw), nat.theory.ntk(xt, x, **kw)
        else:
            k, kt = nat.empirical_ntk(net, x, dtype=torch.float64), nat.empirical_ntk(net, xt, x, dtype=torch.float64)
        expected = _first_step_test_loss(kt, k, f0t, y, f0, yt)
        row = next(r for r in ours(rows, config) if r["seed"] == net_seed and r["step"] == 1)
        assert row["test_loss_theory"] == pytest.approx(expected, rel=1e-6)
        first = next(r for r in ours(rows, config) if r["seed"] == net_seed and r["step"] == 0)
        assert first["train_loss"] == pytest.approx(float(0.5 * ((f0 - y) ** 2).sum(-1).mean()), rel=1e-9)
