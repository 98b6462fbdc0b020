"""The unit-wise Fisher (fisher/unitwise.py): its solvers — conjugate gradients for all units of a
layer at once, the certified "auto" route with its fallback to Cholesky, the direct and the
reference routes — against each other, and their options. The update and Θ̄ against the explicit
P × P Fisher are in test_fisher.py; the batched support systems behind the fast routes in
test_linalg_unit_systems.py and test_linalg_support.py."""

import pytest
import torch

import natural_tangents as nat
from _explicit import flat
from _nets import tiny_data


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("sigma_b2", [0.0, 0.5])
def test_unitwise_cg_update_agrees_with_the_direct_one(loss, sigma_b2):
    """solver="cg" (all units of a layer at once, one product per iteration) against the Cholesky
    route on a ReLU net with hundreds of units: agreement to about tol; the default "auto" (certified
    backward error) to rounding; with maxiter=1 every unit falls back to Cholesky and the update is
    the direct one."""
    net = nat.MLP([20, 96, 80, 3], activation="relu", sigma_b2=sigma_b2, seed=3, dtype=torch.float64)
    x, y = tiny_data(30, 20, 3, loss=loss)
    kw = {"damping": 1e-3, "loss": nat.losses.CrossEntropy(output_damping=0.05) if loss == "ce" else "mse"}
    direct = flat(nat.fisher.Unitwise(solver="direct", **kw).natural_gradient(net, x, y))
    cg_bound, auto_bound = (
        nat.fisher.Unitwise(solver="cg", tol=1e-12, **kw).at(net, x),
        nat.fisher.Unitwise(**kw).at(net, x),
    )
    cg, auto = flat(cg_bound.natural_gradient(y)), flat(auto_bound.natural_gradient(y))
    assert cg_bound.routes["cg fallback"] == auto_bound.routes["cg fallback"] == 0  # conjugate gradients alone
    assert _rel(cg, direct) < 1e-8
    assert _rel(auto, direct) < 1e-12
    loose = flat(nat.fisher.Unitwise(solver="cg", tol=1e-4, **kw).natural_gradient(net, x, y))
    assert 1e-12 < _rel(loose, direct) < 1e-2  # the tolerance is what it says, not a no-op
    for solver in ("cg", "auto"):
        one = flat(nat.fisher.Unitwise(solver=solver, maxiter=1, **kw).natural_gradient(net, x, y))
        assert _rel(one, direct) < 1e-12
    seven = nat.fisher.SolverOptions(cg_elements=30 * 7)  # seven units per pass
    assert _rel(flat(nat.fisher.Unitwise(options=seven, **kw).natural_gradient(net, x, y)), direct) < 1e-12


def test_unitwise_auto_solver_falls_back_where_it_cannot_certify():
    """At a tiny damping some units' systems are too ill-conditioned for the backward-error
    certificate; those (and only those) go through Cholesky, and the update matches the direct one."""
    net = nat.MLP([20, 96, 80, 3], activation="relu", sigma_b2=0.5, seed=3, dtype=torch.float64)
    x, y = tiny_data(30, 20, 3)
    direct = flat(nat.fisher.Unitwise(damping=1e-8, solver="direct").natural_gradient(net, x, y))
    bound = nat.fisher.Unitwise(damping=1e-8).at(net, x)
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
    x, y = tiny_data(30, 20, 3, loss=loss)
    kw = {"damping": 1e-3, "loss": nat.losses.CrossEntropy(output_damping=0.05) if loss == "ce" else "mse"}
    reference = flat(nat.fisher.Unitwise(solver="reference", **kw).natural_gradient(net, x, y))
    direct = flat(nat.fisher.Unitwise(solver="direct", **kw).natural_gradient(net, x, y))
    assert _rel(direct, reference) < 1e-12
    strict = nat.fisher.SolverOptions(certify=1e-3, cg_elements=30 * 5)  # five units per pass: ids across passes
    bound = nat.fisher.Unitwise(options=strict, **kw).at(net, x)
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
        nat.fisher.Unitwise(**kw)
