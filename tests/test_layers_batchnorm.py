"""BatchNorm in training mode (layers/batchnorm.py): the Fishers read the Jacobian with the batch
statistics held constant and precondition the true gradient; against the explicit P × P Fisher of
the decoupled model (torch.func Jacobians with μ, σ fixed) and autograd's gradient of the real one."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import natural_tangents as nat
from _explicit import ce_metric, ce_residual, flat

F64 = torch.float64


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)).to(F64)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def _batch(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=g, dtype=F64), torch.arange(n) % 3


def _decoupled_jacobian(model, x):
    """J (N·C, P) of the model with the BatchNorm's batch mean and variance held at their values."""
    with torch.no_grad():
        h = model[0](x)
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    params = {k: v.detach() for k, v in model.named_parameters()}
    shape = (1, -1, 1, 1)

    def f(p):
        u = functional_call(model[0], {"weight": p["0.weight"], "bias": p["0.bias"]}, (x,))
        u = (u - mean.reshape(shape)) / (var + model[1].eps).sqrt().reshape(shape)
        u = u * p["1.weight"].reshape(shape) + p["1.bias"].reshape(shape)
        return functional_call(model[4], {"weight": p["4.weight"], "bias": p["4.bias"]}, (torch.tanh(u).flatten(1),))

    jac = jacrev(f)(params)
    n, c = x.shape[0], 3
    return torch.cat([jac[k].reshape(n * c, -1) for k in params], 1)


def _true_gradient(model, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    return flat(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("kind", ["block_diagonal", "unitwise", "exact_mc"])
def test_the_fisher_of_constant_statistics_preconditions_the_true_gradient(kind):
    model, x, y = _model(), *_batch()
    rho = 1e-2
    j = _decoupled_jacobian(model, x)
    with torch.no_grad():
        f = model(x)
    n, p = x.shape[0], j.shape[1]
    sizes = [q.numel() for q in model.parameters()]
    owners = [0, 0, 1, 1, 2, 2]
    if kind == "exact_mc":
        draws = nat.losses.get("cross_entropy").sample_residuals(f, 2, torch.Generator().manual_seed(4))
        lam = torch.block_diag(*(torch.einsum("nsc,nsd->ncd", draws, draws) / 2))
        g = j.T @ lam @ j / n
    else:
        lam = torch.block_diag(*ce_metric(f, 1e-3))
        g = torch.zeros(p, p, dtype=F64)
        offs = torch.tensor([0, *sizes]).cumsum(0).tolist()
        if kind == "block_diagonal":
            for m in range(3):
                idx = [i for k, o in enumerate(owners) if o == m for i in range(offs[k], offs[k + 1])]
                t = torch.tensor(idx)
                g[t[:, None], t[None, :]] = j[:, t].T @ lam @ j[:, t] / n
        else:  # units: conv output channels (filter + bias), BatchNorm (one unit), Linear output features
            units = [[*range(9 * u, 9 * u + 9), 27 + u] for u in range(3)] + [list(range(30, 36))]
            units += [[36 + i for i in (*range(27 * u, 27 * u + 27), 81 + u)] for u in range(3)]
            for idx in units:
                t = torch.tensor(idx)
                g[t[:, None], t[None, :]] = j[:, t].T @ lam @ j[:, t] / n
    want = torch.linalg.solve(g + rho * torch.eye(p, dtype=F64), _true_gradient(model, x, y))
    if kind == "exact_mc":
        fisher = nat.fisher.Exact(
            damping=rho, loss="cross_entropy", fisher_type="mc", mc_samples=2, batch_statistics="constant"
        )
        got = fisher.at(model, x, y=y, generator=torch.Generator().manual_seed(4)).natural_gradient(y)
    else:
        cls = {"block_diagonal": nat.fisher.BlockDiagonal, "unitwise": nat.fisher.Unitwise}[kind]
        got = cls(damping=rho, loss="cross_entropy", batch_statistics="constant").natural_gradient(model, x, y)
    assert float((flat(got) - want).norm() / want.norm()) < 1e-9


def test_the_loop_and_the_batch_step_agree_and_statistics_update_once():
    fisher = nat.fisher.KFAC(damping=1e-2, loss="cross_entropy", batch_statistics="constant", fisher_type="mc")
    one, two = _model(), _model()
    x, y = _batch()
    nat.NGD(one, fisher, lr=0.3, seed=2).step(x, y)
    opt = nat.NGD(two, fisher, lr=0.3, seed=2)
    nn.functional.cross_entropy(two(x), y).backward()
    opt.step()
    for p, q in zip(one.parameters(), two.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)
    ref = _model()
    ref(x)  # one training-mode forward
    assert torch.allclose(one[1].running_mean, ref[1].running_mean) and int(one[1].num_batches_tracked) == 1


def test_training_batchnorm_is_refused_unless_asked_and_for_the_exact_fisher():
    model, x, y = _model(), *_batch()
    with pytest.raises(NotImplementedError, match="batch_statistics='constant'"):
        nat.fisher.KFAC(damping=1e-2).natural_gradient(model, x, y)
    with pytest.raises(NotImplementedError, match="parameter-space form"):
        nat.NGD(model, nat.fisher.Exact(damping=1e-2, batch_statistics="constant"))
    with pytest.raises(ValueError, match="damping"):
        nat.fisher.KFAC(batch_statistics="constant")
    residual = ce_residual(model(x), y)  # a plain forward keeps working, the model untouched
    assert residual.shape == (9, 3)
