"""The infinite-width coefficient matrix Θ̄(x′, x) against its isotropic value on the training set,
against Θ̄ measured on wide networks (from empirical_ntk directly, and from nat.fisher), and the
error paths."""

from __future__ import annotations

import math

import pytest
import torch

import natural_tangents as nat
from natural_tangents import fisher, theory

F64 = torch.float64
CFG = {"depth": 3, "activation": "relu", "sigma_w2": 2.0, "sigma_b2": 0.5}


def _net(m0: int, width: int, seed: int, act: str = "relu", sigma_b2: float = 0.5) -> nat.MLP:
    return nat.MLP([m0, width, width, 1], activation=act, sigma_w2=2.0, sigma_b2=sigma_b2, seed=seed, dtype=F64)


@pytest.mark.parametrize(
    "fish, alpha",
    [
        (fisher.Exact(), lambda n: 1.0),
        (fisher.BlockDiagonal(), lambda n: 3.0),
        (fisher.BlockTriDiagonal(), lambda n: 1.0),
        (fisher.KFAC(), lambda n: 3.0 * n),
        (fisher.KFAC(output_factor="fisher"), lambda n: 2.0 * n + 1),
        (fisher.KFAC(bias="block"), lambda n: 5.0 * n),
    ],
)
def test_isotropic_on_the_training_set(fish, alpha, unit_inputs):
    x = unit_inputs(20, 32, 0)
    tb = theory.coefficient(fish, None, x, **CFG)
    assert tb.shape == (20, 20) and tb.dtype == F64
    assert torch.allclose(tb, alpha(20) * torch.eye(20, dtype=F64), atol=1e-9 * alpha(20))
    assert alpha(20) == pytest.approx(
        theory.alpha(fish, widths=[32, 4096, 4096, 1], n_train=20, sigma_b2=0.5), rel=1e-12
    )
    # passing the training inputs as x_test is the same thing
    assert torch.allclose(theory.coefficient(fish, x, x, **CFG), tb)


def test_unitwise_on_the_training_set_and_refused_elsewhere(unit_inputs):
    x = unit_inputs(10, 32, 1)
    widths = [32, 1024, 1024, 1]
    tb = theory.coefficient(fisher.Unitwise(), None, x, widths=widths, **CFG)
    a = theory.alpha(fisher.Unitwise(), widths=widths, activation="relu", sigma_w2=2.0, sigma_b2=0.5)
    assert a == pytest.approx(1025.0)  # γ = 1/2 per hidden unit, + 1 output unit
    assert torch.allclose(tb, a * torch.eye(10, dtype=F64))
    with pytest.raises(NotImplementedError, match=r"S\.155"):
        theory.coefficient(fisher.Unitwise(), unit_inputs(3, 32, 2), x, widths=widths, **CFG)
    with pytest.raises(ValueError, match="widths"):
        theory.coefficient(fisher.Unitwise(), None, x, **CFG)


@pytest.mark.slow
def test_exact_coefficient_matches_empirical_ntk_route(unit_inputs):
    """Independent of nat.fisher: Θ̄ = Θ(x′, x) Θ(x, x)^{-1} from nat.empirical_ntk of wide nets,
    averaged over seeds; relative error O(1/√M) and shrinking by ≈ √8 from M = 256 to 2048."""
    x, xt = unit_inputs(12, 24, 3), unit_inputs(5, 24, 4)
    ana = theory.coefficient(fisher.Exact(), xt, x, **CFG)
    err = {}
    for width in (256, 2048):
        e = []
        for seed in range(3):
            net = _net(24, width, seed)
            emp = torch.linalg.solve(nat.empirical_ntk(net, x), nat.empirical_ntk(net, x, xt)).T
            e.append(float(torch.linalg.matrix_norm(emp - ana) / torch.linalg.matrix_norm(ana)))
        err[width] = sum(e) / len(e)
        assert err[width] <= 20.0 / math.sqrt(width)
    assert 1.7 < err[256] / err[2048] < 4.7


