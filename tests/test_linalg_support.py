"""Batched positive-definite systems on index subsets of one shared matrix (linalg/support.py), the
unit-wise Fisher's support systems: the float32 Cholesky with float64 refinement, the complement
route through K^{-1} and the weighted normal equations of the primal route, each against float64
solves of the gathered systems one unit at a time; their refusal of systems they cannot certify; the
gather; and the scratch buffers (linalg/lapack.py) they are solved in."""

import pytest
import torch

from natural_tangents.linalg import support as ss
from natural_tangents.linalg.lapack import Scratch, ScratchPool


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _shared(n, rank, seed, spike=0.0):
    """A shared K = a a^T / rank (N, N) with an optional mean spike (as post-ReLU features have)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank, generator=g, dtype=torch.float64) + spike
    return a @ a.T / rank, g


def _supports(n, sizes, g):
    """idx (u, m): each unit's support (ascending) then the samples outside it; valid (u, m)."""
    m = max(sizes)
    idx, valid = [], []
    for size in sizes:
        perm = torch.randperm(n, generator=g)
        inside, outside = perm[:size].sort().values, perm[size:].sort().values
        idx.append(torch.cat([inside, outside])[:m])
        valid.append(torch.arange(m) < size)
    return torch.stack(idx), torch.stack(valid)


def _reference(k, idx, valid, t, damping, c):
    """float64 solves of the gathered systems, one unit at a time."""
    out = torch.zeros_like(c)
    for i in range(len(idx)):
        sel = idx[i][valid[i]]
        a = k[sel][:, sel]
        if t is not None:
            a = a * t[i][valid[i]][:, None] * t[i][valid[i]][None, :]
        a = a + damping * torch.eye(len(sel), dtype=k.dtype)
        out[i, : len(sel)] = torch.linalg.solve(a, c[i][valid[i]])
    return out


@pytest.mark.parametrize(("damping", "scaled"), [(0.0, False), (1e-3, True)])
def test_refined_support_solve_matches_float64_solves(damping, scaled):
    n = 60
    k, g = _shared(n, 200, seed=1, spike=0.5)
    idx, valid = _supports(n, [20, 31, 33, 40, 47], g)
    m = idx.shape[1]
    sub_idx = torch.where(valid, idx, n + torch.arange(m)[None, :])
    k_low = torch.block_diag(k, torch.eye(m, dtype=k.dtype)).float()
    t = (0.5 + torch.rand(idx.shape, generator=g, dtype=torch.float64)) / n**0.5 if scaled else None
    c = torch.randn(idx.shape, generator=g, dtype=torch.float64) * valid
    z, ok = ss.refined_solve(k, k_low, idx, sub_idx, valid, t, damping, c, Scratch())
    want = _reference(k, idx, valid, t, damping, c)
    assert bool(ok.all())
    assert _rel(z, want) < 1e-11
    assert bool((z[~valid] == 0).all())
    # without a workspace: the same numbers
    z2, _ = ss.refined_solve(k, k_low, idx, sub_idx, valid, t, damping, c)
    assert torch.equal(z, z2)


def test_complement_route_matches_float64_solves():
    """Supports of more than half the samples through P = K^{-1} and the |S̄| × |S̄| blocks of P."""
    n = 50
    k, g = _shared(n, 150, seed=2, spike=0.5)
    idx, valid = _supports(n, [30, 38, 44, 49], g)
    out_pos = []
    for i in range(len(idx)):
        inside = set(idx[i][valid[i]].tolist())
        outside = [j for j in range(n) if j not in inside]
        out_pos.append(torch.tensor(outside + sorted(inside)))
    out_pos = torch.stack(out_pos)
    q = n - int(valid.sum(1).min())
    out_idx = out_pos[:, :q]
    out_valid = torch.arange(q)[None, :] < (n - valid.sum(1))[:, None]
    p_ext = torch.block_diag(torch.linalg.inv(k), torch.eye(q, dtype=k.dtype))
    c = torch.randn(idx.shape, generator=g, dtype=torch.float64) * valid
    z, ok = ss.complement_solve(k, p_ext, idx, valid, out_idx, out_valid, c, Scratch())
    assert bool(ok.all())
    assert _rel(z, _reference(k, idx, valid, None, 0.0, c)) < 1e-11


