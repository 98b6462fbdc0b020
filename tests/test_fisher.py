"""Every dual-form Fisher against the explicit parameter-space route on tiny networks (float64).

The update must equal (G + ρI)^{-1} ∇L and Θ̄(x′, x) must equal J(x′) G^{-1} J(x)^T / N with G built
as a P × P matrix from torch.func Jacobians, to relative error ≤ 1e-8.
"""

import pytest
import torch

import natural_tangents as nat
from _explicit import ce_metric, ce_residual, explicit_fisher_of, explicit_signals, flat, jacobian
from natural_tangents import fisher as F
from natural_tangents.linalg.tridiagonal import TridiagonalSystem

TOL = 1e-8
# (widths without C, N): a wide net (dual forms everywhere) and a narrow one (primal K-FAC factors,
# hidden widths below N·C)
SHAPES = [((6, 12, 11), 5), ((4, 6, 5), 8)]


def _net(widths, c, bias, activation="tanh", seed=0):
    return nat.MLP(
        [*widths, c],
        activation=activation,
        sigma_w2=1.7,
        sigma_b2=0.4 if bias else 0.0,
        seed=seed,
        dtype=torch.float64,
    )


def _data(n, m0, c, seed=1, loss="mse"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m0, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    if loss == "mse":
        y = torch.randn(n, c, generator=g, dtype=torch.float64)
    else:
        y = torch.nn.functional.one_hot(torch.arange(n) % max(c, 2), max(c, 2)).to(torch.float64)
        if c == 1:
            y = y[:, :1]
    return x, y


def _explicit(fisher, net, x, lam):
    return explicit_fisher_of(fisher, net, x, net.depth, explicit_signals, lam=lam)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


FISHERS = [
    F.Exact,
    F.BlockDiagonal,
    F.BlockTriDiagonal,
    F.KFAC,
    F.Unitwise,
    lambda **kw: F.Layerwise(sigma=torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]]), **kw),
    lambda **kw: F.KFAC(bias="block", **kw),
    lambda **kw: F.Unitwise(solver="cg", tol=1e-13, **kw),
    lambda **kw: F.Unitwise(solver="direct", **kw),
]


