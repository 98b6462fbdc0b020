"""The Fishers with the cross-entropy loss (losses.CrossEntropy) at their limits, against dense
explicit Fishers (float64, torch.func Jacobians):

* zero damping with a singular kernel Θ (or Θ_l): the natural gradient is lim_{ρ→0⁺} (G + ρI)^{-1} ∇L
  = G^+ ∇L, not J^T Θ^+ Λ^{-1} r / N, on a CNN with fewer parameters than N·C;
* no output damping (ρ̃ = 0, Λ_n of rank C − 1): no inverse of Λ is needed, with or without damping.

Λ and the residual are written out here (diag p − p p^T + ρ̃ I and p − y), not taken from the library.
"""

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import natural_tangents as nat
from _explicit import explicit_fisher, explicit_sequential_signals, flat, jacobian
from natural_tangents import losses

F64 = torch.float64
N, C = 30, 3


def _cnn(seed=0):
    """Conv2d(1, 2, 3) → tanh → Linear(18, 3) on 5 × 5 inputs: P = 77 < N·C = 90."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, C)).to(F64)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 1, 5, 5, generator=g, dtype=F64), torch.arange(N) % C


def _metric_and_residual(model, x, labels, rho_out):
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :] + rho_out * torch.eye(C, dtype=F64)
    return torch.block_diag(*lam), p - Fn.one_hot(labels, C).to(F64)


def _pinv_psd(g):
    """The pseudo-inverse of a symmetric matrix (positive semi-definite or, for a coupling Σ, indefinite)."""
    ev, vec = torch.linalg.eigh(0.5 * (g + g.T))
    keep = ev.abs() > 1e-10 * ev.abs().max()
    return (vec[:, keep] / ev[keep]) @ vec[:, keep].T


def _explicit_g(kind, model, x, lam_full, rho):
    """Exact, block-diagonal (modules) or K-FAC (KFC on the convolution, the paper's output factor)."""
    j = jacobian(model, x)
    p = j.shape[1]
    g = j.T @ lam_full @ j / N
    if kind == "block_diagonal":
        cut = sum(q.numel() for q in model[0].parameters())
        g[:cut, cut:] = 0
        g[cut:, :cut] = 0
    if kind == "kfac":
        g = torch.zeros(p, p, dtype=F64)
        conv, lin = model[0], model[3]
        a = Fn.unfold(x, 3).transpose(1, 2)  # (N, T, 9) patches
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=F64)], 2)
        jw = j[:, :18].reshape(N, C, 2, 9)  # conv weight columns: ∂f_k/∂W = Σ_t δ_t a_t^T
        # δ at each position from the bias columns would sum over t; read δ through the layer instead
        h = torch.tanh(conv(x)).flatten(1)
        dz = (lin.weight.detach()[None, :, :] * (1 - h**2)[:, None, :]).reshape(N, C, 2, 9)  # ∂f/∂conv-out
        assert torch.allclose(torch.einsum("nkmt,ntp->nkmp", dz, a)[..., :9], jw, atol=1e-12)
        lam = lam_full.reshape(N, C, N, C)[torch.arange(N), :, torch.arange(N), :]
        a_star = torch.einsum("ntp,ntq->pq", a, a) / (N * 9)
        b_star = torch.einsum("nkmt,nkj,njot->mo", dz, lam, dz) / N
        order = [i for u in range(2) for i in (*range(9 * u, 9 * u + 9), 18 + u)]
        blk = torch.kron(b_star + rho * torch.eye(2, dtype=F64), a_star + rho * torch.eye(10, dtype=F64))
        g[torch.tensor(order)[:, None], torch.tensor(order)[None, :]] = blk
        a_lin = torch.cat([h, torch.ones(N, 1, dtype=F64)], 1)
        b_lin = lam.sum(0) / N / N  # the paper's output factor: mean Λ / N
        blk = torch.kron(b_lin + rho * torch.eye(C, dtype=F64), a_lin.T @ a_lin / N + rho * torch.eye(19, dtype=F64))
        order = [20 + i for u in range(C) for i in (*range(18 * u, 18 * u + 18), 54 + u)]
        g[torch.tensor(order)[:, None], torch.tensor(order)[None, :]] = blk
        return j, g
    return j, g + rho * torch.eye(p, dtype=F64)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["exact", "block_diagonal", "kfac"])
@pytest.mark.parametrize("rho_out", [1e-3, 0.0])
def test_zero_damping_is_the_limit_of_damping(kind, rho_out):
    model = _cnn()
    x, labels = _batch()
    lam_full, r = _metric_and_residual(model, x, labels, rho_out)
    j, g = _explicit_g(kind, model, x, lam_full, 0.0)
    theta = j @ j.T / N
    assert torch.linalg.matrix_rank(theta) < N * C  # Θ is singular: P < N·C
    want = _pinv_psd(g) @ (j.T @ r.reshape(-1) / N)
    cls = {
        "exact": nat.fisher.Exact,
        "block_diagonal": nat.fisher.BlockDiagonal,
        "kfac": lambda **kw: nat.fisher.KFAC(warn=False, **kw),
    }[kind]
    loss = losses.CrossEntropy(output_damping=rho_out)
    got = flat(cls(damping=0.0, loss=loss).natural_gradient(model, x, labels))
    assert _rel(got, want) < 1e-7
    if rho_out > 0:  # G is nonsingular here: the damped solutions converge to the same vector
        near = flat(cls(damping=1e-10, loss=loss).natural_gradient(model, x, labels))
        assert _rel(near, want) < 1e-4  # ρ / λ_min(G) ≈ 1.5e-5 here