FISHERS = [
    fisher.Exact(),
    fisher.BlockDiagonal(),
    fisher.BlockTriDiagonal(),
    fisher.KFAC(),
    fisher.KFAC(output_factor="fisher"),
    fisher.Exact(damping=1e-2),
    fisher.BlockDiagonal(damping=1e-2),
    fisher.KFAC(damping=1e-3),
]


@pytest.mark.slow
def test_test_point_coefficient_matches_wide_networks_for_every_fisher(unit_inputs):
    """Θ̄(x′, x) of nat.fisher.*.coefficient on tanh MLP([32, M, M, 1]) converges to the analytic one.
    Stated bound: relative Frobenius error (mean of 3 seeds) ≤ 16/√M, dropping by a factor > 1.8
    (√8 ≈ 2.8 expected; measured 2.3–3.2) from M = 256 to 2048. The constant is large because Θ̄ on
    test points contains B_l^{-1} and Θ^{-1} of kernels with condition numbers ~10³."""
    cfg = {**CFG, "activation": "tanh"}
    x, xt = unit_inputs(16, 32, 0), unit_inputs(8, 32, 1)
    ana = [theory.coefficient(f, xt, x, **cfg) for f in FISHERS]
    err = torch.zeros(2, len(FISHERS), dtype=F64)
    for i, width in enumerate((256, 2048)):
        for seed in range(3):
            net = _net(32, width, seed, act="tanh")
            for j, (f, a) in enumerate(zip(FISHERS, ana)):
                emp = f.coefficient(net, x, xt).to(F64)
                err[i, j] += torch.linalg.matrix_norm(emp - a) / torch.linalg.matrix_norm(a) / 3
    assert bool((err[1] <= 16.0 / math.sqrt(2048)).all()), err
    assert bool((err[0] / err[1] > 1.8).all()), err[0] / err[1]


def test_damping_and_training_set_agree_with_fisher_exactly_where_width_does_not_matter(unit_inputs):
    """On the training set the K-FAC and layer-wise Θ̄ with damping depend on the network only through
    the kernels; the depth-1 network's kernel is exact, so analytic and measured Θ̄ coincide."""
    x, xt = unit_inputs(6, 10, 7), unit_inputs(3, 10, 8)
    net = nat.MLP([10, 1], activation="tanh", sigma_w2=1.5, sigma_b2=0.3, seed=0, dtype=F64)
    opts = {"depth": 1, "activation": "tanh", "sigma_w2": 1.5, "sigma_b2": 0.3}
    for f in (fisher.Exact(damping=0.05), fisher.BlockDiagonal(damping=0.05), fisher.KFAC(damping=0.01)):
        assert torch.allclose(theory.coefficient(f, xt, x, **opts), f.coefficient(net, x, xt).to(F64), atol=1e-10)


def test_kfac_narrow_input_uses_the_primal_first_layer(unit_inputs):
    """M_0 = 12 < N = 24 (S.108): analytic Θ̄ against K-FAC on a wide net; raw inputs are not
    isotropic, Forster inputs give N(L−1) + M_0 (S.111)."""
    n, m0 = 24, 12
    x = unit_inputs(n, m0, 9)
    cfg = {**CFG, "sigma_b2": 0.0}
    raw = theory.coefficient(fisher.KFAC(), None, x, **cfg)
    ev = torch.linalg.eigvalsh(raw)
    assert float(ev.mean()) == pytest.approx(n * 2 + m0, rel=1e-12)
    assert float(ev[-1] / ev[0]) > 1.05
    xf = nat.data.forster(x)
    iso = theory.coefficient(fisher.KFAC(), None, xf, **cfg)
    assert torch.allclose(iso, (n * 2 + m0) * torch.eye(n, dtype=F64), atol=1e-6)
    # on test points, against the network (the first layer is exact at any width)
    xt = unit_inputs(4, m0, 10)
    ana = theory.coefficient(fisher.KFAC(), xt, x, **cfg)
    net = _net(m0, 2048, 0, sigma_b2=0.0)
    with pytest.warns(RuntimeWarning, match="isotropic"):
        emp = fisher.KFAC().coefficient(net, x, xt).to(F64)
    assert float(torch.linalg.matrix_norm(emp - ana) / torch.linalg.matrix_norm(ana)) < 20 / math.sqrt(2048)


