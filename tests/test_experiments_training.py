"""The training experiments (convergence, unitwise, learning-rate, generalization, cross-entropy) at
width 128: their headline numbers, from the suite's one ``reproduce all`` run.

At this width the finite-width effects are large: the assertions are the ones that hold at any width
(α counts, the shape of the one-step loss curve, one function-space path for cross-entropy) rather
than the wide-network numbers of the report.
"""

from __future__ import annotations

import numpy as np
import pytest


def test_convergence_ngd_outruns_gd(reproduced):
    rows = reproduced.results["convergence"]["rows"]
    last = max(r["step"] for r in rows)
    final = {r["method"]: r["train_loss"] for r in rows if r["step"] == last}
    for name in ("exact", "block_diagonal", "unitwise"):
        assert final[name] < 1e-2 * final["gd"]


def test_unitwise_alpha_matches_the_analytic_gamma(reproduced):
    """The active units per sample (S.137) follow γ_l (S.141); α̂ = tr Θ̄ / N is at most that count,
    and equal to it for tanh (every unit active, inputs of full rank). At width 128 some ReLU units
    are inactive on all 100 samples, so the next layer's inputs have rank below N and α̂ is smaller."""
    labels = list(dict.fromkeys(r["activation"] for r in reproduced.rows("unitwise")))
    assert sorted(labels) == ["ReLU", "shifted ReLU (s = 1)", "tanh"]
    assert reproduced.check("unitwise", "tanh: α/M")["experiment"] == pytest.approx(2.0, abs=1e-9)
    for label in labels:
        c = reproduced.check("unitwise", f"{label}: α/M")
        (row,) = reproduced.rows("unitwise", activation=label, step=0)
        width = (row["alpha_theory"] - 1) / c["theory"]  # α (with the output unit) = M·(α/M) + 1
        active = (row["active_units"] - 1) / width
        assert active == pytest.approx(c["theory"], rel=0.05)
        assert c["experiment"] <= active + 1e-12


def test_learning_rate_curve_follows_one_minus_eta_alpha_squared_at_small_rates(reproduced):
    rows = reproduced.rows("learning-rate", method="exact")
    for r in rows:
        assert r["loss_ratio_theory"] == pytest.approx((1 - r["eta_alpha"]) ** 2, abs=1e-12)
        if r["eta_alpha"] <= 0.11:  # the linear regime: (1 − ηα)² to a few per cent of L_0
            assert r["loss_ratio"] == pytest.approx(r["loss_ratio_theory"], abs=0.05)
    ratios = np.array([r["loss_ratio"] for r in rows])
    assert ratios.min() < 0.6 and ratios[-1] > ratios.min()


def test_generalization_exact_ngd_matches_the_analytic_prediction(reproduced):
    check = reproduced.check("generalization", "Exact: test loss")
    # Not tighter: at width 128 one network's test loss scatters around the infinite-width
    # prediction by more than this. Over seeds 0–5 the relative deviation was −0.12 (seed 0, this
    # run), −0.25, +0.11, −0.14, −0.37, −0.17 (mean −0.16, standard deviation 0.16).
    assert check["experiment"] == pytest.approx(check["theory"], rel=0.3)


def test_cross_entropy_exact_and_layerwise_follow_one_path(reproduced):
    gap = reproduced.check("cross-entropy", "max |σ_exact − σ_block diagonal|")
    assert gap["experiment"] < 0.5  # at width 128; 0.028 at 1024 and smaller at 4096 (report)
    for method in ("exact", "block_diagonal"):
        loss = [r["train_loss"] for r in reproduced.rows("cross-entropy", method=method)]
        assert loss[-1] < 0.1 * loss[0]
