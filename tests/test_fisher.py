"""The interface every Fisher shares (fisher/base.py, nat.fisher.get): every dual-form Fisher against
the explicit parameter-space route on tiny networks (float64), its argument checks, and the exact
Fisher's update on a LeNet-style CNN through torch.func.

The update must equal (G + ρI)^{-1} ∇L and Θ̄(x′, x) must equal J(x′) G^{-1} J(x)^T / N with G built
as a P × P matrix from torch.func Jacobians, to relative error ≤ 1e-8. Each Fisher's own routes are
tested in its file (test_layerwise.py, test_kfac.py, test_unitwise.py).
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

import natural_tangents as nat
from _explicit import ce_metric, ce_residual, explicit_fisher_of, explicit_signals, flat, jacobian
from _nets import FISHERS as EVERY_FISHER
from _nets import SHAPES, lenet, tiny_data, tiny_mlp

TOL = 1e-8


def _explicit(fisher, net, x, lam):
    return explicit_fisher_of(fisher, net, x, net.depth, explicit_signals, lam=lam)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


FISHERS = [
    *EVERY_FISHER,
    lambda **kw: nat.fisher.Layerwise(sigma=torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]]), **kw),
    lambda **kw: nat.fisher.KFAC(bias="block", **kw),
    lambda **kw: nat.fisher.Unitwise(solver="cg", tol=1e-13, **kw),
    lambda **kw: nat.fisher.Unitwise(solver="direct", **kw),
]


@pytest.mark.parametrize("make", FISHERS)
@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("damping", [1e-3, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_mse_update_and_coefficient_match_explicit(make, c, bias, damping, shape):
    widths, n = shape
    fisher = make(damping=damping)
    net = tiny_mlp(widths, c, bias)
    x, y = tiny_data(n, widths[0], c)
    x_test, _ = tiny_data(3, widths[0], c, seed=7)
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
        got_tb = nat.fisher.flatten_coefficient(fisher.coefficient(net, x, None if xt is x else xt))
        assert got_tb.shape == want_tb.shape
        assert _rel(got_tb, want_tb) < TOL


@pytest.mark.parametrize("make", FISHERS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_update_and_coefficient_match_explicit(make, c, shape):
    widths, n = shape
    loss = nat.losses.CrossEntropy(output_damping=0.05)
    fisher = make(damping=0.1, loss=loss)
    net = tiny_mlp(widths, c, True, activation="relu")
    x, y = tiny_data(n, widths[0], c, loss="ce")
    f = net(x).detach()
    lam = ce_metric(f, 0.05)
    j = jacobian(net, x)
    g = _explicit(fisher, net, x, lam)
    grad = j.T @ ce_residual(f, y).reshape(-1) / n
    want = torch.linalg.solve(g, grad)
    assert _rel(flat(fisher.natural_gradient(net, x, y)), want) < TOL
    want_tb = j @ torch.linalg.solve(g, j.T) / n
    assert _rel(nat.fisher.flatten_coefficient(fisher.coefficient(net, x)), want_tb) < TOL
    want_alpha = torch.diagonal(want_tb @ torch.block_diag(*lam)).mean()
    assert fisher.alpha_hat(net, x) == pytest.approx(float(want_alpha), rel=1e-8)


@pytest.mark.parametrize("make", [nat.fisher.Exact, nat.fisher.BlockDiagonal, nat.fisher.KFAC, nat.fisher.Unitwise])
def test_zero_damping_is_the_limit_of_small_damping(make):
    """ρ = 0 (pseudo-inverse route) equals the damped explicit solution as ρ → 0⁺."""
    net = tiny_mlp((6, 12, 11), 1, True)
    x, y = tiny_data(5, 6, 1)
    got = flat(make(damping=0.0).natural_gradient(net, x, y))
    errs = [_rel(got, flat(make(damping=rho).natural_gradient(net, x, y))) for rho in (1e-10, 1e-12)]
    assert errs[1] < 1e-5
    assert errs[1] < 0.05 * errs[0] or errs[0] < 1e-9  # the gap closes linearly in ρ


def test_standard_and_ntk_parameterizations_give_the_same_function_space_step():
    x, _y = tiny_data(5, 6, 1)
    for make in FISHERS[:5]:
        outs = []
        for par in ("ntk", "standard"):
            net = nat.MLP([6, 12, 11, 1], activation="tanh", sigma_b2=0.3, parameterization=par, dtype=torch.float64)
            fisher = make(damping=0.0)
            tb = fisher.coefficient(net, x)
            outs.append(tb)
        assert _rel(outs[0], outs[1]) < 1e-7, make


def _small(seed=0, n=12, m0=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m0, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda net, x, y: nat.fisher.Exact().natural_gradient(net, x, y[:5]), "y: expected targets of shape"),
        (
            lambda net, x, y: nat.fisher.Exact().natural_gradient(net, x, torch.full_like(y, float("nan"))),
            "y: contains",
        ),
        (lambda net, x, y: nat.fisher.Exact(damping=-1.0), "damping: must be a finite number >= 0"),
        (lambda net, x, y: nat.fisher.KFAC(damping=float("nan")), "damping"),
        (lambda net, x, y: nat.fisher.Exact(loss="hinge"), "loss: unknown loss"),
        (lambda net, x, y: nat.fisher.Exact().natural_gradient(net, x[:, :3], y), "x: expected 6 features"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    x, y = _small()
    net = nat.MLP([6, 16, 16, 1], dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        call(net, x, y)


def test_fisher_lookup_by_name():
    assert isinstance(nat.fisher.get("block-diagonal"), nat.fisher.BlockDiagonal)
    assert isinstance(nat.fisher.get("kfac", damping=1e-3), nat.fisher.KFAC)
    assert nat.fisher.get("unitwise", damping=2.0).damping == 2.0


def test_exact_update_solves_the_damped_fisher_system_through_torch_func(mnist_300):
    """(J^T Λ J / N + ρ I) Δ = ∇L on a LeNet-style CNN with MNIST images, with J Δ by jvp, J^T u by
    vjp and ∇L by autograd (float64): J is never formed by the library."""
    x, y = mnist_300[0][:12].double(), mnist_300[1][:12]
    model = lenet(torch.float64)
    rho, out_damping = 1e-2, 1e-3
    loss = nat.losses.CrossEntropy(output_damping=out_damping)
    delta = nat.fisher.Exact(damping=rho, loss=loss).natural_gradient(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    f_of = lambda *ps: functional_call(model, dict(zip(names, ps)), (x,))  # noqa: E731
    f, jd = jvp(f_of, params, tuple(delta))  # J Δ, (N, C)
    s = torch.softmax(f, 1)
    lam = torch.diag_embed(s) - s[:, :, None] * s[:, None, :] + out_damping * torch.eye(10, dtype=s.dtype)
    _, back = vjp(f_of, *params)
    g_delta = back(torch.einsum("nkj,nj->nk", lam, jd) / x.shape[0])
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    lhs = torch.cat([(gd + rho * d).reshape(-1) for gd, d in zip(g_delta, delta)])
    rhs = torch.cat([g.reshape(-1) for g in grads])
    torch.testing.assert_close(lhs, rhs, rtol=1e-7, atol=1e-9)
