"""Generalization: the test loss and accuracy that GD and each NGD reach, against the prediction
of the infinite-width theory — the analytic Θ̄(x′, x) of each Fisher in (S.26) (the analytic NTK
for GD). Unit-wise NGD has no closed form on test inputs (S.155): its prediction uses the
empirical Θ̄ of the network at initialization."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch

from .. import dynamics, theory
from .. import fisher as _fisher
from ..data import mnist_binary
from ..training import History, train
from .common import Check, Result, Settings, mse_path, progress
from .convergence import methods
from .plotting import EXPERIMENT, THEORY, finish, legend_theory_experiment, log_axis, method_style

NAME = "generalization"
TITLE = "Test loss and accuracy reached by GD and NGD: experiment against the analytic Θ̄(x′, x)"

KERNEL = {"depth": 3, "activation": "relu", "sigma_w2": 2.0, "sigma_b2": 0.0}


@dataclass(frozen=True)
class Sizes:
    """Hidden width M (L = 3), training steps, N training and N′ test images."""

    width: int
    steps: int
    n_test: int
    n: int = 100


QUICK = Sizes(width=2048, steps=5, n_test=200)
FULL = Sizes(width=4096, steps=10, n_test=500)


@dataclass
class Method:
    """One method: its training history, f_0 on train and test inputs, the kernels of its prediction
    and how they were obtained; ``loss``/``accuracy`` (T + 1,) are the predicted test curves."""

    history: History
    f0: tuple[torch.Tensor, torch.Tensor]
    kernels: tuple[torch.Tensor, torch.Tensor] | None = None
    how: str = ""
    loss: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None


def _accuracy(f, y):
    return ((f[..., 0] > 0) == (y[..., 0] > 0)).double().mean(-1)


def data(settings: Settings, sizes: Sizes):
    """(x, y, x′, y′) of MNIST 0 vs 7 on the settings' device."""
    ds = mnist_binary((0, 7), n_train=sizes.n, n_test=sizes.n_test, seed=settings.seed, dtype=settings.dtype)
    return tuple(t.to(settings.device) for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))


def measure(settings: Settings, sizes: Sizes) -> dict[str, Method]:
    """Train a fresh network per method; unit-wise also keeps its empirical Θ̄ at initialization."""
    x, y, xt, yt = data(settings, sizes)
    out = {}
    for name, fisher in progress(methods(), settings, "generalization"):
        net = settings.network([784, sizes.width, sizes.width, 1])
        with torch.no_grad():
            f0 = (net(x).double().cpu(), net(xt).double().cpu())
        m = Method(None, f0)
        if isinstance(fisher, _fisher.Unitwise):
            m.kernels = (fisher.coefficient(net, x).cpu(), fisher.coefficient(net, x, xt).cpu())
            m.how = "empirical Θ̄ (no closed form)"
        m.history = train(
            net, x, y, "gd" if fisher is None else fisher, lr="optimal", steps=sizes.steps, x_test=xt, y_test=yt
        )
        out[name] = m
    return out


def predict(measured: dict[str, Method], settings: Settings, sizes: Sizes) -> None:
    """Fill in each method's predicted test loss and accuracy: (S.26) with the analytic Θ̄(x′, x)
    (Θ / N for GD) at the measured learning rate and f_0."""
    x, y, xt, yt = (t.double().cpu() for t in data(settings, sizes))
    widths = [784, sizes.width, sizes.width, 1]
    ts = list(range(sizes.steps + 1))
    for (_, fisher), m in zip(methods(), measured.values()):
        if fisher is None:
            m.kernels = (theory.ntk(x, **KERNEL) / sizes.n, theory.ntk(xt, x, **KERNEL) / sizes.n)
            m.how = "analytic NTK"
        elif m.kernels is None:
            k = theory.coefficient(fisher, None, x, widths=widths, **KERNEL)
            m.kernels = (k, theory.coefficient(fisher, xt, x, widths=widths, **KERNEL))
            m.how = "analytic Θ̄"
        pred = dynamics.linearized(m.kernels[0], y, m.f0[0], m.history.lr, m.kernels[1], m.f0[1]).test(ts)
        m.loss, m.accuracy = mse_path(pred, yt), _accuracy(pred, yt)


def plot(measured: dict[str, Method], sizes: Sizes):
    ts = list(range(sizes.steps + 1))
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(13.5, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    for i, (name, m) in enumerate(measured.items()):
        color, label = method_style(name)
        ax_l.plot(ts, m.loss, color=color, label=label, **THEORY)
        ax_l.plot(ts, m.history.test_loss, color=color, **EXPERIMENT)
        ax_a.hlines(float(m.accuracy[-1]), i - 0.3, i + 0.3, color=color, **THEORY)
        ax_a.plot([i], [m.history.test_accuracy[-1]], color=color, **EXPERIMENT)
    log_axis(ax_l, "test loss (1/2N′) Σ‖f − y‖²")
    ax_l.set_title(f"test loss, N′ = {sizes.n_test}", fontsize=10)
    legend_theory_experiment(ax_l, outside=True)
    names = [method_style(n)[1] for n in measured]
    ax_a.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax_a.set_ylabel(f"test accuracy after {sizes.steps} steps")
    ax_a.set_title("test accuracy (line: theory, marker: experiment)", fontsize=10)
    ax_a.grid(True, axis="y", alpha=0.3)
    return finish(fig, f"ReLU MLP, L = 3, M = {sizes.width}, MNIST 0 vs 7, N = {sizes.n}; η = 1/α (GD: 1/λ_max)")


def run(settings: Settings, sizes: Sizes | None = None) -> Result:
    sizes = sizes or settings.sizes(QUICK, FULL)
    measured = measure(settings, sizes)
    predict(measured, settings, sizes)
    rows, checks = [], []
    for name, m in measured.items():
        h = m.history
        rows += [
            {
                "method": name,
                "step": t,
                "test_loss": h.test_loss[t],
                "test_loss_theory": float(m.loss[t]),
                "test_accuracy": h.test_accuracy[t],
                "test_accuracy_theory": float(m.accuracy[t]),
                "theory": m.how,
            }
            for t in range(sizes.steps + 1)
        ]
        label = method_style(name)[1]
        checks.append(
            Check(f"{label}: test loss at step {sizes.steps} ({m.how})", "—", float(m.loss[-1]), h.test_loss[-1])
        )
    worst = max(abs(c.experiment - c.theory) / c.theory for c in checks)
    summary = (
        f"after {sizes.steps} steps the test loss of every method is within {100 * worst:.0f}% of the "
        "infinite-width prediction; NGD reaches "
        + ", ".join(f"{c.experiment:.3g}" for c in checks[1:])
        + f", GD {checks[0].experiment:.3g}"
    )
    return Result(NAME, TITLE, summary, checks, rows, plot(measured, sizes), settings.describe())
