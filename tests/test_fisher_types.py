"""Fisher types (``fisher_type="mc"`` and ``"empirical"``) against the explicit P × P Fisher of the same
structure built from torch.func Jacobians with the rows' outer products in place of Λ:
Λ̂_n = Σ_s r̂_{n,s} r̂_{n,s}^T / k for the Monte-Carlo labels drawn with the same generator, and
Λ̂_n = r_n r_n^T for the observed ones (r written out here); every Fisher, MLP and CNN, float64."""

import pytest
import torch
from torch import nn

import natural_tangents as nat
from _explicit import ce_residual, explicit_fisher_of, explicit_module_fisher, explicit_signals, flat, jacobian
from _nets import FISHERS

F64 = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _metric(fisher_type, loss, f, y, k, seed):
    """(N, C, C) Λ̂ of the rows, and the residual r (N, C) of the observed labels."""
    r = ce_residual(f, y) if loss == "cross_entropy" else f.detach() - y
    if fisher_type == "empirical":
        return r[:, :, None] * r[:, None, :], r
    draws = nat.losses.get(loss).sample_residuals(f.detach(), k, torch.Generator().manual_seed(seed))
    return torch.einsum("nsc,nsd->ncd", draws, draws) / k, r


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("cls", FISHERS, ids=lambda c: c.name)
def test_mlp_matches_the_explicit_fisher_of_the_rows(cls, loss, fisher_type):
    net = nat.MLP([5, 12, 10, 3], activation="tanh", sigma_b2=0.3, seed=1, dtype=F64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, generator=g, dtype=F64)
    y = torch.arange(8) % 3 if loss == "cross_entropy" else torch.randn(8, 3, generator=g, dtype=F64)
    k = 2
    fisher = cls(damping=1e-2, loss=loss, fisher_type=fisher_type, mc_samples=k)
    f = net(x)
    yy = nn.functional.one_hot(y, 3).to(F64) if loss == "cross_entropy" else y
    lam, r = _metric(fisher_type, loss, f, yy, k, seed=7)
    gmat = explicit_fisher_of(fisher, net, x, net.depth, explicit_signals, lam=lam)
    want = torch.linalg.solve(gmat, jacobian(net, x).T @ r.reshape(-1) / 8)
    got = flat(fisher.at(net, x, y=y, generator=torch.Generator().manual_seed(7)).natural_gradient())
    assert _rel(got, want) < 1e-9


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2)
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.norm(torch.tanh(self.conv(x)).flatten(1))))


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
@pytest.mark.parametrize("kind", ["exact", "layerwise", "unitwise"])
def test_cnn_matches_the_explicit_fisher_of_the_rows(kind, fisher_type):
    torch.manual_seed(3)
    model = _CNN().to(F64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 1, 5, 5, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cls = {"exact": nat.fisher.Exact, "layerwise": nat.fisher.BlockDiagonal, "unitwise": nat.fisher.Unitwise}[kind]
    fisher = cls(damping=1e-2, loss="cross_entropy", fisher_type=fisher_type, mc_samples=3)
    f = model(x)
    lam, r = _metric(fisher_type, "cross_entropy", f, nn.functional.one_hot(y, 3).to(F64), 3, seed=5)
    sigma = torch.eye(3, dtype=F64) if kind == "layerwise" else None
    gmat = explicit_module_fisher(kind, model, x, 1e-2, lam=lam, sigma=sigma)
    want = torch.linalg.solve(gmat, jacobian(model, x).T @ r.reshape(-1) / 6)
    got = flat(fisher.at(model, x, y=y, generator=torch.Generator().manual_seed(5)).natural_gradient())
    assert _rel(got, want) < 1e-9


def test_expectation_is_unchanged_and_the_sampled_types_need_their_inputs():
    net = nat.MLP([5, 12, 3], seed=1, dtype=F64)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = torch.arange(8) % 3
    base = nat.fisher.KFAC(damping=1e-2, loss="cross_entropy")
    same = nat.fisher.KFAC(damping=1e-2, loss="cross_entropy", fisher_type="expectation")
    assert torch.equal(flat(base.natural_gradient(net, x, y)), flat(same.natural_gradient(net, x, y)))
    with pytest.raises(ValueError, match="damping"):
        nat.fisher.Exact(fisher_type="mc")
    with pytest.raises(ValueError, match="fisher_type"):
        nat.fisher.Exact(damping=1e-2, fisher_type="sampled")
    with pytest.raises(ValueError, match="y: "):
        nat.fisher.Exact(damping=1e-2, fisher_type="empirical").at(net, x)
    bound = nat.fisher.Exact(damping=1e-2, loss="cross_entropy", fisher_type="mc").at(net, x, y=y)
    with pytest.raises(NotImplementedError, match="expectation"):
        bound.coefficient()
    assert bound.alpha_hat() == pytest.approx(
        nat.fisher.Exact(damping=1e-2, loss="cross_entropy").alpha_hat(net, x), rel=1e-12
    )


def test_monte_carlo_residuals_estimate_the_output_metric():
    """E_ŷ r̂ r̂^T = Λ (without output damping): softmax, sigmoid and Gaussian, over many draws."""
    f = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, -0.4]], dtype=F64)
    g = torch.Generator().manual_seed(0)
    for loss, ff in (("cross_entropy", f), ("cross_entropy", f[:, :1]), ("mse", f)):
        lf = nat.losses.get(loss)
        draws = lf.sample_residuals(ff, 200_000, g)
        est = torch.einsum("nsc,nsd->ncd", draws, draws) / draws.shape[1]
        lam = lf.output_fisher(ff)
        want = torch.eye(ff.shape[1], dtype=F64).expand_as(est) if lam is None else lam - 1e-3 * torch.eye(ff.shape[1])
        assert float((est - want).abs().max()) < 0.01
