"""The unit-wise Fisher's systems, all units of a layer at once (linalg/unit_systems.py): the update
through the fast routes (refined support solves, the complement route, the primal route at ρ = 0 with
supports larger than the rank of the inputs; forced at small sizes by SolverOptions) against the
explicit P × P Fisher (its pseudo-inverse at ρ = 0) and the float64 route; the routes taken are read
from the bound Fisher's ``routes``. The support solves themselves are in test_linalg_support.py."""

import pytest
import torch

import natural_tangents as nat
from _explicit import ce_metric, ce_residual, explicit_fisher_of, explicit_signals, flat, jacobian

FORCED = nat.fisher.SolverOptions(refine_min_size=0)  # every update system through the mixed routes


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_unitwise_update_through_the_mixed_routes_matches_explicit(loss):
    net = nat.MLP([6, 40, 36, 2], activation="relu", sigma_w2=1.7, sigma_b2=0.4, seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    n = 12
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    lossf = nat.losses.CrossEntropy(output_damping=0.05) if loss == "ce" else nat.losses.MSE()
    y = torch.nn.functional.one_hot(torch.arange(n) % 2, 2).double() if loss == "ce" else torch.randn(n, 2, generator=g)
    fisher = nat.fisher.Unitwise(damping=1e-3, loss=lossf, solver="direct", options=FORCED)
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
    direct = nat.fisher.SolverOptions(refine_min_size=10**9, complement_fraction=1.0)  # float64 Cholesky only
    float64 = nat.fisher.Unitwise(damping=0.0, options=direct).at(net, x)
    want = flat(float64.natural_gradient(y))
    assert set(float64.routes) & {"refined", "complement"} == set()
    bound = nat.fisher.Unitwise(damping=0.0, options=FORCED).at(net, x)
    got = flat(bound.natural_gradient(y))
    assert bound.routes["complement"] > 0 and bound.routes["refined"] > 0 and bound.routes["direct"] == 0
    assert _rel(got, want) < 1e-10


# ------------------------------------------------------------------ ρ = 0 with supports larger than rank a


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
    fisher = nat.fisher.Unitwise(
        damping=0.0, loss=lossf, options=nat.fisher.SolverOptions(certify=0.0 if refuse else 1.0)
    )
    f = net(x).detach()
    lam = ce_metric(f, 0.05) if case[3] == "ce" else None
    pinv = torch.linalg.pinv(explicit_fisher_of(fisher, net, x, net.depth, explicit_signals, lam=lam), hermitian=True)
    j, jt = jacobian(net, x), jacobian(net, x_test)
    grad = j.T @ (ce_residual(f, y) if case[3] == "ce" else f - y).reshape(-1) / 12
    bound = fisher.at(net, x)
    assert _rel(flat(bound.natural_gradient(y)), pinv @ grad) < 1e-8
    assert bound.routes["primal"] > 0
    assert (bound.routes["primal pinv"] == bound.routes["primal"]) if refuse else bound.routes["primal pinv"] == 0
    assert _rel(nat.fisher.flatten_coefficient(fisher.coefficient(net, x, x_test)), jt @ pinv @ j.T / 12) < 1e-8
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
    fisher = nat.fisher.Unitwise(damping=0.0)
    pinv = torch.linalg.pinv(explicit_fisher_of(fisher, net, x, net.depth, explicit_signals), hermitian=True)
    grad = jacobian(net, x).T @ (net(x) - y).reshape(-1).detach() / 5
    assert _rel(flat(fisher.natural_gradient(net, x, y)), pinv @ grad) < 1e-8
