"""Closed-form linearized dynamics (S.26) against step-by-step iteration, the B.4 minimum-norm
solution against explicit P × P linear algebra on torch.func Jacobians, and the closed form
against real NGD training of wide networks for every Fisher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

import natural_tangents as nat
from natural_tangents import dynamics, fisher, theory

F64 = torch.float64


def _psd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank or n, generator=g, dtype=F64)
    return a @ a.T / n


def _iterate(k_train, k_test, y, f0, f0t, lr, steps):
    """The recursion f_{t+1} = f_t − η K(·, x)(f_t(x) − y), step by step (flat vectors)."""
    f, ft = f0.clone(), f0t.clone()
    out, out_t = [f.clone()], [ft.clone()]
    for _ in range(steps):
        r = f - y
        f, ft = f - lr * k_train @ r, ft - lr * k_test @ r
        out.append(f.clone())
        out_t.append(ft.clone())
    return torch.stack(out), torch.stack(out_t)


# ------------------------------------------------------------------------------ closed form
@pytest.mark.parametrize("rank", [None, 5])  # full rank and singular K(x, x)
def test_closed_form_matches_iteration_single_output(rank):
    n, nt = 9, 4
    g = torch.Generator().manual_seed(1)
    big = _psd(n + nt, 0, rank)
    k, kt = big[:n, :n], big[n:, :n]
    y, f0, f0t = (torch.randn(m, generator=g, dtype=F64) for m in (n, n, nt))
    lr = 1.5 / float(torch.linalg.eigvalsh(k)[-1])  # 0 < ηλ < 2: converging but oscillating modes
    dyn = dynamics.ngd(k, y, f0, lr, kt, f0t)
    steps = [0, 1, 2, 5, 17, 40]
    ref, ref_t = _iterate(k, kt, y, f0, f0t, lr, 40)
    assert torch.allclose(dyn.train(steps), ref[steps], atol=1e-11)
    assert torch.allclose(dyn.test(steps), ref_t[steps], atol=1e-11)
    assert torch.allclose(dyn.train(5), ref[5], atol=1e-12)  # a single step gives no leading axis
    loss = 0.5 * ((ref[steps] - y) ** 2).sum(-1) / n
    assert torch.allclose(dyn.loss(steps), loss, atol=1e-12)
    train, test = dyn(3)
    assert torch.allclose(train, ref[3]) and torch.allclose(test, ref_t[3])


def test_closed_form_matches_iteration_multi_output():
    n, nt, c = 6, 3, 2
    g = torch.Generator().manual_seed(2)
    big = _psd((n + nt) * c, 3)  # flat sample-major kernel of (N + N′) samples with C outputs
    k4 = big.reshape(n + nt, c, n + nt, c).movedim(2, 1)  # (N+N′, N+N′, C, C)
    k, kt = k4[:n, :n], k4[n:, :n]
    y, f0, f0t = (
        torch.randn(n, c, generator=g, dtype=F64),
        torch.randn(n, c, generator=g, dtype=F64),
        torch.zeros(nt, c, dtype=F64),
    )
    lr = 0.7
    dyn = dynamics.gd(k, y, f0, lr, kt, f0t)
    flat = big[: n * c, : n * c], big[n * c :, : n * c]
    ref, ref_t = _iterate(*flat, y.reshape(-1), f0.reshape(-1), f0t.reshape(-1), lr, 12)
    assert dyn.train(range(13)).shape == (13, n, c)
    assert torch.allclose(dyn.train(range(13)).reshape(13, -1), ref, atol=1e-11)
    assert torch.allclose(dyn.test(range(13)).reshape(13, -1), ref_t, atol=1e-11)


def test_isotropic_coefficient_with_lr_one_over_alpha_converges_in_one_step():
    n, alpha = 7, 3.0
    g = torch.Generator().manual_seed(4)
    y, f0 = torch.randn(n, 1, generator=g, dtype=F64), torch.randn(n, 1, generator=g, dtype=F64)
    dyn = dynamics.ngd(alpha * torch.eye(n, dtype=F64), y, f0, 1 / alpha)
    assert torch.allclose(dyn.train(1), y, atol=1e-14) and float(dyn.loss(1)) < 1e-28
    half = dynamics.ngd(alpha * torch.eye(n, dtype=F64), y, f0, 0.5 / alpha)
    assert torch.allclose(half.train(4) - y, (0.5**4) * (f0 - y), atol=1e-14)  # (1 − ηα)^t


def test_gd_on_a_linear_model_is_exact():
    """A depth-1 network is linear in its parameters: plain GD with rate η follows the closed form
    with Θ = J J^T / N = nat.empirical_ntk(net, x) / N exactly."""
    n, m0 = 8, 5
    g = torch.Generator().manual_seed(5)
    x, xt = torch.randn(n, m0, generator=g, dtype=F64), torch.randn(3, m0, generator=g, dtype=F64)
    y = torch.randn(n, 1, generator=g, dtype=F64)
    net = nat.MLP([m0, 1], activation="relu", sigma_w2=1.0, sigma_b2=0.5, seed=0, dtype=F64)
    with torch.no_grad():
        f0, f0t = net(x), net(xt)
    dyn = dynamics.gd(nat.empirical_ntk(net, x) / n, y, f0, 0.3, nat.empirical_ntk(net, xt, x) / n, f0t)
    hist = nat.train(net, x, y, method="gd", lr=0.3, steps=6, x_test=xt, y_test=torch.zeros(3, 1, dtype=F64))
    assert torch.allclose(torch.from_numpy(np.stack(hist.f_train)), dyn.train(range(7)), atol=1e-12)
    assert torch.allclose(torch.from_numpy(np.stack(hist.f_test)), dyn.test(range(7)), atol=1e-12)


def test_bad_arguments():
    k, y = _psd(4, 6), torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match="theta_bar_train: must be symmetric"):
        dynamics.ngd(k + torch.triu(torch.ones(4, 4, dtype=F64), 1), y, y, 1.0)
    with pytest.raises(ValueError, match="f0_train"):
        dynamics.ngd(k, y, torch.zeros(5, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="lr"):
        dynamics.ngd(k, y, y, -1.0)
    with pytest.raises(ValueError, match="theta_bar_test, f0_test"):
        dynamics.ngd(k, y, y, 1.0, theta_bar_test=k)
    with pytest.raises(ValueError, match="theta_bar_test: expected shape"):
        dynamics.ngd(k, y, y, 1.0, torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=F64))
    dyn = dynamics.ngd(k, y, y, 1.0)
    with pytest.raises(ValueError, match="steps"):
        dyn.train([1, 2.5])
    with pytest.raises(ValueError, match="steps"):
        dyn.train(-1)
    with pytest.raises(ValueError, match="theta_bar_test"):
        dyn.test(1)
    bad = k.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="theta_bar_train: contains 1 NaN"):
        dynamics.ngd(bad, y, y, 1.0)


# ------------------------------------------------------------------------------ min norm
def _tiny_problem(seed: int = 0):
    """A tiny network (P = 151), its explicit Jacobian from torch.func, targets, test inputs."""
    n, nt, m0, m = 10, 4, 6, 10
    g = torch.Generator().manual_seed(seed)
    x, xt = torch.randn(n, m0, generator=g, dtype=F64), torch.randn(nt, m0, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    net = nat.MLP([m0, m, m, 1], activation="tanh", sigma_w2=2.0, sigma_b2=0.3, seed=seed, dtype=F64)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def jac(inputs):
        j = jacrev(lambda p: functional_call(net, p, (inputs,)).reshape(-1))(params)
        return torch.cat([j[k].reshape(inputs.shape[0], -1) for k in params], dim=1)

    return jac(x), jac(xt), y


def test_min_norm_with_lambda_matches_the_explicit_p_by_p_solve():
    j, jt, y = _tiny_problem(0)
    n, p = j.shape
    g = _psd(p, 7) + 0.1 * torch.eye(p, dtype=F64)  # any SPD metric
    for lam in (1.0, 1e-3):
        ref = torch.linalg.solve(lam * g + j.T @ j / n, j.T @ y / n)  # (S.125)
        sol = dynamics.min_norm(j, y, g, lam=lam, jacobian_test=jt)
        assert torch.allclose(sol.params, ref, rtol=1e-8, atol=1e-10)
        assert torch.allclose(sol.test, jt @ ref, rtol=1e-8, atol=1e-10)


def test_min_norm_limit_is_where_exact_ngd_converges():
    """B.4: lim_{λ→0} θ*_λ = the point NGD with G_0 = J^T J / N + ρI converges to (linearized model,
    parameter space, explicit P × P G and its inverse)."""
    j, jt, y = _tiny_problem(1)
    n, p = j.shape
    g = j.T @ j / n + 1e-4 * torch.eye(p, dtype=F64)
    lim = dynamics.min_norm(j, y, g, jacobian_test=jt)
    assert torch.allclose(lim.train, y, atol=1e-9)  # interpolates
    # θ*_λ → the limit, linearly in λ
    gaps = [float((torch.linalg.solve(lam * g + j.T @ j / n, j.T @ y / n) - lim.params).norm()) for lam in (1e-3, 1e-5)]
    assert gaps[1] < gaps[0] / 50 and gaps[1] < 1e-3 * float(lim.params.norm())
    # explicit NGD iteration θ ← θ − η G^{-1} ∇L in parameter space from θ = 0, η = 1
    precond = torch.linalg.inv(g) @ j.T / n  # G^{-1} J^T / N, (P, N)
    theta = torch.zeros(p, dtype=F64)
    for _ in range(60):
        theta = theta - precond @ (j @ theta - y)
    assert torch.allclose(theta, lim.params, atol=1e-8)
    assert torch.allclose(jt @ theta, lim.test, atol=1e-8)
    # with G = I: the minimum Euclidean norm interpolant (pseudo-inverse)
    assert torch.allclose(dynamics.min_norm(j, y).params, torch.linalg.pinv(j) @ y, atol=1e-9)


def test_min_norm_errors():
    j, _, y = _tiny_problem(2)
    with pytest.raises(ValueError, match="metric: G must be symmetric positive definite"):
        dynamics.min_norm(j, y, torch.zeros(j.shape[1], j.shape[1], dtype=F64))
    with pytest.raises(ValueError, match="targets"):
        dynamics.min_norm(j, y[:3])
    with pytest.raises(ValueError, match="lam"):
        dynamics.min_norm(j, y, lam=-1.0)
    with pytest.raises(ValueError, match="jacobian: J G"):
        dynamics.min_norm(torch.cat([j, j]), torch.cat([y, y]))


# --------------------------------------------------------------------- real NGD training


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize(
    "fish, width",
    [
        (fisher.Exact(), 1024),
        (fisher.BlockDiagonal(), 1024),
        (fisher.BlockTriDiagonal(), 1024),
        (fisher.KFAC(), 4096),
        # Condition 2 needs ρ > 0 for unit-wise NGD (Lemma C.3); at ρ = 0 the 1/δ_{l,i} of units with
        # tiny backward signals take the step out of the linear regime (25% off on test points)
        (fisher.Unitwise(damping=1e-7), 1024),
    ],
)
def test_closed_form_tracks_real_ngd_training(fish, width, scale, unit_inputs):
    """η = scale/α with the theoretical α: ||f_t − f_t^lin|| / ||f_0 − y|| ≤ 0.05 on the training and
    test inputs for t ≤ 5 (erf, σ_b² = 0, L = 3, N = 32, M_0 = 64). K-FAC's steps are the least
    linear (8% at M = 1024, 3% at 4096), so it runs wider."""
    n, nt, m0 = 32, 8, 64
    x, xt = unit_inputs(n, m0, 0), unit_inputs(nt, m0, 1)
    g = torch.Generator().manual_seed(5)
    y = torch.sign(torch.randn(n, 1, generator=g, dtype=F64))
    yt = torch.sign(torch.randn(nt, 1, generator=g, dtype=F64))
    widths = [m0, width, width, 1]
    net = nat.MLP(widths, activation="erf", sigma_w2=2.0, sigma_b2=0.0, seed=0, dtype=F64)
    alpha = theory.alpha(fish, widths=widths, activation="erf", sigma_w2=2.0, sigma_b2=0.0, n_train=n)
    with torch.no_grad():
        f0, f0t = net(x), net(xt)
    lin = dynamics.ngd(fish.coefficient(net, x), y, f0, scale / alpha, fish.coefficient(net, x, xt), f0t)
    hist = nat.train(net, x, y, method=fish, lr=scale / alpha, steps=5, x_test=xt, y_test=yt)
    size = float((f0 - y).norm())
    err = (torch.from_numpy(np.stack(hist.f_train)) - lin.train(range(6))).flatten(1).norm(dim=1) / size
    err_t = (torch.from_numpy(np.stack(hist.f_test)) - lin.test(range(6))).flatten(1).norm(dim=1) / size
    assert float(err.max()) <= 0.05 and float(err_t.max()) <= 0.05, (err, err_t)
    assert hist.train_loss[-1] < 0.1 * hist.train_loss[0]  # and it does train
