"""The cnn-conditions experiment: its Θ̄ and its one NGD step against the explicit parameter-space
route on a tiny CNN (torch.func Jacobians, P × P Fishers, a dense pseudo-inverse at ρ = 0), the
block-diagonal Θ̄ = L I where every layer has more parameters than N·C, the ρ = 0 invariance under
the NTK rescaling it relies on, and the quick run's rows from the suite's one ``reproduce all``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn
from torch.func import functional_call

import natural_tangents as nat
from _explicit import explicit_module_fisher, jacobian, module_blocks, param_dict
from natural_tangents.experiments import cnn_conditions
from natural_tangents.experiments.cnn_network import (
    DEPTH,
    METHODS,
    Scale,
    inputs,
    measure_fisher,
    measure_network,
    network,
)
from natural_tangents.experiments.common import mse

F64 = torch.float64
TOL = 1e-8


def _images(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) non-negative images of unit norm (Assumption 2), like MNIST's."""
    x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x / x.flatten(1).norm(dim=1)[:, None, None, None]


def _tiny(channels: int, c: int = 2, n: int = 4):
    """The experiment's network on 12 × 12 images (6 × 6, then 2 × 2 positions), and targets."""
    y = torch.randn(n, c, generator=torch.Generator().manual_seed(5), dtype=F64)
    return network(channels, c, seed=1), _images(n), y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ the explicit route
def _module_io(model: nn.Module, x: torch.Tensor, modules: list[nn.Module]):
    """Each module's input, and ∂f/∂(module output) per sample (C, N, *out) by jacrev through additive
    probes on the outputs."""
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o: seen.__setitem__(mod, (a[0].detach(), o.detach()))) for m in modules
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()

    def f_of(probes):
        slot = dict(zip(modules, probes))
        hs = [m.register_forward_hook(lambda mod, a, o: o + slot[mod]) for m in modules]
        try:
            return functional_call(model, param_dict(model), (x,))
        finally:
            for h in hs:
                h.remove()

    jac = torch.func.jacrev(f_of)(tuple(torch.zeros_like(seen[m][1]) for m in modules))
    idx = torch.arange(x.shape[0])
    return [seen[m][0] for m in modules], [jl[idx, :, idx].transpose(0, 1) for jl in jac]


def _damped(a: torch.Tensor, rho: float) -> torch.Tensor:
    return a + rho * torch.eye(len(a), dtype=a.dtype)


def _kfc_fisher(model: nn.Module, x: torch.Tensor, rho: float) -> torch.Tensor:
    """K-FAC's P × P matrix as fisher/kfac.py states it: per convolution (B* + ρ) ⊗ (A* + ρ) with
    A* = Σ_{n,t} a a^T / (N T) (a: the input patches) and B* = Σ_{n,t,k} δ δ^T / N; for the linear
    readout A* = a^T a / N and the paper's output factor B*_L = Σ δ δ^T / N². No biases."""
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ins, deltas = _module_io(model, x, mods)
    n = x.shape[0]
    p_total = sum(p.numel() for p in model.parameters())
    g = torch.zeros(p_total, p_total, dtype=F64)
    for (_, (w,)), m, h, d in zip(module_blocks(model), mods, ins, deltas):
        if isinstance(m, nn.Conv2d):
            a = Fn.unfold(h, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride).transpose(1, 2)
            dd = d.flatten(3).transpose(2, 3)  # (C, N, T, M)
            a_star = torch.einsum("ntp,ntq->pq", a, a) / (n * a.shape[1])
            b_star = torch.einsum("kntm,knto->mo", dd, dd) / n
        else:
            a_star = h.T @ h / n
            b_star = torch.einsum("knm,kno->mo", d, d) / n / n
        idx = torch.tensor(w)  # row-major (M, p) = the Kronecker order
        g[idx[:, None], idx[None, :]] = torch.kron(_damped(b_star, rho), _damped(a_star, rho))
    return g


def _explicit_fisher(name: str, model: nn.Module, x: torch.Tensor, rho: float) -> torch.Tensor:
    if name == "kfac":
        return _kfc_fisher(model, x, rho)
    if name == "exact" or name == "unitwise":
        return explicit_module_fisher(name, model, x, rho)
    sigma = nat.fisher.tridiagonal_sigma(DEPTH) if name == "block_tridiagonal" else torch.eye(DEPTH, dtype=F64)
    return explicit_module_fisher("layerwise", model, x, rho, sigma=sigma)


