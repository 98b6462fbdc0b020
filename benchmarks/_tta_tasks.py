"""The time-to-accuracy benchmark's tasks: data sets, models and per-task budgets (for
``time_to_accuracy.py``).

A task is a classification data set split into training, validation (a held-out part of the
training set, for tuning only) and test sets, a model, a batch size and a training-time budget in
seconds. Data sets:

* MNIST-1D (Greydanus 2020), generated offline by the optional ``mnist1d`` package with its default
  arguments: 5,000 one-dimensional signals of length 40 (its default 4,000 / 1,000 split), or 50,000
  (a 40,000 / 10,000 split) for the larger task; standardized by the generator (whole set, one
  scalar). Cached as ``.npz`` under the cache folder, since generating 50,000 signals takes a minute.
* MNIST: the packaged 5,000-image subset (4,000 training, 1,000 test images; the ``data`` extra), or
  the full 60,000 / 10,000 MNIST from ``--data-dir``; standardized by the training set's mean and
  standard deviation (``nat.data.mnist``).

Models: the MNIST-1D authors' reference CNN (three Conv1d layers of 25 channels, kernel 5/3/3,
stride 2, padding 1, ReLU, then a linear classifier on the 25 × 5 features: 5,210 parameters) and
MLP (40-100-100-10, ReLU: 15,210 parameters), whose published test accuracies are 94% and 68%
(logistic regression 32%); a LeNet-style CNN for MNIST (Conv 6@5×5, pool, Conv 16@5×5, pool,
120, 10: 44,426 parameters); and, opt-in, a small residual network with BatchNorm in training mode.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import natural_tangents as nat

VALIDATION_FRACTION = 0.1
VALIDATION_SEED = 12345


@dataclass
class Data:
    """Tensors of one task: training (N, ...) float32 inputs and int64 labels, the validation part
    held out of them, and the test set. ``train_fit`` is the training set minus the validation part
    (what the tuning runs train on); the timed runs train on all of ``x_train``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_fit: Tensor = field(init=False)
    y_fit: Tensor = field(init=False)
    x_val: Tensor = field(init=False)
    y_val: Tensor = field(init=False)

    def __post_init__(self) -> None:
        n = self.x_train.shape[0]
        g = torch.Generator().manual_seed(VALIDATION_SEED)
        perm = torch.randperm(n, generator=g)
        n_val = max(1, round(VALIDATION_FRACTION * n))
        val, fit = perm[:n_val], perm[n_val:]
        self.x_fit, self.y_fit = self.x_train[fit], self.y_train[fit]
        self.x_val, self.y_val = self.x_train[val], self.y_train[val]

    def to(self, device: torch.device) -> Data:
        for name in ("x_train", "y_train", "x_test", "y_test", "x_fit", "y_fit", "x_val", "y_val"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def sizes(self) -> str:
        return f"{self.x_fit.shape[0]} + {self.x_val.shape[0]} (validation) train / {self.x_test.shape[0]} test"


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def mnist1d_available() -> bool:
    return importlib.util.find_spec("mnist1d") is not None


def mnist1d_data(num_samples: int, cache_dir: Path | None) -> Data:
    """MNIST-1D generated with the package's default arguments (seed 42, train_split 0.8) and
    ``num_samples`` signals; inputs (N, 1, 40) float32."""
    cache = None if cache_dir is None else Path(cache_dir) / f"mnist1d_{num_samples}.npz"
    if cache is not None and cache.exists():
        z = np.load(cache)
        arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = num_samples
        ds = make_dataset(args)
        arrays = {k: np.asarray(ds[k]) for k in ("x", "y", "x_test", "y_test")}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(cache, **arrays)
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)[:, None, :]  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return Data(as_x(arrays["x"]), as_y(arrays["y"]), as_x(arrays["x_test"]), as_y(arrays["y_test"]))