def test_systems_beyond_float32_are_not_certified():
    """A unit whose system is singular to float32 (condition number ~1e10) is refused; the others
    are certified."""
    n = 40
    k, g = _shared(n, 100, seed=3)
    idx, valid = _supports(n, [20, 20, 20], g)
    # make unit 1's system nearly singular: two of its samples almost identical
    a, b = idx[1, 0], idx[1, 1]
    k = k.clone()
    k[b] = k[a]
    k[:, b] = k[:, a]
    k[b, b] = k[a, a] * (1 + 1e-10)
    m = idx.shape[1]
    sub_idx = torch.where(valid, idx, n + torch.arange(m)[None, :])
    k_low = torch.block_diag(k, torch.eye(m, dtype=k.dtype)).float()
    c = torch.randn(idx.shape, generator=g, dtype=torch.float64) * valid
    _, ok = ss.refined_solve(k, k_low, idx, sub_idx, valid, None, 0.0, c)
    shares_both = [(a in idx[i][valid[i]]) and (b in idx[i][valid[i]]) for i in range(3)]
    assert ok.tolist() == [not s for s in shares_both]


def test_principal_submatrices_gather():
    k = torch.arange(49.0).reshape(7, 7)
    idx = torch.tensor([[0, 3, 5], [6, 2, 1]])
    got = ss.principal_submatrices(k, idx, Scratch())
    assert torch.equal(got, torch.stack([k[i][:, i] for i in idx]))


def test_scratch_buffers_are_reused_and_never_shared():
    """One Scratch serves batches of different shapes in turn (each result intact after the next
    call); the pool hands concurrent jobs different sets and sequential ones the same."""
    n = 30
    k, g = _shared(n, 90, seed=8)
    scratch = Scratch()
    results = []
    for sizes in ([10, 12], [14, 15, 15], [8]):
        idx, valid = _supports(n, sizes, g)
        m = idx.shape[1]
        sub_idx = torch.where(valid, idx, n + torch.arange(m)[None, :])
        k_low = torch.block_diag(k, torch.eye(m, dtype=k.dtype)).float()
        c = torch.randn(idx.shape, generator=g, dtype=torch.float64) * valid
        z, ok = ss.refined_solve(k, k_low, idx, sub_idx, valid, None, 0.0, c, scratch)
        assert bool(ok.all())
        results.append((z, _reference(k, idx, valid, None, 0.0, c)))
    for z, want in results:
        assert _rel(z, want) < 1e-11
    pool = ScratchPool()
    with pool.take() as one, pool.take() as two:
        assert one is not two
    with pool.take() as again:
        assert again in (one, two)


def _basis(n, r, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return q, g


@pytest.mark.parametrize("refine", [True, False])
def test_primal_solve_matches_float64_solves(refine):
    """Weighted normal equations on row subsets of a shared basis against per-unit float64 solves;
    a unit whose weighted rows span less than r is refused."""
    n, r = 40, 12
    x, g = _basis(n, r, seed=9)
    idx, valid = _supports(n, [15, 20, 33, 30], g)
    t = (0.2 + torch.rand(idx.shape, generator=g, dtype=torch.float64)) * valid
    t[3, r - 2 :] = 0.0  # unit 3: only r − 2 samples carry weight, a singular Gram
    rhs = torch.randn(len(idx), r, 1, generator=g, dtype=torch.float64)
    phi, ok = ss.primal_solve(x, x.float() if refine else None, idx, t, rhs, Scratch())
    assert ok.tolist() == [True, True, True, False]
    for i in range(3):
        rows = x[idx[i]] * t[i][:, None]
        want = torch.linalg.solve(rows.T @ rows, rhs[i])
        assert _rel(phi[i], want) < (1e-12 if refine else 1e-10)