def _inverse_times(g: torch.Tensor, b: torch.Tensor, rho: float) -> torch.Tensor:
    """G^{-1} b for ρ > 0; the dense pseudo-inverse G^+ b at ρ = 0 (the ρ → 0 limit)."""
    return torch.linalg.pinv(g, hermitian=True) @ b if rho == 0 else torch.linalg.solve(g, b)


# ------------------------------------------------------------------ against the explicit route
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("channels", [2, 4])  # 2: the readout's Jacobian has rank 4 < N·C = 8; 4: all full
@pytest.mark.parametrize("damping", [0.0, 0.1])  # ρ as a fraction of λ̄ = tr Θ / (N·C)
def test_theta_bar_and_one_step_match_the_explicit_fisher(name, channels, damping):
    net, x, y = _tiny(channels)
    n = x.shape[0]
    j = jacobian(net, x)
    rho = damping * float(torch.diagonal(j @ j.T).mean()) / n
    g = _explicit_fisher(name, net, x, rho)
    want = j @ _inverse_times(g, j.T, rho) / n
    if name == "block_tridiagonal" and rho == 0:
        # J G^+ J^T / N has no ρ → 0⁺ limit when a layer is rank deficient and Σ couples layers; Θ̄ is the
        # paper's (S.71), Σ_l (Σ^{-1} 1)_l Θ_l Θ_l^+, while the step is the limit G^+ J^T r / N (below)
        weights = torch.linalg.solve(nat.fisher.tridiagonal_sigma(DEPTH), torch.ones(DEPTH, dtype=F64))
        cols = [[i for p in ps for i in p] for _, ps in module_blocks(net)]
        want = sum(
            c * (j[:, idx] @ j[:, idx].T) @ torch.linalg.pinv(j[:, idx] @ j[:, idx].T, hermitian=True)
            for c, idx in zip(weights.tolist(), cols)
        )
    f0 = net(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # K-FAC: a readout narrower than N
        got = measure_fisher(nat.fisher.get(name, damping=rho), net, x, y)
    assert _rel(got.theta_bar, want) < TOL
    alpha = float(torch.diagonal(want).mean())
    assert got.isotropy.alpha == pytest.approx(alpha, rel=TOL)
    # the one step θ − Δθ/α̂, Δθ = G^{-1} J^T r / N, on the network and on its linearization
    r = (f0 - y).reshape(-1)
    step = _inverse_times(g, j.T @ r, rho) / n / alpha
    flat, offset = {}, 0
    for key, p in param_dict(net).items():
        flat[key] = p - step[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    assert got.loss_ratio == pytest.approx(mse(functional_call(net, flat, (x,)), y) / mse(f0, y), rel=1e-6)
    lin = r - want @ r / alpha
    assert got.loss_ratio_linear == pytest.approx(float(lin.square().sum() / r.square().sum()), rel=1e-6, abs=1e-14)
    torch.testing.assert_close(net(x).detach(), f0, rtol=0, atol=0)  # the step was undone


def test_layer_ranks_and_rank_formula_match_the_explicit_jacobians():
    net, x, y = _tiny(2)
    j = jacobian(net, x)
    cols = [[i for p in ps for i in p] for _, ps in module_blocks(net)]
    ranks = [int(torch.linalg.matrix_rank(j[:, c])) for c in cols]
    rows, facts = measure_network(net, x, y)
    assert facts["layer_ranks"] == ranks == [8, 8, 4]
    nc = j.shape[0]
    by_name = {r["method"]: r for r in rows if r["damping_relative"] == 0.0}
    assert by_name["block_diagonal"]["alpha_rank_formula"] == sum(ranks) / nc
    assert by_name["block_tridiagonal"]["alpha_rank_formula"] == ranks[1] / nc  # Σ^{-1} 1 = (0, 1, 0)
    for name in ("exact", "block_diagonal", "block_tridiagonal"):
        assert by_name[name]["alpha_hat"] == pytest.approx(by_name[name]["alpha_rank_formula"], abs=TOL)


# ------------------------------------------------------------------ block diagonal: L I, or a rank deficit
def test_block_diagonal_is_L_times_identity_where_every_layer_has_more_parameters_than_NC():
    x, y = inputs(10, 12, seed=0)
    net = network(16, 10, seed=0)  # 144, 2304 and 160 parameters against N·C = 120
    assert all(p.numel() > 120 for p in net.parameters())
    tb = measure_fisher(nat.fisher.BlockDiagonal(), net, x, y).theta_bar
    assert float((tb - DEPTH * torch.eye(120, dtype=F64)).abs().max()) < TOL


def test_block_diagonal_counts_the_readouts_rank_deficit():
    x, y = inputs(1, 20, seed=0)
    net = network(16, 1, seed=0)  # the pooled readout: 16 parameters < N = 20, the convolutions full rank
    ev = measure_fisher(nat.fisher.BlockDiagonal(), net, x, y).isotropy.eigenvalues
    want = torch.tensor([2.0] * 4 + [3.0] * 16, dtype=F64)  # 2 I + the readout's rank-16 projection
    torch.testing.assert_close(ev, want, rtol=0, atol=TOL)


# ------------------------------------------------------------------ the parameterization
def _standard_copy(net: nn.Sequential) -> nn.Sequential:
    """The same function in the standard parameterization: each Scale(c) folded into the next
    layer's weight (c W), the Scale modules dropped."""
    out, c = [], 1.0
    for m in net:
        if isinstance(m, Scale):
            c = m.c
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            folded = copy.deepcopy(m)
            with torch.no_grad():
                folded.weight.mul_(c)
            out.append(folded)
            c = 1.0
        else:
            out.append(m)
    return nn.Sequential(*out)


@pytest.mark.parametrize("name", METHODS)
def test_theta_bar_at_zero_damping_does_not_depend_on_the_ntk_scaling(name):
    net, x, y = _tiny(3)
    std = _standard_copy(net)
    torch.testing.assert_close(std(x), net(x), rtol=1e-12, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = measure_fisher(nat.fisher.get(name), net, x, y)
        b = measure_fisher(nat.fisher.get(name), std, x, y)
    assert _rel(b.theta_bar, a.theta_bar) < TOL
    assert b.loss_ratio_linear == pytest.approx(a.loss_ratio_linear, rel=1e-6, abs=1e-14)
    if name not in ("exact", "block_tridiagonal"):  # a Fisher of layer, Kronecker or unit blocks: one step in θ
        assert b.loss_ratio == pytest.approx(a.loss_ratio, rel=1e-6)
    elif name == "exact":  # G is singular (P > N·C): G^+ is the minimum-norm step in each parameterization's metric
        assert b.loss_ratio != pytest.approx(a.loss_ratio, rel=1e-3)
    # block tri-diagonal: where a layer is rank deficient, its limit is G^+ too (no assertion either way)


# ------------------------------------------------------------------ data and arguments
def test_ten_class_inputs_are_balanced_unit_norm_and_one_hot():
    x, y = inputs(10, 30, seed=3)
    assert x.shape == (30, 1, 28, 28) and y.shape == (30, 10)
    torch.testing.assert_close(x.flatten(1).norm(dim=1), torch.ones(30, dtype=F64))
    assert y.sum(0).tolist() == [3.0] * 10 and set(y.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="outputs"):
        inputs(3, 30, seed=0)
    with pytest.raises(ValueError, match="channels"):
        network(0, 1, seed=0)


# ------------------------------------------------------------------ the quick run of ``reproduce all``
def test_quick_run_rows(reproduced):
    name = cnn_conditions.NAME
    rows = reproduced.rows(name)
    assert rows and {r["outputs"] for r in rows} == {1, 10}
    nets = {(r["outputs"], r["channels"], r["seed"]) for r in rows}
    assert len(rows) == 10 * len(nets)  # five Fishers at ρ = 0 and ρ = 10⁻³ λ̄ on every network
    assert max(r["channels"] for r in rows) <= 128  # --max-width
    for r in reproduced.rows(name, damping_relative=0.0):
        if r["method"] in ("exact", "block_diagonal", "block_tridiagonal"):  # sums of projections
            assert r["alpha_hat"] == pytest.approx(r["alpha_rank_formula"], abs=TOL), r
    wide = [
        r
        for r in reproduced.rows(name, method="block_diagonal", damping_relative=0.0)
        if all(r[f"params_layer{l}"] > r["n_times_c"] for l in range(1, DEPTH + 1))
    ]
    assert wide  # the quick sweep reaches it for C = 1 and C = 10
    assert {r["outputs"] for r in wide} == {1, 10}
    for r in wide:
        assert r["alpha_hat"] == pytest.approx(DEPTH, abs=TOL) and r["deviation"] < TOL
    summary = reproduced.results[name]["summary"]
    for label in ("Exact:", "Block diagonal:", "Block tri-diagonal", "K-FAC (KFC):", "Unit-wise:"):
        assert label in summary
