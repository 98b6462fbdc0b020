"""Small networks and batches that several test files share (a file's other helpers stay in it).

* :func:`tiny_mlp`, :func:`tiny_data` and ``SHAPES``: the float64 MLPs and batches of the
  explicit-Fisher tests (test_fisher.py, test_kfac.py, test_layerwise.py, test_unitwise.py);
* :class:`SmallCNN` with :func:`small_cnn` and :func:`cnn_data`: strided and padded convolutions, a
  skip connection and pooling (test_layers.py, test_optim.py);
* :func:`lenet`: the LeNet-style CNN of benchmarks/train_mnist.py (test_optim.py, test_fisher.py;
  its MNIST batch is the ``mnist_300`` fixture of conftest.py);
* :func:`build`, :func:`user_model` and :func:`sequential_data`: a user's ``nn.Sequential`` and its
  batches (test_models.py, test_optim.py);
* :func:`loop_cnn` and :func:`loop_batch`: a tiny float64 CNN with three outputs and its
  cross-entropy batches (test_capture.py, test_curvature.py), and ``FISHERS``, every Fisher class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

import natural_tangents as nat

F64 = torch.float64

# (widths without C, N): a wide net (dual forms everywhere) and a narrow one (primal K-FAC factors,
# hidden widths below N·C)
SHAPES = [((6, 12, 11), 5), ((4, 6, 5), 8)]


def tiny_mlp(widths, c, bias, activation="tanh", seed=0):
    """nat.MLP([*widths, c]) in float64 with σ_w² = 1.7 and σ_b² = 0.4 (0 without bias)."""
    return nat.MLP(
        [*widths, c],
        activation=activation,
        sigma_w2=1.7,
        sigma_b2=0.4 if bias else 0.0,
        seed=seed,
        dtype=F64,
    )


def tiny_data(n, m0, c, seed=1, loss="mse"):
    """(n, m0) unit-norm float64 inputs and targets: Gaussian (n, c) for MSE, one-hot of n mod C
    for cross-entropy (one column, the first class, for C = 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m0, generator=g, dtype=F64)
    x = x / x.norm(dim=1, keepdim=True)
    if loss == "mse":
        y = torch.randn(n, c, generator=g, dtype=F64)
    else:
        y = torch.nn.functional.one_hot(torch.arange(n) % max(c, 2), max(c, 2)).to(F64)
        if c == 1:
            y = y[:, :1]
    return x, y


class SmallCNN(nn.Module):
    """Conv (strided) → tanh → + conv (padded) → tanh (skip) → avg-pool → flatten → Linear → tanh → Linear."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, stride=2)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc1 = nn.Linear(12, 6)
        self.fc2 = nn.Linear(6, c)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))  # (N, 3, 3, 3) for 7 × 7 inputs
        h = h + torch.tanh(self.conv2(h))
        h = Fn.avg_pool2d(h, 2, stride=1).flatten(1)  # (N, 12)
        return self.fc2(torch.tanh(self.fc1(h)))


def small_cnn(c, seed=0):
    torch.manual_seed(seed)
    return SmallCNN(c).to(F64)


def cnn_data(n, c, seed=1):
    """(n, 1, 7, 7) inputs and (n, c) targets, Gaussian, float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 7, 7, generator=g, dtype=F64), torch.randn(n, c, generator=g, dtype=F64)


def lenet(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    ).to(dtype)  # fmt: skip


def build(make, seed=0, dtype=F64):
    """``make()`` initialized under ``torch.manual_seed(seed)`` (the global generator restored)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make().to(dtype)


def user_model(dtype=F64, seed=0):
    """Linear(10, 64), Tanh, Linear(64, 64), ReLU, Linear(64, 3)."""
    return build(
        lambda: nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)),
        seed,
        dtype,
    )


def sequential_data(n, shape, c, seed=1, dtype=F64):
    """(n, *shape) inputs and (n, c) targets, Gaussian (drawn in float64, then cast to ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=F64)
    y = torch.randn(n, c, generator=g, dtype=F64)
    return x.to(dtype), y.to(dtype)


FISHERS = [
    nat.fisher.Exact,
    nat.fisher.BlockDiagonal,
    nat.fisher.BlockTriDiagonal,
    nat.fisher.KFAC,
    nat.fisher.Unitwise,
]


class LoopCNN(nn.Module):
    """One strided convolution and two Linear layers on (N, 1, 5, 5) inputs, three outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2)
        self.fc1 = nn.Linear(12, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


def loop_cnn(seed=0):
    torch.manual_seed(seed)
    return LoopCNN().to(F64)


def loop_batch(n=10, seed=1):
    """(x, class indices) for :func:`loop_cnn`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)