@pytest.mark.parametrize("kind", ["exact", "block_diagonal", "kfac", "unitwise"])
def test_no_output_damping_with_damping_matches_the_explicit_solve(kind):
    model = _cnn(2)
    x, labels = _batch(3)
    lam_full, r = _metric_and_residual(model, x, labels, 0.0)
    rho = 1e-3
    if kind == "unitwise":
        j = jacobian(model, x)
        g = torch.zeros(j.shape[1], j.shape[1], dtype=F64)
        units = [[*range(9 * u, 9 * u + 9), 18 + u] for u in range(2)]
        units += [[20 + i for i in (*range(18 * u, 18 * u + 18), 54 + u)] for u in range(C)]
        for u in units:
            t = torch.tensor(u)
            g[t[:, None], t[None, :]] = j[:, t].T @ lam_full @ j[:, t] / N + rho * torch.eye(len(u), dtype=F64)
    else:
        j, g = _explicit_g(kind, model, x, lam_full, rho)
    want = torch.linalg.solve(g, j.T @ r.reshape(-1) / N)
    cls = {
        "exact": nat.fisher.Exact,
        "block_diagonal": nat.fisher.BlockDiagonal,
        "kfac": nat.fisher.KFAC,
        "unitwise": nat.fisher.Unitwise,
    }[kind]
    bound = cls(damping=rho, loss=losses.CrossEntropy(output_damping=0.0)).at(model, x)
    assert _rel(flat(bound.natural_gradient(labels)), want) < 1e-8
    # α̂ = tr(Θ̄ Λ) / (N·C) with Θ̄ = J G^{-1} J^T / N
    tb = j @ torch.linalg.solve(g, j.T) / N
    assert bound.alpha_hat() == pytest.approx(float(torch.diagonal(tb @ lam_full).mean()), rel=1e-8)


def test_binary_cross_entropy_metric_written_out():
    """One output: Λ_n = σ_n (1 − σ_n) + ρ̃ and r = σ − y, the logistic loss (exact, block diagonal)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(F64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 4, generator=g, dtype=F64)
    y = (torch.arange(9) % 2).to(F64)[:, None]
    for rho_out in (1e-3, 0.0):
        with torch.no_grad():
            s = torch.sigmoid(model(x))
        lam = torch.diag((s * (1 - s) + rho_out)[:, 0])
        j = jacobian(model, x)
        want = torch.linalg.solve(j.T @ lam @ j / 9 + 1e-2 * torch.eye(j.shape[1], dtype=F64), j.T @ (s - y)[:, 0] / 9)
        got = flat(
            nat.fisher.Exact(damping=1e-2, loss=losses.CrossEntropy(output_damping=rho_out)).natural_gradient(
                model, x, y
            )
        )
        assert _rel(got, want) < 1e-9


def test_kfac_wide_layer_dual_output_route_without_output_damping():
    """A hidden layer wider than N·C takes the dual route for its output factor: (s Λ β + ρ)^{-1} with
    a singular Λ, against the explicit (B* + ρ) ⊗ (A* + ρ) built from hooks and probes."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, C)).to(F64)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(7), dtype=F64)
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    r = p - Fn.one_hot(labels, C).to(F64)
    g = explicit_fisher("kfac", model, x, 1e-3, lam=lam, kfac_signals=explicit_sequential_signals(model, x))
    j = jacobian(model, x)
    want = torch.linalg.solve(g, j.T @ r.reshape(-1) / 4)
    fisher = nat.fisher.KFAC(damping=1e-3, loss=losses.CrossEntropy(output_damping=0.0))
    assert _rel(flat(fisher.natural_gradient(model, x, labels)), want) < 1e-8


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_tridiagonal_zero_damping_with_a_rank_deficient_layer_is_the_limit(loss):
    """A coupling Σ and a layer whose Θ_l is singular (the output layer: rank 8 < N·C = 10): the
    decoupled (S.74) is not the ρ → 0⁺ limit there; the update is G^+ ∇L of the explicit tri-diagonal
    Fisher (indefinite: Σ has a negative eigenvalue), which the damped updates approach. Θ̄ is the
    paper's (S.71) and gives the update's function-space step on the training set."""
    from _explicit import explicit_module_fisher

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 3), nn.Tanh(), nn.Linear(3, 2)).to(F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 1, 0, 1]) if loss == "cross_entropy" else torch.randn(5, 2, generator=g, dtype=F64)
    with torch.no_grad():
        f = model(x)
    if loss == "cross_entropy":
        p = torch.softmax(f, 1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :] + 1e-3 * torch.eye(2, dtype=F64)
        r = p - Fn.one_hot(y, 2).to(F64)
    else:
        lam, r = None, f - y
    gmat = explicit_module_fisher("layerwise", model, x, 0.0, lam=lam, sigma=nat.fisher.tridiagonal_sigma(3))
    j = jacobian(model, x)
    pinv = _pinv_psd(gmat)
    bound = nat.fisher.BlockTriDiagonal(damping=0.0, loss=loss).at(model, x)
    update = flat(bound.natural_gradient(y))
    assert _rel(update, pinv @ j.T @ r.reshape(-1) / 5) < 1e-7
    tb = nat.fisher.flatten_coefficient(bound.coefficient())
    assert _rel(j @ update, tb @ r.reshape(-1)) < 1e-7  # the same step of the outputs
    limit = pinv @ j.T @ r.reshape(-1) / 5
    far, near = (
        flat(nat.fisher.BlockTriDiagonal(damping=rho, loss=loss).natural_gradient(model, x, y)) for rho in (1e-4, 1e-6)
    )
    assert _rel(near, limit) < min(0.02, 0.2 * _rel(far, limit))  # the damped updates approach it
