"""The experiments condition, alpha-shift, tridiagonal and kfac-forster at tiny sizes: their headline
numbers, the premises of their theory lines, and the files they write."""

import json
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import natural_tangents as nat
from natural_tangents import theory
from natural_tangents.experiments import alpha_shift, condition, kfac_forster, tridiagonal
from natural_tangents.experiments.common import Settings, write

SETTINGS = Settings(quick=True, progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """These are many small N × N eigendecompositions; one thread avoids MKL's oversubscription stalls
    when other processes share the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    plt.close("all")


def _written(result, tmp_path):
    write(result, tmp_path)
    for ext in ("png", "csv", "json"):
        path = tmp_path / f"{result.name}.{ext}"
        assert path.is_file() and path.stat().st_size > 0, path
    payload = json.loads((tmp_path / f"{result.name}.json").read_text())
    assert payload["name"] == result.name and payload["summary"] == result.summary
    assert len(payload["checks"]) == len(result.checks) and len(payload["rows"]) == len(result.rows)
    assert (tmp_path / f"{result.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _pick(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


# ----------------------------------------------------------------------------------------- condition
def test_condition_isotropic_fishers_and_unitwise_spread(tmp_path):
    sizes = condition.Sizes(widths=(256, 1024), n=40, draws=2000)
    result = condition.run(SETTINGS, sizes)
    assert result.name == "condition"
    for name in ("exact", "block_diagonal", "block_tridiagonal", "kfac"):
        for row in _pick(result.rows, method=name):
            assert row["condition_number"] == pytest.approx(1.0, abs=1e-6), (name, row["width"])
            # the ρ = 1e-12 bias is of the size the infinite-width theory at that ρ predicts
            assert row["cond_minus_1"] < 20 * row["cond_minus_1_theory"] + 1e-9
    unit = sorted(_pick(result.rows, method="unitwise"), key=lambda r: r["width"])
    assert unit[0]["cond_minus_1"] > unit[-1]["cond_minus_1"] > 0  # decreasing with width
    assert unit[0]["cond_minus_1_theory"] > unit[-1]["cond_minus_1_theory"]
    for row in unit:  # the binomial-spread theory is right to a factor ~1.5 for one network
        assert row["cond_minus_1"] == pytest.approx(row["cond_minus_1_theory"], rel=0.5)
    _written(result, tmp_path)


def test_unitwise_diagonal_counts_active_units():
    """The premise of the spread theory (S.137): Θ̄ = diag(C + number of active hidden units)."""
    x = nat.data.gaussian(12, 30, seed=1)
    net = nat.MLP([30, 64, 64, 1], "relu", sigma_w2=2.0, sigma_b2=0.5, seed=1, dtype=torch.float64)
    fx = net.factors(x)
    counts = 1 + sum((fx.backward[l][0] != 0).sum(1).double() for l in range(2))
    tb = nat.fisher.Unitwise().coefficient(net, x)  # ρ → 0: exact projectors
    torch.testing.assert_close(torch.diagonal(tb), counts, rtol=0, atol=1e-6)
    assert float((tb - torch.diag(torch.diagonal(tb))).abs().max()) < 1e-6
    # the experiment's ρ = 1e-12 moves the counts by far less than their spread across samples
    damped = nat.fisher.Unitwise(damping=1e-12).coefficient(net, x)
    assert float((torch.diagonal(damped) - counts).abs().max()) < 0.1 < float(counts.std())


def test_unitwise_spread_scales_as_inverse_sqrt_width():
    x = nat.data.gaussian(20, 50, seed=0)
    spread = condition.unitwise_spread(x, np.array([1e4, 4e4]), draws=4000, seed=0)
    assert spread[1, 0] / spread[1, 1] == pytest.approx(2.0, rel=0.02)


# --------------------------------------------------------------------------------------- alpha-shift
def test_alpha_shift_matches_theory(tmp_path):
    result = alpha_shift.run(SETTINGS, alpha_shift.Sizes(width=1024, shifts=(0.0, 1.0)))
    (s1,) = _pick(result.rows, s=1.0)
    assert s1["alpha_over_M_theory"] == pytest.approx(alpha_shift.REFERENCE_S1, abs=2e-6)
    assert s1["alpha_over_M"] == pytest.approx(s1["alpha_over_M_theory"], rel=0.02)
    (s0,) = _pick(result.rows, s=0.0)
    assert s0["alpha_over_M_theory"] == pytest.approx(1.0, abs=1e-12)
    assert s0["alpha_over_M"] == pytest.approx(1.0, rel=0.03)
    for row in result.rows:  # per layer, the fraction of active units is γ_l
        for l in (1, 2):
            assert row[f"active_fraction_layer{l}"] == pytest.approx(row[f"gamma{l}_theory"], abs=0.05)
    _written(result, tmp_path)


# --------------------------------------------------------------------------------------- tridiagonal
def test_tridiagonal_singular_depths_and_alpha(tmp_path):
    sizes = tridiagonal.Sizes(width=128, depths=tuple(range(1, 13)), n=20)
    result = tridiagonal.run(SETTINGS, sizes)
    main = _pick(result.rows, sweep="depth")
    singular = sorted({r["depth"] for r in main if r["singular_sigma"]})
    assert singular == [2, 5, 8, 11]
    expected = {1: 1, 3: 1, 4: 2, 6: 2, 7: 3, 9: 3, 10: 4, 12: 4}
    for depth, alpha in expected.items():
        sigma = nat.fisher.tridiagonal_sigma(depth)
        ones = torch.ones(depth, dtype=torch.float64)
        assert float(ones @ torch.linalg.solve(sigma, ones)) == pytest.approx(alpha, abs=1e-12)
        (row,) = _pick(main, depth=depth, fisher="block_tridiagonal")
        assert row["alpha_theory"] == pytest.approx(alpha, abs=1e-12)
        assert row["alpha_hat"] == pytest.approx(alpha, abs=1e-8)
        assert row["condition_number"] == pytest.approx(1.0, abs=1e-6)
    # at the singular depths a small damping approaches the pseudo-inverse value 1ᵀΣ⁺1 = s + 1
    for depth in singular:
        (row,) = _pick(main, depth=depth, fisher="block_tridiagonal", damping=1e-9)
        assert row["alpha_sigma_pinv"] == pytest.approx((depth + 1) // 3, abs=1e-9)
        assert row["alpha_hat"] == pytest.approx(row["alpha_sigma_pinv"], rel=1e-3)
    assert "2, 5, 8, 11" in result.checks[1].experiment
    _written(result, tmp_path)


def test_tridiagonal_library_refuses_zero_damping_at_singular_depth():
    with pytest.raises(ValueError, match="singular"):
        theory.alpha(nat.fisher.BlockTriDiagonal(), widths=[3, 4, 4, 4, 4, 1])


# -------------------------------------------------------------------------------------- kfac-forster
def test_kfac_forster_restores_isotropy(tmp_path):
    result = kfac_forster.run(SETTINGS, kfac_forster.Sizes(width=256, steps=1))
    (raw,) = _pick(result.rows, inputs="raw", kind="summary")
    (fst,) = _pick(result.rows, inputs="forster", kind="summary")
    assert raw["condition_number"] > 1.05
    assert raw["condition_number"] == pytest.approx(raw["condition_number_theory"], rel=1e-6)
    assert fst["condition_number"] <= 1 + 1e-6
    assert fst["alpha_hat"] == pytest.approx(80 * 2 + 40, rel=1e-8)
    assert raw["runtime_warnings"] > 0 and "K-FAC" in raw["warning"]  # recorded, not swallowed
    assert fst["runtime_warnings"] == 0
    assert "RuntimeWarning" in result.summary
    ev = _pick(result.rows, inputs="raw", kind="eigenvalue")
    got = np.array([r["eigenvalue_over_N"] for r in ev])
    want = np.array([r["eigenvalue_over_N_theory"] for r in ev])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    _written(result, tmp_path)


def test_kfac_forster_theory_matches_analytic_coefficient():
    """(S.109) as written in the experiment against the library's infinite-width K-FAC Θ̄."""
    x = nat.data.gaussian(30, 12, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ana = theory.coefficient(nat.fisher.KFAC(), None, x, depth=3, activation="relu", sigma_w2=2.0, sigma_b2=0.0)
    torch.testing.assert_close(ana, kfac_forster.theory_coefficient(x), rtol=1e-8, atol=1e-8)