@pytest.mark.parametrize("make", FISHERS)
@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("damping", [1e-3, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_mse_update_and_coefficient_match_explicit(make, c, bias, damping, shape):
    widths, n = shape
    fisher = make(damping=damping)
    net = _net(widths, c, bias)
    x, y = _data(n, widths[0], c)
    x_test, _ = _data(3, widths[0], c, seed=7)
    j = jacobian(net, x)
    g = _explicit(fisher, net, x, None)
    grad = j.T @ (net(x) - y).reshape(-1) / n
    want = torch.linalg.solve(g, grad)
    got = flat(fisher.natural_gradient(net, x, y))
    assert _rel(got, want) < TOL
    assert fisher.alpha_hat(net, x) == pytest.approx(
        float(torch.trace(j @ torch.linalg.solve(g, j.T)) / (n * n * c)), rel=1e-8
    )
    for xt in (x, x_test):
        jt = jacobian(net, xt)
        want_tb = jt @ torch.linalg.solve(g, j.T) / n
        got_tb = F.flatten_coefficient(fisher.coefficient(net, x, None if xt is x else xt))
        assert got_tb.shape == want_tb.shape
        assert _rel(got_tb, want_tb) < TOL


@pytest.mark.parametrize("make", FISHERS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_update_and_coefficient_match_explicit(make, c, shape):
    widths, n = shape
    loss = nat.losses.CrossEntropy(output_damping=0.05)
    fisher = make(damping=0.1, loss=loss)
    net = _net(widths, c, True, activation="relu")
    x, y = _data(n, widths[0], c, loss="ce")
    f = net(x).detach()
    lam = ce_metric(f, 0.05)
    j = jacobian(net, x)
    g = _explicit(fisher, net, x, lam)
    grad = j.T @ ce_residual(f, y).reshape(-1) / n
    want = torch.linalg.solve(g, grad)
    assert _rel(flat(fisher.natural_gradient(net, x, y)), want) < TOL
    want_tb = j @ torch.linalg.solve(g, j.T) / n
    assert _rel(F.flatten_coefficient(fisher.coefficient(net, x)), want_tb) < TOL
    want_alpha = torch.diagonal(want_tb @ torch.block_diag(*lam)).mean()
    assert fisher.alpha_hat(net, x) == pytest.approx(float(want_alpha), rel=1e-8)


@pytest.mark.parametrize("make", [F.Exact, F.BlockDiagonal, F.KFAC, F.Unitwise])
def test_zero_damping_is_the_limit_of_small_damping(make):
    """ρ = 0 (pseudo-inverse route) equals the damped explicit solution as ρ → 0⁺."""
    net = _net((6, 12, 11), 1, True)
    x, y = _data(5, 6, 1)
    got = flat(make(damping=0.0).natural_gradient(net, x, y))
    errs = [_rel(got, flat(make(damping=rho).natural_gradient(net, x, y))) for rho in (1e-10, 1e-12)]
    assert errs[1] < 1e-5
    assert errs[1] < 0.05 * errs[0] or errs[0] < 1e-9  # the gap closes linearly in ρ


def test_standard_and_ntk_parameterizations_give_the_same_function_space_step():
    x, _y = _data(5, 6, 1)
    for make in FISHERS[:5]:
        outs = []
        for par in ("ntk", "standard"):
            net = nat.MLP([6, 12, 11, 1], activation="tanh", sigma_b2=0.3, parameterization=par, dtype=torch.float64)
            fisher = make(damping=0.0)
            tb = fisher.coefficient(net, x)
            outs.append(tb)
        assert _rel(outs[0], outs[1]) < 1e-7, make


@pytest.mark.parametrize("route", ["input_first", "output_first", "middle"])
@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_kfac_update_is_the_same_in_every_product_order(route, c, shape):
    """The damped K-FAC update multiplies (B* + ρ)^{-1} Δ^T, R and a (A* + ρ)^{-1} in the cheapest
    order; every order (input side first, output side first, the N·C × N middle first) must give the
    explicit (G + ρI)^{-1} ∇L."""
    widths, n = shape
    fisher = F.KFAC(damping=1e-3, product_order=route)
    net = _net(widths, c, True)
    x, y = _data(n, widths[0], c)
    g = _explicit(fisher, net, x, None)
    grad = jacobian(net, x).T @ (net(x) - y).reshape(-1) / n
    assert _rel(flat(fisher.natural_gradient(net, x, y)), torch.linalg.solve(g, grad)) < TOL


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("ends", ["positive", "negative", "zero"])
def test_block_tridiagonal_elimination_matches_the_whole_system(depth, ends):
    """The O(L K³) block elimination of a tri-diagonal Σ against the dense (L·K)³ solve, with
    non-symmetric blocks (Λ Θ_l) and a Σ with zero, negative and unequal entries; the end layers are
    eliminated first unless their diagonal entry is zero."""
    g = torch.Generator().manual_seed(depth)
    k = 7
    s = torch.diag(1.0 + torch.rand(depth, generator=g, dtype=torch.float64))
    if depth > 1:
        s[0, 0] = s[-1, -1] = {"positive": 1.3, "negative": -0.8, "zero": 0.0}[ends]
    off = torch.randn(depth - 1, generator=g, dtype=torch.float64)
    off[2::3] = 0.0  # decoupled neighbours
    s = s + torch.diag(off, 1) + torch.diag(off, -1)
    j = torch.randn(depth, k, 3 * k, generator=g, dtype=torch.float64)
    lam = torch.randn(k, k, generator=g, dtype=torch.float64)
    left = (lam @ lam.T + torch.eye(k, dtype=torch.float64)) @ (j @ j.mT / k)
    rhs = torch.randn(k, 2, generator=g, dtype=torch.float64)
    big = (s[:, None, :, None] * left.permute(1, 0, 2)[None]).reshape(depth * k, depth * k)
    big = big + 1e-3 * torch.eye(depth * k, dtype=torch.float64)
    want = torch.linalg.solve(big, rhs.repeat(depth, 1))
    got = torch.cat(TridiagonalSystem(s, left, 1e-3, symmetric=False, options=F.SolverOptions()).solve(rhs))
    assert _rel(got, want) < 1e-10
    theta = j @ j.mT / k  # symmetric PSD blocks: the end layers by Cholesky
    big = (s[:, None, :, None] * theta.permute(1, 0, 2)[None]).reshape(depth * k, depth * k)
    want = torch.linalg.solve(big + 1e-3 * torch.eye(depth * k, dtype=torch.float64), rhs.repeat(depth, 1))
    got = torch.cat(TridiagonalSystem(s, theta, 1e-3, symmetric=True, options=F.SolverOptions()).solve(rhs))
    assert _rel(got, want) < 1e-10


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_block_tridiagonal_mixed_precision_refinement(depth):
    """Large float64 blocks are factored in float32 and refined: the solution agrees with the float64
    elimination to float64 rounding (certified backward error); a system too ill-conditioned for a
    float32 factorization (ρ = 1e-12 on rank-deficient blocks) is refused by the certificate and
    falls back to the float64 factorization."""
    g = torch.Generator().manual_seed(10 + depth)
    k = 40
    s = nat.fisher.tridiagonal_sigma(depth)
    float64_only = F.SolverOptions(tridiagonal_refine_min_rows=10**9)
    refined = F.SolverOptions(tridiagonal_refine_min_rows=0)
    for rank, damping, fallback in [(3 * k, 1e-3, False), (k // 2, 1e-12, True)]:
        j = torch.randn(depth, k, rank, generator=g, dtype=torch.float64)
        theta = j @ j.mT / rank
        rhs = torch.randn(k, 1, generator=g, dtype=torch.float64)
        big = (s[:, None, :, None] * theta.permute(1, 0, 2)[None]).reshape(depth * k, depth * k)
        want = torch.linalg.solve(big + damping * torch.eye(depth * k, dtype=torch.float64), rhs.repeat(depth, 1))
        direct = torch.cat(TridiagonalSystem(s, theta, damping, symmetric=True, options=float64_only).solve(rhs))
        system = TridiagonalSystem(s, theta, damping, symmetric=True, options=refined)
        got = torch.cat(system.solve(rhs))
        assert dict(system.routes) == ({"tridiagonal": 1} if fallback else {"tridiagonal refined": 1})
        if fallback:  # the float64 elimination itself
            assert torch.equal(got, direct)
        else:
            assert _rel(got, direct) < 1e-12
            assert _rel(got, want) < 1e-10


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_block_tridiagonal_refined_update_matches_explicit(loss):
    """The tri-diagonal Fisher's update through the float32 factorization and float64 refinement
    (forced at this small size) against the explicit P × P Fisher, MSE and cross-entropy (the
    whitened blocks Λ^½ Θ_l Λ^½)."""
    widths, n = SHAPES[0]
    c = 2
    lossf = nat.losses.CrossEntropy(output_damping=0.05) if loss == "ce" else nat.losses.MSE()
    fisher = F.BlockTriDiagonal(damping=1e-3, loss=lossf, options=F.SolverOptions(tridiagonal_refine_min_rows=0))
    net = _net(widths, c, True, activation="relu")
    x, y = _data(n, widths[0], c, loss=loss)
    f = net(x).detach()
    lam = ce_metric(f, 0.05) if loss == "ce" else None
    g = _explicit(fisher, net, x, lam)
    grad = jacobian(net, x).T @ (ce_residual(f, y) if loss == "ce" else f - y).reshape(-1) / n
    bound = fisher.at(net, x)
    assert _rel(flat(bound.natural_gradient(y)), torch.linalg.solve(g, grad)) < TOL
    assert dict(bound.routes) == {"tridiagonal refined": 1}  # certified without the float64 factorization


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("sigma_b2", [0.0, 0.5])
def test_unitwise_cg_update_agrees_with_the_direct_one(loss, sigma_b2):
    """solver="cg" (all units of a layer at once, one product per iteration) against the Cholesky
    route on a ReLU net with hundreds of units: agreement to about tol; the default "auto" (certified
    backward error) to rounding; with maxiter=1 every unit falls back to Cholesky and the update is
    the direct one."""
    net = nat.MLP([20, 96, 80, 3], activation="relu", sigma_b2=sigma_b2, seed=3, dtype=torch.float64)
    x, y = _data(30, 20, 3, loss=loss)
    kw = {"damping": 1e-3, "loss": nat.losses.CrossEntropy(output_damping=0.05) if loss == "ce" else "mse"}
    direct = flat(F.Unitwise(solver="direct", **kw).natural_gradient(net, x, y))
    cg_bound, auto_bound = F.Unitwise(solver="cg", tol=1e-12, **kw).at(net, x), F.Unitwise(**kw).at(net, x)
    cg, auto = flat(cg_bound.natural_gradient(y)), flat(auto_bound.natural_gradient(y))
    assert cg_bound.routes["cg fallback"] == auto_bound.routes["cg fallback"] == 0  # conjugate gradients alone
    assert _rel(cg, direct) < 1e-8
    assert _rel(auto, direct) < 1e-12
    loose = flat(F.Unitwise(solver="cg", tol=1e-4, **kw).natural_gradient(net, x, y))
    assert 1e-12 < _rel(loose, direct) < 1e-2  # the tolerance is what it says, not a no-op
    for solver in ("cg", "auto"):
        one = flat(F.Unitwise(solver=solver, maxiter=1, **kw).natural_gradient(net, x, y))
        assert _rel(one, direct) < 1e-12
    seven = F.SolverOptions(cg_elements=30 * 7)  # seven units per pass
    assert _rel(flat(F.Unitwise(options=seven, **kw).natural_gradient(net, x, y)), direct) < 1e-12


def test_unitwise_auto_solver_falls_back_where_it_cannot_certify():
    """At a tiny damping some units' systems are too ill-conditioned for the backward-error
    certificate; those (and only those) go through Cholesky, and the update matches the direct one."""
    net = nat.MLP([20, 96, 80, 3], activation="relu", sigma_b2=0.5, seed=3, dtype=torch.float64)
    x, y = _data(30, 20, 3)
    direct = flat(F.Unitwise(damping=1e-8, solver="direct").natural_gradient(net, x, y))
    bound = F.Unitwise(damping=1e-8).at(net, x)
    auto = flat(bound.natural_gradient(y))
    assert 0 < bound.routes["cg fallback"] < 96 + 80
    assert _rel(auto, direct) < 1e-9


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_unitwise_cg_units_converged_but_not_certified_take_the_direct_route(loss):
    """A certificate stricter than the one float64 arithmetic can meet (``certify`` = 1e-3 of the
    bound): conjugate gradients converge (their recursive residual keeps falling) but the true residual
    of a unit stays above the bound, so every such unit is solved again directly, each under its own
    id: the update equals the direct one and the reference route's."""
    net = nat.MLP([20, 48, 40, 3], activation="relu", sigma_b2=0.5, seed=5, dtype=torch.float64)
    x, y = _data(30, 20, 3, loss=loss)
    kw = {"damping": 1e-3, "loss": nat.losses.CrossEntropy(output_damping=0.05) if loss == "ce" else "mse"}
    reference = flat(F.Unitwise(solver="reference", **kw).natural_gradient(net, x, y))
    direct = flat(F.Unitwise(solver="direct", **kw).natural_gradient(net, x, y))
    assert _rel(direct, reference) < 1e-12
    strict = F.SolverOptions(certify=1e-3, cg_elements=30 * 5)  # five units per pass: ids across passes
    bound = F.Unitwise(options=strict, **kw).at(net, x)
    got = flat(bound.natural_gradient(y))
    assert bound.routes["cg fallback"] > 0
    assert _rel(got, direct) < 1e-12


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"solver": "lu", "damping": 1e-3}, "solver"),
        ({"solver": "auto", "damping": 1e-3, "maxiter": 2.5}, "maxiter"),
        ({"solver": "cg", "damping": 0.0}, "solver"),
        ({"solver": "cg", "damping": 1e-3, "tol": 0.0}, "tol"),
        ({"solver": "cg", "damping": 1e-3, "maxiter": 0}, "maxiter"),
    ],
)
def test_unitwise_solver_options_are_checked(kw, word):
    with pytest.raises(ValueError, match=word):
        F.Unitwise(**kw)


@pytest.mark.parametrize("rank", [40, 25])
def test_zero_damping_inverse_is_the_pseudo_inverse_by_either_route(rank):
    """At ρ = 0 a kernel far from singular is inverted by Cholesky, a singular one by the
    eigendecomposition's pseudo-inverse; both equal the pseudo-inverse."""
    from natural_tangents.linalg import psd

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(40, rank, generator=g, dtype=torch.float64)
    a = x @ x.T
    got = psd.inverse_psd(a, 0.0)
    want = torch.linalg.pinv(a, hermitian=True)
    assert _rel(got, want) < 1e-9
    assert (psd.cholesky_if_nonsingular(a) is not None) == (rank == 40)
    b = torch.randn(40, 3, generator=g, dtype=torch.float64)
    assert _rel(psd.solve_psd(a, b), want @ b) < 1e-9


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("c", [1, 2])
def test_kfac_zero_damping_update_by_factors_matches_the_pseudo_inverses(shape, c):
    """At ρ = 0 the K-FAC update through Cholesky factors (taken only when the factors are far from
    singular, the eigendecomposition's pseudo-inverse otherwise) equals the explicit pseudo-inverse of
    B* ⊗ A*, in every product order."""
    widths, n = shape
    net = _net(widths, c, True)
    x, y = _data(n, widths[0], c)
    fisher = F.KFAC(damping=0.0, warn=False)
    want = torch.linalg.pinv(_explicit(fisher, net, x, None), hermitian=True) @ (
        jacobian(net, x).T @ (net(x) - y).reshape(-1) / n
    )
    for order in ("auto", "input_first", "output_first"):
        got = flat(F.KFAC(damping=0.0, warn=False, product_order=order).natural_gradient(net, x, y))
        assert _rel(got, want.detach()) < 1e-8, order


def test_kfac_float32_network_factors_in_float32_with_a_float64_fallback():
    """A float32 network's N × N K-FAC factors are factored in float32 (they are applied in float32),
    and the update agrees with the float64 network's to float32 accuracy; a kernel too singular for a
    float32 Cholesky (duplicated samples, ρ = 1e-10), or a float32 Gram with an overflowed entry, is
    formed and factored in float64 instead."""
    net64 = nat.MLP([6, 40, 40, 1], activation="relu", sigma_b2=0.5, seed=2, dtype=torch.float64)
    net32 = nat.MLP([6, 40, 40, 1], activation="relu", sigma_b2=0.5, seed=2, dtype=torch.float32)
    x, y = _data(20, 6, 1)
    fisher = F.KFAC(damping=1e-3)
    want = flat(fisher.natural_gradient(net64, x, y))
    got = flat(fisher.natural_gradient(net32, x.float(), y.float())).double()
    assert _rel(got, want) < 1e-4
    a = torch.randn(12, 30, generator=torch.Generator().manual_seed(0))
    batch = fisher.at(net32, x.float())
    assert batch.factor_side(a, 1 / 12).dual.chol.dtype == torch.float32
    dup = torch.cat([a, a])  # a singular kernel
    chol = F.KFAC(damping=1e-10).at(net32, x.float()).factor_side(dup, 1 / 24).dual.chol
    assert chol.dtype == torch.float64
    k = (dup.double() @ dup.double().T) / 24 + 1e-10 * torch.eye(24, dtype=torch.float64)
    assert _rel(chol @ chol.T, k) < 1e-12
    big = a.clone()
    big[-1] *= 1e19  # only the last diagonal entry of the float32 Gram overflows: info = 0, L_NN = inf
    chol = batch.factor_side(big, 1 / 12).dual.chol
    assert chol.dtype == torch.float64 and bool(torch.isfinite(chol).all())
