"""The layer-wise Fishers (fisher/layerwise.py: Layerwise with a pattern Σ, BlockDiagonal,
BlockTriDiagonal): the tri-diagonal Fisher's update through its refined elimination against the
explicit P × P Fisher, and the checks of Σ. The update and Θ̄ of every Fisher against the explicit
route are in test_fisher.py, the elimination itself in test_linalg_tridiagonal.py."""

import pytest
import torch

import natural_tangents as nat
from _explicit import ce_metric, ce_residual, explicit_fisher_of, explicit_signals, flat, jacobian
from _nets import SHAPES, tiny_data, tiny_mlp

TOL = 1e-8


def _explicit(fisher, net, x, lam):
    return explicit_fisher_of(fisher, net, x, net.depth, explicit_signals, lam=lam)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_block_tridiagonal_refined_update_matches_explicit(loss):
    """The tri-diagonal Fisher's update through the float32 factorization and float64 refinement
    (forced at this small size) against the explicit P × P Fisher, MSE and cross-entropy (the
    whitened blocks Λ^½ Θ_l Λ^½)."""
    widths, n = SHAPES[0]
    c = 2
    lossf = nat.losses.CrossEntropy(output_damping=0.05) if loss == "ce" else nat.losses.MSE()
    fisher = nat.fisher.BlockTriDiagonal(
        damping=1e-3, loss=lossf, options=nat.fisher.SolverOptions(tridiagonal_refine_min_rows=0)
    )
    net = tiny_mlp(widths, c, True, activation="relu")
    x, y = tiny_data(n, widths[0], c, loss=loss)
    f = net(x).detach()
    lam = ce_metric(f, 0.05) if loss == "ce" else None
    g = _explicit(fisher, net, x, lam)
    grad = jacobian(net, x).T @ (ce_residual(f, y) if loss == "ce" else f - y).reshape(-1) / n
    bound = fisher.at(net, x)
    assert _rel(flat(bound.natural_gradient(y)), torch.linalg.solve(g, grad)) < TOL
    assert dict(bound.routes) == {"tridiagonal refined": 1}  # certified without the float64 factorization


def _small(seed=0, n=12, m0=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m0, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda net, x, y: nat.fisher.Layerwise(sigma=torch.ones(2, 3)).natural_gradient(net, x, y),
            "sigma: expected",
        ),
        (
            lambda net, x, y: nat.fisher.Layerwise(
                sigma=torch.tensor([[1.0, 2, 0], [0, 1, 0], [0, 0, 1]])
            ).natural_gradient(net, x, y),
            "sigma: Σ must be a finite symmetric",
        ),
        (
            lambda net, x, y: nat.fisher.Layerwise(sigma=torch.ones(3, 3)).natural_gradient(net, x, y),
            "nat.fisher.Exact",
        ),
    ],
)
def test_bad_sigma_names_the_argument(call, match):
    x, y = _small()
    net = nat.MLP([6, 16, 16, 1], dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        call(net, x, y)
