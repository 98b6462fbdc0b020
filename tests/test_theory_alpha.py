"""γ (S.140) and the theoretical α of every Fisher, against the paper's numbers (Figures S.1 and S.2),
independent formulas, and the mean eigenvalue of Θ̄ measured on finite networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import natural_tangents as nat
from natural_tangents import activations as A
from natural_tangents import fisher, theory

F64 = torch.float64


# --------------------------------------------------------------------------------- gamma
@pytest.mark.parametrize("q", [0.05, 0.5, 2.0])
def test_gamma_values(q):
    assert theory.gamma("tanh", q) == 1.0
    assert theory.gamma("erf", q) == 1.0
    assert theory.gamma("relu", q) == 0.5
    for s in (1.0, -0.3):  # P(u > −s) (S.156)
        assert theory.gamma(A.ShiftedReLU(s), q) == pytest.approx(stats.norm.cdf(s / math.sqrt(q)), abs=1e-14)
    # GELU: φ′ has one isolated zero, so γ = 1 by the piecewise scan
    assert theory.gamma("gelu", q) == 1.0


def test_gamma_of_elementwise_activations():
    # hard tanh with declared kinks: φ′ ≠ 0 exactly on (−1, 1)
    hard = A.Elementwise(lambda u: torch.clamp(u, -1.0, 1.0), label="hardtanh", kink_points=(-1.0, 1.0))
    assert theory.gamma(hard, 0.7) == pytest.approx(math.erf(1 / math.sqrt(2 * 0.7)), abs=1e-14)
    # an undeclared kink: the dense fallback still finds P(u > 0) = 1/2
    assert theory.gamma(A.Elementwise(torch.relu, label="relu_fn"), 1.3) == pytest.approx(0.5, abs=1e-5)
    out = theory.gamma("relu", torch.tensor([0.5, 1.0]))
    assert torch.equal(out, torch.tensor([0.5, 0.5], dtype=F64))
    with pytest.raises(ValueError, match="q"):
        theory.gamma("tanh", 0.0)


# ----------------------------------------------------------------------- unit-wise alpha
@pytest.mark.parametrize(
    "act, m0, expected",
    [
        ("tanh", 784, 2.0),
        ("relu", 784, 1.0),
        (A.ShiftedReLU(1.0), 784, 1.723960),  # the paper's Figure S.1 (MNIST)
        (A.ShiftedReLU(1.0), 10, 1.666365),  # the paper's Figure S.2
    ],
)
def test_unitwise_alpha_per_width_matches_the_paper(act, m0, expected):
    m = 4096
    widths = [m0, m, m, 1]
    opts = {"widths": widths, "activation": act, "sigma_w2": 2.0, "sigma_b2": 0.5}
    a = theory.alpha(fisher.Unitwise(), include_output=False, **opts)
    assert a / m == pytest.approx(expected, abs=1e-5)
    assert theory.alpha(fisher.Unitwise(), **opts) == pytest.approx(a + 1, abs=1e-9)  # + C by default


def test_unitwise_forward_variances_follow_the_recursion():
    q = theory.variances(3, activation="relu", sigma_w2=2.0, sigma_b2=0.5, q0=1 / 784)
    q1 = 2 / 784 + 0.5  # (S.178): q_1 = σ_w² q_0 + σ_b², q_l = σ_w²/2 q_{l−1} + σ_b²
    assert torch.allclose(q, torch.tensor([q1, q1 + 0.5, q1 + 1.0], dtype=F64), atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_unitwise_alpha_matches_finite_width_mean_eigenvalue(act, unit_inputs):
    """At ρ = 0 the finite-width Θ̄(x, x) of unit-wise NGD has mean eigenvalue Σ_l γ̂_l M_l + C;
    for tanh γ̂ = 1 exactly, for ReLU the active fraction fluctuates by O(1/√M)."""
    n, m0, m = 16, 40, 512
    x = unit_inputs(n, m0, 0)
    widths = [m0, m, m, 1]
    a = theory.alpha(fisher.Unitwise(), widths=widths, activation=act, sigma_w2=2.0, sigma_b2=0.5)
    for seed in range(2):
        net = nat.MLP(widths, activation=act, sigma_w2=2.0, sigma_b2=0.5, seed=seed, dtype=F64)
        measured = fisher.Unitwise().isotropy(net, x).alpha
        tol = 1e-8 if act == "tanh" else 4.0 / math.sqrt(m)
        assert measured == pytest.approx(a, rel=tol)


# ---------------------------------------------------------------------- layer-wise alpha
def test_block_tridiagonal_alpha_for_depths_1_to_12():
    # 1ᵀΣ⁻¹1: s for L = 3s, s + 1 for L = 3s + 1 (S.93)–(S.94); Σ singular for L = 3s + 2
    expected = [1, None, 1, 2, None, 2, 3, None, 3, 4, None, 4]
    for depth, value in enumerate(expected, start=1):
        widths = [8] + [16] * (depth - 1) + [1]
        if value is None:
            with pytest.raises(ValueError, match=r"singular.*damping > 0"):
                theory.alpha(fisher.BlockTriDiagonal(), widths=widths)
        else:
            assert theory.alpha(fisher.BlockTriDiagonal(), widths=widths) == pytest.approx(value, abs=1e-10)


def test_layerwise_alpha_exact_and_block_diagonal():
    for depth in (1, 3, 7):
        widths = [5] * depth + [1]
        assert theory.alpha(fisher.BlockDiagonal(), widths=widths) == pytest.approx(depth, abs=1e-12)
        assert theory.alpha(fisher.Exact(), widths=widths) == 1.0
    sigma = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]])
    expected = float(np.ones(3) @ np.linalg.solve(sigma, np.ones(3)))
    got = theory.alpha(fisher.Layerwise(sigma=sigma), widths=[4, 8, 8, 1])
    assert got == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------- K-FAC alpha
def test_kfac_alpha_wide_input():
    widths = [100, 2048, 2048, 1]
    assert theory.alpha(fisher.KFAC(), widths=widths, n_train=40) == 120.0  # N L (S.107)
    assert theory.alpha(fisher.KFAC(output_factor="fisher"), widths=widths, n_train=40) == 81.0
    # the bias column widens the input: M_0 = 39 + 1 >= N = 40 is still the wide case
    assert theory.alpha(fisher.KFAC(), widths=[39, 64, 64, 1], n_train=40, sigma_b2=0.5) == 120.0


def test_kfac_alpha_narrow_input_with_and_without_forster():
    widths = [40, 1024, 1024, 1]
    with pytest.warns(RuntimeWarning, match=r"not isotropic.*nat\.data\.forster"):
        raw = theory.alpha(fisher.KFAC(), widths=widths, n_train=80)
    assert raw == 80 * 2 + 40  # mean eigenvalue N(L−1) + M_0, from the trace of (S.109)
    assert theory.alpha(fisher.KFAC(), widths=widths, n_train=80, forster=True) == 200.0  # (S.111)
    assert theory.alpha(fisher.KFAC(output_factor="fisher"), widths=widths, n_train=80, forster=True) == 121.0


@pytest.mark.slow
@pytest.mark.parametrize("forster", [False, True])
def test_kfac_alpha_matches_finite_width_mean_eigenvalue(forster, unit_inputs):
    """M_0 = 40 < N = 80, ReLU, L = 3, no bias: the measured mean eigenvalue of K-FAC's Θ̄ is
    N(L−1) + M_0 with or without Forster (the trace is M_0 either way); only the spread differs."""
    n, m0, m = 80, 40, 256
    x = unit_inputs(n, m0, 1)
    if forster:
        x = nat.data.forster(x)
    net = nat.MLP([m0, m, m, 1], activation="relu", sigma_w2=2.0, sigma_b2=0.0, seed=0, dtype=F64)
    if forster:
        iso = fisher.KFAC().isotropy(net, x)
        a = theory.alpha(fisher.KFAC(), widths=[m0, m, m, 1], n_train=n, forster=True)
        assert iso.condition_number == pytest.approx(1.0, abs=1e-6)
    else:
        with pytest.warns(RuntimeWarning, match="isotropic"):
            iso = fisher.KFAC().isotropy(net, x)
        with pytest.warns(RuntimeWarning, match="forster"):
            a = theory.alpha(fisher.KFAC(), widths=[m0, m, m, 1], n_train=n)
        assert iso.condition_number > 1.05
    assert iso.alpha == pytest.approx(a, rel=1e-9)


@pytest.mark.parametrize("m0", [32, 16])
def test_kfac_block_bias_alpha(m0, unit_inputs):
    """bias='block': hidden biases in their own blocks (S.123) add N each; the output bias stays in
    the augmented factor. α = N (2L − 1) for M_0 ≥ N and N (2L − 2) + M_0 with Forster inputs."""
    n, m = 24, 256
    x = unit_inputs(n, m0, 2)
    if m0 < n:
        x = nat.data.forster(x)
    net = nat.MLP([m0, m, m, 1], activation="tanh", sigma_w2=2.0, sigma_b2=0.5, seed=0, dtype=F64)
    measured = fisher.KFAC(bias="block").isotropy(net, x)
    a = theory.alpha(fisher.KFAC(bias="block"), widths=[m0, m, m, 1], n_train=n, sigma_b2=0.5, forster=m0 < n)
    assert a == (n * 5 if m0 >= n else n * 4 + m0)
    assert measured.alpha == pytest.approx(a, rel=1e-9)
    assert measured.condition_number == pytest.approx(1.0, abs=1e-6)


def test_kfac_augmented_bias_with_narrow_input_warns_towards_block():
    with pytest.warns(RuntimeWarning, match="bias='block'"):
        a = theory.alpha(fisher.KFAC(), widths=[16, 64, 64, 1], n_train=24, sigma_b2=0.5)
    assert a == 24 * 2 + 17  # the bias column makes the input M_0 + 1 wide


# -------------------------------------------------------------------------------- errors
def test_alpha_errors_name_the_argument():
    with pytest.raises(ValueError, match="n_train"):
        theory.alpha(fisher.KFAC(), widths=[10, 20, 1])
    with pytest.raises(ValueError, match="activation, sigma_w2"):
        theory.alpha(fisher.Unitwise(), widths=[10, 20, 1])
    with pytest.raises(ValueError, match="fisher"):
        theory.alpha(object(), widths=[10, 20, 1])
    with pytest.raises(ValueError, match="widths"):
        theory.alpha(fisher.Exact(), widths=[10])
    with pytest.raises(ValueError, match="hidden widths"):
        theory.alpha(fisher.KFAC(), widths=[100, 20, 1], n_train=40)
