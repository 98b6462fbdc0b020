"""Fast convergence of NGD (the paper's main claim): training and test loss against step for GD and
every Fisher on MNIST 0 vs 7, with the closed-form linearized dynamics (S.26) drawn over them."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch

from .. import dynamics
from .. import fisher as _fisher
from ..data import mnist_binary
from ..empirical import empirical_ntk
from ..training import History, train
from .common import Check, Result, Settings, mse_path, progress
from .plotting import EXPERIMENT, THEORY, finish, legend_theory_experiment, log_axis, method_style, note

NAME = "convergence"
TITLE = "Training and test loss of GD and NGD with every Fisher (MNIST 0 vs 7, η = 1/α)"

#: unit-wise NGD takes a tiny damping: the exact ρ → 0 limit takes huge steps on units whose δ is
#: tiny but non-zero at finite width (see nat.fisher.Unitwise)
UNITWISE_DAMPING = 1e-10


@dataclass(frozen=True)
class Sizes:
    """Hidden width M (L = 3), training steps, N training and N′ test images."""

    width: int
    steps: int
    n: int = 100
    n_test: int = 100


QUICK = Sizes(width=2048, steps=5)
FULL = Sizes(width=4096, steps=8)


def methods() -> list[tuple[str, _fisher.Fisher | None]]:
    """(name, Fisher) of every method; None is gradient descent."""
    return [
        ("gd", None),
        ("exact", _fisher.Exact()),
        ("block_diagonal", _fisher.BlockDiagonal()),
        ("block_tridiagonal", _fisher.BlockTriDiagonal()),
        ("kfac", _fisher.KFAC()),
        ("unitwise", _fisher.Unitwise(damping=UNITWISE_DAMPING)),
    ]


@dataclass
class Curve:
    """One method. Measured: the training history and, at initialization, the outputs f_0 on train and
    test inputs and the kernels Θ̄(x, x), Θ̄(x′, x) of that network (Θ / N for GD). Predicted: the
    linearized train and test losses (T + 1,)."""

    history: History
    kernels: tuple[torch.Tensor, torch.Tensor]
    f0: tuple[torch.Tensor, torch.Tensor]
    train_theory: torch.Tensor | None = None
    test_theory: torch.Tensor | None = None


def data(settings: Settings, sizes: Sizes):
    """(x, y, x′, y′) of MNIST 0 vs 7 on the settings' device."""
    ds = mnist_binary((0, 7), n_train=sizes.n, n_test=sizes.n_test, seed=settings.seed, dtype=settings.dtype)
    return tuple(t.to(settings.device) for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))


def measure(settings: Settings, sizes: Sizes) -> dict[str, Curve]:
    """Train a fresh network per method at η = 1/α̂ (GD: 1/λ_max), keeping its kernels at initialization."""
    x, y, xt, yt = data(settings, sizes)
    curves = {}
    for name, fisher in progress(methods(), settings, "convergence"):
        net = settings.network([784, sizes.width, sizes.width, 1])
        with torch.no_grad():
            f0 = (net(x).double(), net(xt).double())
        if fisher is None:
            k = empirical_ntk(net, x, dtype=torch.float64) / sizes.n
            kt = empirical_ntk(net, xt, x, dtype=torch.float64) / sizes.n
        else:
            k, kt = fisher.coefficient(net, x), fisher.coefficient(net, x, xt)
        hist = train(
            net, x, y, "gd" if fisher is None else fisher, lr="optimal", steps=sizes.steps, x_test=xt, y_test=yt
        )
        curves[name] = Curve(hist, (k, kt), f0)
    return curves


def predict(curves: dict[str, Curve], y: torch.Tensor, y_test: torch.Tensor, steps: int) -> None:
    """Fill in each method's linearized losses (S.26) from its kernels at initialization."""
    ts = list(range(steps + 1))
    for c in curves.values():
        lin = dynamics.linearized(c.kernels[0], y.double(), c.f0[0], c.history.lr, c.kernels[1], c.f0[1])
        c.train_theory, c.test_theory = lin.loss(ts), mse_path(lin.test(ts), y_test.double())


def plot(curves: dict[str, Curve], sizes: Sizes):
    ts = list(range(sizes.steps + 1))
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.2), sharex=True)
    for name, c in curves.items():
        color, label = method_style(name)
        axes[0].plot(ts, c.train_theory.clamp_min(1e-16), color=color, label=label, **THEORY)
        axes[0].plot(ts, c.history.train_loss, color=color, **EXPERIMENT)
        axes[1].plot(ts, c.test_theory, color=color, label=label, **THEORY)
        axes[1].plot(ts, c.history.test_loss, color=color, **EXPERIMENT)
    zero = [method_style(k)[1] for k, c in curves.items() if float(c.train_theory[1]) < 1e-14]
    if zero:
        note(
            axes[0],
            0.5,
            0.03,
            r"theory reaches 0 at t = 1 ($\bar\Theta = \alpha I$):" "\n" + ", ".join(zero),
            ha="center",
            va="bottom",
            bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0},
        )
    log_axis(axes[0], "training loss (1/2N) Σ‖f − y‖²")
    log_axis(axes[1], "test loss (1/2N′) Σ‖f − y‖²")
    axes[0].set_ylim(bottom=1e-14)
    axes[0].set_title(f"training set (N = {sizes.n})")
    axes[1].set_title(f"test set (N′ = {sizes.n_test})")
    legend_theory_experiment(axes[1], outside=True)
    return finish(fig, f"ReLU MLP, L = 3, M = {sizes.width}, MNIST 0 vs 7; NGD at η = 1/α̂, GD at η = 1/λ_max(Θ)")


def _rows(curves: dict[str, Curve]) -> list[dict]:
    rows = []
    for name, c in curves.items():
        h = c.history
        rows += [
            {
                "method": name,
                "step": t,
                "lr": h.lr,
                "train_loss": h.train_loss[t],
                "test_loss": h.test_loss[t],
                "train_loss_theory": float(c.train_theory[t]),
                "test_loss_theory": float(c.test_theory[t]),
                "test_accuracy": h.test_accuracy[t],
                "seconds_per_step": h.seconds[t - 1] if t else 0.0,
            }
            for t in range(len(h.train_loss))
        ]
    return rows


def _check(name: str, c: Curve) -> Check:
    h = c.history
    paper = "slow (η ≤ 2/λ_max)" if name == "gd" else "≈ 0 after one step"
    th1 = float(c.train_theory[1])
    theory_cut = float(h.train_loss[0] / c.train_theory[1]) if th1 > 1e-14 else "∞ (loss 0)"
    return Check(
        f"{method_style(name)[1]}: train loss cut by step 1",
        paper,
        theory_cut,
        float(h.train_loss[0] / h.train_loss[1]),
    )


def run(settings: Settings, sizes: Sizes | None = None) -> Result:
    sizes = sizes or settings.sizes(QUICK, FULL)
    curves = measure(settings, sizes)
    _, y, _, yt = data(settings, sizes)
    predict(curves, y, yt, sizes.steps)
    checks = [_check(name, c) for name, c in curves.items()]
    worst = min(c.experiment for c in checks[1:])
    summary = (
        f"M = {sizes.width}: one NGD step cuts the training loss by ≥ {worst:.3g}× (every Fisher), "
        f"GD by {checks[0].experiment:.3g}×"
    )
    return Result(NAME, TITLE, summary, checks, _rows(curves), plot(curves, sizes), settings.describe())
