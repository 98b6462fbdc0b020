"""Condition 1 at finite width: Θ̄(x, x) = α I for each Fisher (fisher/*.py) with the paper's α (1, L,
1ᵀΣ⁻¹1, N L, and the unit-wise count of active units), ρ = 0."""

import math
import warnings

import pytest
import torch

import natural_tangents as nat

N, M0, M = 64, 128, 1024


def _inputs(n, m0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m0, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def relu3():
    return nat.MLP([M0, M, M, 1], activation="relu", dtype=torch.float64, seed=3)


@pytest.mark.parametrize(
    ("fisher", "alpha"),
    [
        (nat.fisher.Exact(), 1.0),
        (nat.fisher.BlockDiagonal(), 3.0),
        (nat.fisher.BlockTriDiagonal(), 1.0),
        (nat.fisher.KFAC(), N * 3.0),
    ],
)
def test_layer_fishers_are_isotropic_with_the_papers_alpha(relu3, fisher, alpha):
    iso = fisher.isotropy(relu3, _inputs(N, M0))
    assert iso.alpha == pytest.approx(alpha, rel=1e-9)
    assert iso.condition_number <= 1 + 1e-6
    assert iso.deviation <= 1e-6


def test_tridiagonal_at_depth_four_has_alpha_two():
    net = nat.MLP([M0, M, M, M, 1], activation="relu", dtype=torch.float64, seed=4)
    iso = nat.fisher.BlockTriDiagonal().isotropy(net, _inputs(N, M0))
    assert iso.alpha == pytest.approx(2.0, rel=1e-9)
    assert iso.condition_number <= 1 + 1e-6


def test_tridiagonal_at_depth_3s_plus_2_is_singular_without_damping():
    net = nat.MLP([8, 16, 16, 16, 16, 1], activation="relu", dtype=torch.float64)
    x = _inputs(6, 8)
    with pytest.raises(ValueError, match="damping > 0"):
        nat.fisher.BlockTriDiagonal().natural_gradient(net, x, torch.zeros(6, 1))
    step = nat.fisher.BlockTriDiagonal(damping=1e-3).natural_gradient(net, x, torch.ones(6, 1))
    assert all(torch.isfinite(s).all() for s in step)


def test_kfac_output_factor_one_gives_alpha_n_times_l_minus_one_plus_one(relu3):
    iso = nat.fisher.KFAC(output_factor="fisher").isotropy(relu3, _inputs(N, M0))
    assert iso.alpha == pytest.approx(N * 2 + 1, rel=1e-9)
    assert iso.condition_number <= 1 + 1e-6


def test_unitwise_alpha_counts_active_units(relu3):
    """Σ_{l<L} γ_l M_l + C with γ = 1/2 for ReLU (S.137); at ρ = 0 Θ̄ is diagonal, entry n counting the
    units active on x_n, so its spread is binomial: std √(Σ M_l / 4) about the mean."""
    x = _inputs(N, M0)
    tb = nat.fisher.Unitwise().coefficient(relu3, x)
    iso = nat.fisher.isotropy(tb)
    expected = 2 * M / 2 + 1
    assert iso.alpha == pytest.approx(expected, rel=0.02)
    assert float((tb - torch.diag(torch.diagonal(tb))).abs().max()) < 1e-8
    fx = relu3.signals(x)
    active = sum((fx.backward[l][0] != 0).sum(1) for l in range(2)) + 1
    assert torch.allclose(torch.diagonal(tb), active.to(tb.dtype), atol=1e-8)
    spread = 3.5 * math.sqrt(2 * M / 4) / expected
    assert iso.condition_number <= (1 + spread) / (1 - spread)


def test_unitwise_condition_number_at_width_2048():
    net = nat.MLP([M0, 2048, 2048, 1], activation="relu", dtype=torch.float64, seed=1)
    iso = nat.fisher.Unitwise().isotropy(net, _inputs(N, M0))
    assert iso.alpha == pytest.approx(2048 + 1, rel=0.02)
    assert iso.condition_number <= 1.1


def test_kfac_with_narrow_inputs_is_anisotropic_and_warns():
    m0, n = 40, 64
    net = nat.MLP([m0, M, M, 1], activation="relu", dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="nat.data.forster"):
        iso = nat.fisher.KFAC().isotropy(net, _inputs(n, m0))
    assert iso.condition_number > 1.05
    assert iso.alpha == pytest.approx(n * 2 + m0, rel=1e-9)  # trace of (S.109) times N


def test_kfac_after_forster_is_isotropic_again():
    m0, n = 40, 64
    net = nat.MLP([m0, M, M, 1], activation="relu", dtype=torch.float64)
    xf = nat.data.forster(_inputs(n, m0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iso = nat.fisher.KFAC().isotropy(net, xf)
    assert iso.condition_number <= 1 + 1e-6
    assert iso.alpha == pytest.approx(n * 2 + m0, rel=1e-9)  # (S.111)


def test_kfac_block_bias_after_forster_is_isotropic():
    m0, n = 40, 64
    net = nat.MLP([m0, 512, 512, 1], activation="relu", sigma_b2=0.5, dtype=torch.float64)
    xf = nat.data.forster(_inputs(n, m0))
    with pytest.warns(RuntimeWarning, match="bias='block'"):
        nat.fisher.KFAC().isotropy(net, xf)
    iso = nat.fisher.KFAC(bias="block").isotropy(net, xf)
    assert iso.condition_number <= 1 + 1e-6
    assert iso.alpha == pytest.approx(n * (2 * 3 - 2) + m0, rel=1e-9)
