"""Mini-batch NGD on a LeNet-style CNN with packaged MNIST images, as in benchmarks/train_mnist.py:
the training loss drops, ``precondition`` + ``torch.optim.SGD`` matches ``opt.step``, and the update
solves (J^T Λ J / N + ρ I) Δ = ∇L with J applied through torch.func (never formed by the library)."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

import natural_tangents as nat


def lenet(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    ).to(dtype)  # fmt: skip


@pytest.fixture(scope="module")
def mnist_300():
    """30 images of each digit, pixels / 255 standardized by their own mean and std, (300, 1, 28, 28)."""
    images, labels = nat.data.load_mnist_subset(dtype=torch.float32)
    idx = torch.cat([torch.nonzero(labels == d).flatten()[:30] for d in range(10)])
    x = images[idx] / 255.0
    x = ((x - x.mean()) / x.std()).reshape(-1, 1, 28, 28)
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))
    return x[perm], labels[idx][perm]


def test_exact_ngd_lowers_the_training_loss_in_a_dataloader_loop(mnist_300):
    x, y = mnist_300
    model = lenet()
    opt = nat.NGD(model, nat.fisher.Exact(damping=0.1, loss="cross_entropy"), lr=0.3)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        before = float(nn.functional.cross_entropy(model(x), y))
    for xb, yb in loader:  # one epoch: 6 steps
        opt.step(xb, yb)
    with torch.no_grad():
        f = model(x)
        after = float(nn.functional.cross_entropy(f, y))
        acc = float((f.argmax(1) == y).float().mean())
    assert before > 2.0  # ≈ log 10 at initialization
    assert after < 0.6 * before  # 2.30 -> 0.95 when written
    assert acc > 0.5


@pytest.mark.parametrize("fisher", [nat.fisher.Exact, nat.fisher.KFAC])
def test_precondition_then_torch_sgd_equals_ngd_step(mnist_300, fisher):
    x, y = mnist_300[0][:40], mnist_300[1][:40]
    a = lenet()
    b = copy.deepcopy(a)
    lr = 0.3
    nat.NGD(a, fisher(damping=1e-2, loss="cross_entropy"), lr=lr).step(x, y)
    ngd = nat.NGD(b, fisher(damping=1e-2, loss="cross_entropy"))
    sgd = torch.optim.SGD(b.parameters(), lr=lr)
    ngd.precondition(x, y)
    sgd.step()
    moved = 0.0
    for p0, pa, pb in zip(lenet().parameters(), a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
        moved += float((pa - p0).norm())
    assert moved > 1e-3  # the step did something


def test_exact_update_solves_the_damped_fisher_system_through_torch_func(mnist_300):
    """(J^T Λ J / N + ρ I) Δ = ∇L, with J Δ by jvp, J^T u by vjp and ∇L by autograd (float64)."""
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
