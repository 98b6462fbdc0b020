"""The unit-wise Fisher's batched support systems (fisher/support_systems.py): the float32 Cholesky
with float64 refinement and the complement route through K^{-1}, each against float64 solves of the
gathered systems, their refusal of systems they cannot certify, and the unit-wise update through
them (forced at small sizes) against the explicit P × P Fisher and the float64 route."""

import pytest
import torch

import natural_tangents as nat
from _explicit import explicit_fisher_of, explicit_signals, flat, jacobian
from natural_tangents import fisher as F
from natural_tangents.fisher import support_systems as ss
from natural_tangents.fisher import unitwise


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
    z, ok = ss.refined_solve(k, k_low, idx, sub_idx, valid, t, damping, c, ss.Scratch())
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
    z, ok = ss.complement_solve(k, p_ext, idx, valid, out_idx, out_valid, c, ss.Scratch())
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
    got = ss.principal_submatrices(k, idx, ss.Scratch())
    assert torch.equal(got, torch.stack([k[i][:, i] for i in idx]))


@pytest.fixture
def forced(monkeypatch):
    """Every update system through the mixed routes; counts of the units each route certified."""
    monkeypatch.setattr(unitwise, "_REFINE_MIN_SIZE", 0)
    seen = {"refined": 0, "complement": 0, "refused": 0}

    def counting(name, fn):
        def run(*args):
            z, ok = fn(*args)
            seen[name] += int(ok.sum())
            seen["refused"] += int((~ok).sum())
            return z, ok

        return run

    monkeypatch.setattr(unitwise, "refined_solve", counting("refined", ss.refined_solve))
    monkeypatch.setattr(unitwise, "complement_solve", counting("complement", ss.complement_solve))
    return seen


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_unitwise_update_through_the_mixed_routes_matches_explicit(forced, loss):
    net = nat.MLP([6, 40, 36, 2], activation="relu", sigma_w2=1.7, sigma_b2=0.4, seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    n = 12
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    lossf = nat.losses.CrossEntropy(output_damping=0.05) if loss == "ce" else nat.losses.MSE()
    y = torch.nn.functional.one_hot(torch.arange(n) % 2, 2).double() if loss == "ce" else torch.randn(n, 2, generator=g)
    fisher = F.Unitwise(damping=1e-3, loss=lossf, solver="direct")
    f = net(x).detach()
    lam = lossf.output_fisher(f) if loss == "ce" else None
    gmat = explicit_fisher_of(fisher, net, x, net.depth, explicit_signals, lam=lam)
    grad = jacobian(net, x).T @ lossf.residual(f, y).reshape(-1) / n
    got = flat(fisher.natural_gradient(net, x, y))
    assert _rel(got, torch.linalg.solve(gmat, grad)) < 1e-8
    assert forced["refined"] > 0 and forced["refused"] == 0


def test_unitwise_zero_damping_through_the_complement_route(forced, monkeypatch):
    """At ρ = 0, supports above the threshold go through K^{-1}; the update equals the float64 one."""
    net = nat.MLP([30, 64, 64, 1], activation="relu", sigma_b2=0.0, seed=4, dtype=torch.float64)
    x = torch.randn(24, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.randn(24, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    monkeypatch.setattr(unitwise, "_REFINE_MIN_SIZE", 10**9)
    want = flat(F.Unitwise(damping=0.0).natural_gradient(net, x, y))
    monkeypatch.setattr(unitwise, "_REFINE_MIN_SIZE", 0)
    got = flat(F.Unitwise(damping=0.0).natural_gradient(net, x, y))
    assert forced["complement"] > 0 and forced["refined"] > 0
    assert _rel(got, want) < 1e-10


def test_scratch_buffers_are_reused_and_never_shared():
    """One Scratch serves batches of different shapes in turn (each result intact after the next
    call); the pool hands concurrent jobs different sets and sequential ones the same."""
    n = 30
    k, g = _shared(n, 90, seed=8)
    scratch = ss.Scratch()
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
    pool = ss.ScratchPool()
    with pool.take() as one, pool.take() as two:
        assert one is not two
    with pool.take() as again:
        assert again in (one, two)