def mnist_data(n_train: int | None, n_test: int | None, data_dir: Path | None) -> Data:
    """MNIST images (N, 1, 28, 28) from ``nat.data.mnist`` (the packaged subset, or ``data_dir``)."""
    ds = nat.data.mnist(n_train, n_test, seed=0, dtype=torch.float32, data_dir=data_dir)
    return Data(ds.x_train, ds.y_train, ds.x_test, ds.y_test)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


def mnist1d_cnn() -> nn.Module:
    """The MNIST-1D reference CNN for (N, 1, 40) signals: 5,210 parameters."""
    return nn.Sequential(
        nn.Conv1d(1, 25, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(125, 10),
    )  # fmt: skip


def mnist1d_mlp() -> nn.Module:
    """The MNIST-1D reference MLP, 40-100-100-10 with ReLU: 15,210 parameters."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def lenet() -> nn.Module:
    """LeNet-style CNN for (N, 1, 28, 28) images: 44,426 parameters (the step-cost table's model)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 10),
    )  # fmt: skip


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a 1×1 conv-BN shortcut when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet_bn() -> nn.Module:
    """A small residual network with BatchNorm for (N, 1, 28, 28) images: a stride-2 stem (16
    channels, 14×14), one residual block of 16 channels, one of 32 channels at stride 2 (7×7),
    global average pooling and a linear classifier: 23,466 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        ResidualBlock(16, 16, 1), ResidualBlock(16, 32, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One benchmark task. ``budget_s``: the training time (seconds, evaluation excluded) of every
    timed run; ``needs``: an optional module the data needs; ``opt_in``: run only when named."""

    name: str
    description: str
    load: Callable[[Path | None, Path | None], Data]  # (data_dir, cache_dir) -> Data
    model: Callable[[], nn.Module]
    budget_s: float
    batch: int = 100
    needs: str | None = None
    opt_in: bool = False
    reference: str = ""
    #: the data's cache file under the cache folder, and about how long making it takes (for the estimate)
    cache_file: str | None = None
    generate_s: float = 0.0

    def signature(self, data: Data) -> dict:
        """What the tuned settings depend on besides the tuning budget and the grid."""
        return {"batch": self.batch, "n_fit": int(data.x_fit.shape[0]), "n_val": int(data.x_val.shape[0])}


def _mnist1d(n: int) -> Callable[[Path | None, Path | None], Data]:
    return lambda data_dir, cache_dir: mnist1d_data(n, cache_dir)


def _mnist(data_dir: Path | None, cache_dir: Path | None) -> Data:
    return mnist_data(None, None, data_dir) if data_dir is not None else mnist_data(4000, 1000, None)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("mnist1d-cnn", "MNIST-1D (4,000 / 1,000), reference CNN", _mnist1d(5000), mnist1d_cnn, 8.0,
             needs="mnist1d", reference="published test accuracy 94% (Adam, 6,000 steps)",
             cache_file="mnist1d_5000.npz", generate_s=8.0),
        Task("mnist1d-mlp", "MNIST-1D (4,000 / 1,000), reference MLP", _mnist1d(5000), mnist1d_mlp, 5.0,
             needs="mnist1d", reference="published test accuracy 68%"),
        Task("mnist1d-cnn-large", "MNIST-1D generated larger (40,000 / 10,000), reference CNN", _mnist1d(50000),
             mnist1d_cnn, 12.0, needs="mnist1d", cache_file="mnist1d_50000.npz", generate_s=80.0),
        Task("lenet-mnist", "MNIST subset (4,000 / 1,000; full MNIST with --data-dir), LeNet-style CNN", _mnist,
             lenet, 10.0),
        Task("resnet-bn-mnist", "MNIST subset, small ResNet with BatchNorm (training mode)", _mnist, resnet_bn, 10.0,
             opt_in=True),
    )
}  # fmt: skip
DEFAULT_TASKS = [name for name, t in TASKS.items() if not t.opt_in]


def missing_requirement(task: Task) -> str | None:
    """Why ``task`` cannot run here (a message), or None."""
    if task.needs == "mnist1d" and not mnist1d_available():
        return f"{task.name}: skipped, the mnist1d package is not installed (pip install mnist1d)"
    return None
