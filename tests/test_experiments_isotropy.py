"""The isotropy experiments (condition, alpha-shift, tridiagonal, kfac-forster): their headline
numbers from the suite's one ``reproduce all`` run (widths capped at 128; condition sweeps its quick
widths), and the premises of their theory lines checked on their own."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import natural_tangents as nat
from natural_tangents import theory
from natural_tangents.experiments import alpha_shift, condition, kfac_forster


# ----------------------------------------------------------------------------------------- condition
def test_condition_isotropic_fishers_and_unitwise_spread(reproduced):
    n = condition.QUICK.n
    for name in ("exact", "block_diagonal", "block_tridiagonal", "kfac"):
        for row in reproduced.rows("condition", method=name):
            if name == "kfac" and row["min_rank_backward"] < n:
                continue  # K-FAC's Θ̄ = α I needs backward signals of rank N (S.105)
            assert row["condition_number"] == pytest.approx(1.0, abs=1e-6), (name, row["width"])
            if row["width"] >= 2 * n:  # the ρ = 1e-12 bias is the size the M → ∞ theory at that ρ predicts
                assert row["cond_minus_1"] < 20 * row["cond_minus_1_theory"] + 1e-9, (name, row["width"])
    unit = sorted(reproduced.rows("condition", method="unitwise"), key=lambda r: r["width"])
    assert unit[0]["cond_minus_1"] > unit[-1]["cond_minus_1"] > 0  # decreasing with width
    assert unit[0]["cond_minus_1_theory"] > unit[-1]["cond_minus_1_theory"]
    # The binomial-spread theory is the expectation over networks; one network's cond(Θ̄) − 1 scatters
    # around it. Measured over seeds 0–5 (this run's settings, 24 networks): the ratio to the theory
    # has standard deviation 0.12 (largest deviation 0.28, at M = 128), its mean over the 4 widths
    # 0.035 (largest deviation 0.09). The bounds are about 3× those spreads.
    ratios = [row["cond_minus_1"] / row["cond_minus_1_theory"] for row in unit]
    for row, ratio in zip(unit, ratios):
        assert ratio == pytest.approx(1.0, abs=0.35), row["width"]
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.12)


def test_unitwise_diagonal_counts_active_units():
    """The premise of the spread theory (S.137): Θ̄ = diag(C + number of active hidden units)."""
    x = nat.data.gaussian(12, 30, seed=1)
    net = nat.MLP([30, 64, 64, 1], "relu", sigma_w2=2.0, sigma_b2=0.5, seed=1, dtype=torch.float64)
    fx = net.signals(x)
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
def test_alpha_shift_matches_theory(reproduced):
    (s1,) = reproduced.rows("alpha-shift", s=1.0)
    assert s1["alpha_over_M_theory"] == pytest.approx(alpha_shift.REFERENCE_S1, abs=2e-6)
    assert s1["alpha_over_M"] == pytest.approx(s1["alpha_over_M_theory"], rel=0.02)
    (s0,) = reproduced.rows("alpha-shift", s=0.0)
    assert s0["alpha_over_M_theory"] == pytest.approx(1.0, abs=1e-12)
    assert s0["alpha_over_M"] == pytest.approx(1.0, rel=0.03)
    for row in reproduced.rows("alpha-shift"):  # per layer, the fraction of active units is γ_l
        for l in (1, 2):
            gamma = row[f"gamma{l}_theory"]
            spread = math.sqrt(gamma * (1 - gamma) / row["width"])  # binomial, one sample's M units
            assert row[f"active_fraction_layer{l}"] == pytest.approx(gamma, abs=3 * spread + 1e-3), (row["s"], l)


# --------------------------------------------------------------------------------------- tridiagonal
def test_tridiagonal_singular_depths_and_alpha(reproduced):
    main = reproduced.rows("tridiagonal", sweep="depth")
    depths = sorted({r["depth"] for r in main})
    singular = sorted({r["depth"] for r in main if r["singular_sigma"]})
    assert singular == [d for d in depths if d % 3 == 2]
    for depth in (d for d in depths if d % 3 != 2):
        alpha = depth // 3 + (depth % 3 == 1)  # s for L = 3s, s + 1 for L = 3s + 1 (S.93)–(S.94)
        sigma = nat.fisher.tridiagonal_sigma(depth)
        ones = torch.ones(depth, dtype=torch.float64)
        assert float(ones @ torch.linalg.solve(sigma, ones)) == pytest.approx(alpha, abs=1e-12)
        (row,) = [r for r in main if r["depth"] == depth and r["fisher"] == "block_tridiagonal"]
        assert row["alpha_theory"] == pytest.approx(alpha, abs=1e-12)
        assert row["alpha_hat"] == pytest.approx(alpha, abs=1e-8)
        assert row["condition_number"] == pytest.approx(1.0, abs=1e-6)
    # at the singular depths a small damping approaches the pseudo-inverse value 1ᵀΣ⁺1 = s + 1
    for depth in singular:
        (row,) = [
            r for r in main if r["depth"] == depth and r["fisher"] == "block_tridiagonal" and r["damping"] == 1e-9
        ]
        assert row["alpha_sigma_pinv"] == pytest.approx((depth + 1) // 3, abs=1e-9)
        assert row["alpha_hat"] == pytest.approx(row["alpha_sigma_pinv"], rel=1e-3)
    assert ", ".join(map(str, singular)) in reproduced.check("tridiagonal", "depths with singular Σ")["experiment"]
    assert reproduced.rows("tridiagonal", sweep="width")  # the width sweep ran


def test_tridiagonal_library_refuses_zero_damping_at_singular_depth():
    with pytest.raises(ValueError, match="singular"):
        theory.alpha(nat.fisher.BlockTriDiagonal(), widths=[3, 4, 4, 4, 4, 1])


# -------------------------------------------------------------------------------------- kfac-forster
def test_kfac_forster_restores_isotropy(reproduced):
    (raw,) = reproduced.rows("kfac-forster", inputs="raw", kind="summary")
    (fst,) = reproduced.rows("kfac-forster", inputs="forster", kind="summary")
    n, m0 = kfac_forster.QUICK.n, kfac_forster.QUICK.m0
    assert raw["condition_number"] > 1.05
    assert raw["condition_number"] == pytest.approx(raw["condition_number_theory"], rel=1e-6)
    assert fst["condition_number"] <= 1 + 1e-6
    assert fst["alpha_hat"] == pytest.approx(n * 2 + m0, rel=1e-8)  # N (L − 1) + M_0 (S.111)
    assert raw["runtime_warnings"] > 0 and "K-FAC" in raw["warning"]  # recorded, not swallowed
    assert fst["runtime_warnings"] == 0
    assert "RuntimeWarning" in reproduced.results["kfac-forster"]["summary"]
    ev = reproduced.rows("kfac-forster", inputs="raw", kind="eigenvalue")
    got = np.array([r["eigenvalue_over_N"] for r in ev])
    want = np.array([r["eigenvalue_over_N_theory"] for r in ev])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_kfac_forster_theory_matches_analytic_coefficient():
    """(S.109) as written in the experiment against the library's infinite-width K-FAC Θ̄."""
    x = nat.data.gaussian(30, 12, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ana = theory.coefficient(nat.fisher.KFAC(), None, x, depth=3, activation="relu", sigma_w2=2.0, sigma_b2=0.0)
    torch.testing.assert_close(ana, kfac_forster.theory_coefficient(x), rtol=1e-8, atol=1e-8)