def _layerwise_coefficient_in_parameter_space(sigma, x_train, x_test, rho, cfg):
    """Θ̄(x′, x) = J(x′) G^{-1} J(x)^T / N of the layer-wise Fisher G = S^T (Σ ⊗ I) S / N + ρ I,
    S = blockdiag(J_l) (the paper's (S.71)–(S.73)), solved densely in a parameter space: layer l's
    Jacobian rows are features Φ_l with Φ_l Φ_l^T = the analytic Θ_l (no 1/N) on the inputs
    [x; x′] jointly — not the dual L·N × L·N system the library solves."""
    n = x_train.shape[0]
    joint = x_train if x_test is None else torch.cat([x_train, x_test])
    feats = []
    for k in theory.kernels(joint, **cfg).per_layer:
        ev, vec = torch.linalg.eigh(0.5 * (k + k.T))
        feats.append(vec * ev.clamp(min=0).sqrt())
    s = torch.block_diag(*[f[:n] for f in feats])  # (L·N, P), rows layer-major
    g = s.T @ torch.kron(sigma, torch.eye(n, dtype=F64)) @ s / n + rho * torch.eye(s.shape[1], dtype=F64)
    j_train = torch.cat([f[:n] for f in feats], 1)  # J(x) = [J_1 … J_L], (N, P)
    j_test = j_train if x_test is None else torch.cat([f[n:] for f in feats], 1)
    return j_test @ torch.linalg.solve(g, j_train.T) / n


def test_singular_sigma_needs_damping(unit_inputs):
    """At L = 3s + 2 the tri-diagonal Σ is singular (eigenvalues 1 + 2 cos(kπ/6): one is 0, one
    negative), so ρ = 0 is refused; the damped Θ̄ (training set and test points) equals the dense
    parameter-space solve of the same G to rounding."""
    x = unit_inputs(8, 16, 11)
    cfg = {**CFG, "depth": 5}  # block tri-diagonal Σ is singular at L = 3s + 2
    with pytest.raises(ValueError, match=r"singular.*damping > 0"):
        theory.coefficient(fisher.BlockTriDiagonal(), None, x, **cfg)
    tb = theory.coefficient(fisher.BlockTriDiagonal(damping=1e-3), None, x, **cfg)
    assert torch.allclose(tb, tb.T, atol=1e-10) and bool(torch.isfinite(tb).all())
    sigma = fisher.tridiagonal_sigma(5)
    assert float(torch.linalg.eigvalsh(sigma).abs().min()) < 1e-12
    xt = unit_inputs(3, 16, 13)
    for rho in (1e-3, 0.1):
        f = fisher.BlockTriDiagonal(damping=rho)
        for x_test in (None, xt):
            got = theory.coefficient(f, x_test, x, **cfg)
            want = _layerwise_coefficient_in_parameter_space(sigma, x, x_test, rho, cfg)
            assert float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want)) < 1e-10, (rho, x_test)


def test_bad_inputs(unit_inputs):
    x = unit_inputs(5, 6, 12)
    with pytest.raises(ValueError, match="x_test: has 7 features"):
        theory.coefficient(fisher.Exact(), unit_inputs(2, 7, 0), x, **CFG)
    with pytest.raises(ValueError, match="fisher"):
        theory.coefficient(object(), None, x, **CFG)
    assert torch.equal(theory.coefficient("exact", None, x, **CFG), theory.coefficient(fisher.Exact(), None, x, **CFG))
    with pytest.raises(ValueError, match="depth"):
        theory.coefficient(fisher.Exact(), None, x, **{**CFG, "depth": 0})
    with pytest.raises(ValueError, match="widths: expected 4 widths starting with M_0 = 6"):
        theory.coefficient(fisher.Exact(), None, x, widths=[7, 10, 10, 1], **CFG)
    dup = torch.cat([x, x[:1]])
    with pytest.raises(ValueError, match="x_train: the training kernel is singular"):
        theory.coefficient(fisher.Exact(), None, dup, **{**CFG, "sigma_b2": 0.0, "depth": 1})
