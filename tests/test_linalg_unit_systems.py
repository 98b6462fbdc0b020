"""The unit-wise Fisher's batched support systems (linalg/support.py, linalg/unit_systems.py): the
float32 Cholesky with float64 refinement and the complement route through K^{-1}, each against float64
solves of the gathered systems, their refusal of systems they cannot certify, and the unit-wise update
through them (forced at small sizes by SolverOptions) against the explicit P × P Fisher and the
float64 route; the routes taken are read from the bound Fisher's ``routes``."""

import pytest
import torch

import natural_tangents as nat
from _explicit import ce_metric, ce_residual, explicit_fisher_of, explicit_signals, flat, jacobian
from natural_tangents import fisher as F
from natural_tangents.linalg import lapack
from natural_tangents.linalg import support as ss
from natural_tangents.linalg.lapack import Scratch, ScratchPool

FORCED = F.SolverOptions(refine_min_size=0)  # every update system through the mixed routes


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


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_unitwise_update_through_the_mixed_routes_matches_explicit(loss):
    net = nat.MLP([6, 40, 36, 2], activation="relu", sigma_w2=1.7, sigma_b2=0.4, seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    n = 12
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    lossf = nat.losses.CrossEntropy(output_damping=0.05) if loss == "ce" else nat.losses.MSE()
    y = torch.nn.functional.one_hot(torch.arange(n) % 2, 2).double() if loss == "ce" else torch.randn(n, 2, generator=g)
    fisher = F.Unitwise(damping=1e-3, loss=lossf, solver="direct", options=FORCED)
    f = net(x).detach()
    lam = ce_metric(f, 0.05) if loss == "ce" else None
    gmat = explicit_fisher_of(fisher, net, x, net.depth, explicit_signals, lam=lam)
    grad = jacobian(net, x).T @ (ce_residual(f, y) if loss == "ce" else f - y).reshape(-1) / n
    bound = fisher.at(net, x)
    got = flat(bound.natural_gradient(y))
    assert _rel(got, torch.linalg.solve(gmat, grad)) < 1e-8
    assert bound.routes["refined"] > 0 and bound.routes["direct"] == 0  # every unit certified


def test_unitwise_zero_damping_through_the_complement_route():
    """At ρ = 0, supports above the threshold go through K^{-1}; the update equals the float64 one."""
    net = nat.MLP([30, 64, 64, 1], activation="relu", sigma_b2=0.0, seed=4, dtype=torch.float64)
    x = torch.randn(24, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.randn(24, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    direct = F.SolverOptions(refine_min_size=10**9, complement_fraction=1.0)  # float64 Cholesky only
    float64 = F.Unitwise(damping=0.0, options=direct).at(net, x)
    want = flat(float64.natural_gradient(y))
    assert set(float64.routes) & {"refined", "complement"} == set()
    bound = F.Unitwise(damping=0.0, options=FORCED).at(net, x)
    got = flat(bound.natural_gradient(y))
    assert bound.routes["complement"] > 0 and bound.routes["refined"] > 0 and bound.routes["direct"] == 0
    assert _rel(got, want) < 1e-10


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


# ------------------------------------------------------------------ ρ = 0 with supports larger than rank a


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


def _tiny(case):
    """A ReLU/tanh net on N = 12 samples whose inputs have rank below N: fewer inputs (+ bias) than
    samples, or always-zero input pixels."""
    act, c, bias, loss, m0, zero_columns = case
    net = nat.MLP(
        [m0, 6, 5, c], activation=act, sigma_w2=1.7, sigma_b2=0.4 if bias else 0.0, seed=0, dtype=torch.float64
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, m0, generator=g, dtype=torch.float64)
    x_test = torch.randn(3, m0, generator=g, dtype=torch.float64)
    x[:, :zero_columns] = 0.0  # pixels that are always zero: rank a < M_0
    if loss == "ce":
        lossf = nat.losses.CrossEntropy(output_damping=0.05)
        y = torch.nn.functional.one_hot(torch.arange(12) % c, c).to(torch.float64)
    else:
        lossf = nat.losses.MSE()
        y = torch.randn(12, c, generator=g, dtype=torch.float64)
    return net, x, x_test, y, lossf


# the last: M_0 + 1 > N, but rank a = 7 < N (K singular)
CASES = [
    ("relu", 1, False, "mse", 4, 1),
    ("tanh", 3, True, "ce", 4, 0),
    ("relu", 2, True, "mse", 4, 1),
    ("tanh", 1, True, "mse", 12, 6),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("refuse", [False, True])
def test_unitwise_zero_damping_with_more_samples_than_inputs(case, refuse):
    """N > M_{l−1} + 1: K_SS is singular for supports larger than rank a, and the ρ = 0 limit is the
    weighted least-squares step pinv(D a_S) (not a^T K_SS^+). Update, Θ̄ (training and test inputs)
    and α̂ against the explicit P × P pseudo-inverse; with no refined primal solve certified
    (``certify=0``), the eigh fallback gives the same."""
    net, x, x_test, y, lossf = _tiny(case)
    fisher = F.Unitwise(damping=0.0, loss=lossf, options=F.SolverOptions(certify=0.0 if refuse else 1.0))
    f = net(x).detach()
    lam = ce_metric(f, 0.05) if case[3] == "ce" else None
    pinv = torch.linalg.pinv(explicit_fisher_of(fisher, net, x, net.depth, explicit_signals, lam=lam), hermitian=True)
    j, jt = jacobian(net, x), jacobian(net, x_test)
    grad = j.T @ (ce_residual(f, y) if case[3] == "ce" else f - y).reshape(-1) / 12
    bound = fisher.at(net, x)
    assert _rel(flat(bound.natural_gradient(y)), pinv @ grad) < 1e-8
    assert bound.routes["primal"] > 0
    assert (bound.routes["primal pinv"] == bound.routes["primal"]) if refuse else bound.routes["primal pinv"] == 0
    assert _rel(F.flatten_coefficient(fisher.coefficient(net, x, x_test)), jt @ pinv @ j.T / 12) < 1e-8
    tb = j @ pinv @ j.T / 12
    want_alpha = torch.diagonal(tb if lam is None else tb @ torch.block_diag(*lam)).mean()
    assert fisher.alpha_hat(net, x) == pytest.approx(float(want_alpha), rel=1e-8)


def test_unitwise_zero_damping_with_duplicate_samples():
    """Two identical samples: K_SS is singular for the supports holding both although |S| < N ≤ M_0
    (pivots at rounding level); they take the pseudo-inverse."""
    net = nat.MLP([6, 12, 11, 1], activation="tanh", sigma_w2=1.7, sigma_b2=0.4, seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    x[4] = x[3]
    y = torch.randn(5, 1, generator=g, dtype=torch.float64)
    fisher = F.Unitwise(damping=0.0)
    pinv = torch.linalg.pinv(explicit_fisher_of(fisher, net, x, net.depth, explicit_signals), hermitian=True)
    grad = jacobian(net, x).T @ (net(x) - y).reshape(-1).detach() / 5
    assert _rel(flat(fisher.natural_gradient(net, x, y)), pinv @ grad) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_through_lapack_matches_torch(dtype):
    """The in-place LAPACK factorization (lower triangle of the returned view) against torch's, in
    a batch with one matrix that is not positive definite (info > 0 there only), from a scratch
    buffer and in place; an empty batch."""
    if not lapack.has_lapack():
        pytest.skip("SciPy's LAPACK is not available to worker threads here")
    g = torch.Generator().manual_seed(11)
    a = torch.randn(4, 30, 40, generator=g, dtype=dtype)
    a = a @ a.mT
    a[2, 5, 5] = -1.0
    chol, info = lapack.cholesky(a, Scratch())
    want, want_info = torch.linalg.cholesky_ex(a)
    assert info.tolist() == want_info.tolist() and info[2] > 0
    ok = info == 0
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    assert _rel(chol[ok].tril(), want[ok]) < tol
    b = torch.randn(4, 30, 1, generator=g, dtype=dtype)
    assert _rel(lapack.cholesky_solve(chol[ok], b[ok]), torch.linalg.solve(a[ok], b[ok])) < 100 * tol
    inplace = a[ok].contiguous()
    chol2, _ = lapack.cholesky(inplace, overwrite=True)
    assert chol2.data_ptr() == inplace.data_ptr() and torch.equal(chol2.tril(), chol[ok].tril())
    assert lapack.cholesky(a[:0])[0].shape == (0, 30, 30)
