"""Fast convergence of NGD (the seed's main claim): training and test loss against step for GD and
every Fisher on MNIST 0 vs 7, with the closed-form linearized dynamics (S.26) drawn over them."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .. import dynamics
from .. import fisher as F
from ..data import mnist_binary
from ..kernels import empirical_ntk
from ..optim import train
from .common import (
    EXPERIMENT,
    THEORY,
    Check,
    Result,
    Settings,
    legend_theory_experiment,
    log_axis,
    method_style,
    progress,
)

NAME = "convergence"
TITLE = "Training and test loss of GD and NGD with every Fisher (MNIST 0 vs 7, η = 1/α)"

#: unit-wise NGD takes a tiny damping: the exact ρ → 0 limit takes huge steps on units whose δ is
#: tiny but non-zero at finite width (see nat.fisher.Unitwise)
UNITWISE_DAMPING = 1e-10


def methods() -> list[tuple[str, F.Fisher | None]]:
    return [
        ("gd", None),
        ("exact", F.Exact()),
        ("block_diagonal", F.BlockDiagonal()),
        ("block_tridiagonal", F.BlockTriDiagonal()),
        ("kfac", F.KFAC()),
        ("unitwise", F.Unitwise(damping=UNITWISE_DAMPING)),
    ]


def _loss(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1/2N) Σ ||f − y||² over the last two axes, for (T, N, C) or (N, C)."""
    return 0.5 * ((f - y) ** 2).sum(-1).mean(-1)


def run(settings: Settings) -> Result:
    width = settings.width(4096, 2048)
    steps = 5 if settings.quick else 8
    n = 100
    ds = mnist_binary((0, 7), n_train=n, n_test=100, seed=settings.seed, dtype=settings.dtype)
    x, y, xt, yt = (t.to(settings.device) for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    widths = [784, width, width, 1]
    rows, curves, checks = [], {}, []
    ts = list(range(steps + 1))
    for name, fisher in progress(methods(), settings, "convergence"):
        net = settings.network(widths)
        with torch.no_grad():
            f0, f0t = net(x), net(xt)
        if fisher is None:
            k = empirical_ntk(net, x, dtype=torch.float64) / n
            kt = empirical_ntk(net, xt, x, dtype=torch.float64) / n
        else:
            k = fisher.coefficient(net, x)
            kt = fisher.coefficient(net, x, xt)
        hist = train(net, x, y, "gd" if fisher is None else fisher, lr="optimal", steps=steps, x_test=xt, y_test=yt)
        lin = dynamics.linearized(k, y.double(), f0.double(), hist.lr, kt, f0t.double())
        th_train = lin.loss(ts)
        th_test = _loss(lin.test(ts), yt.double())
        curves[name] = (hist, th_train, th_test)
        for t in ts:
            rows.append(
                {
                    "method": name,
                    "step": t,
                    "lr": hist.lr,
                    "train_loss": hist.train_loss[t],
                    "test_loss": hist.test_loss[t],
                    "train_loss_theory": float(th_train[t]),
                    "test_loss_theory": float(th_test[t]),
                    "test_accuracy": hist.test_accuracy[t],
                    "seconds_per_step": hist.seconds[t - 1] if t else 0.0,
                }
            )
        cut = hist.train_loss[0] / hist.train_loss[1]
        seed_txt = "slow (η ≤ 2/λ_max)" if fisher is None else "≈ 0 after one step"
        theory_cut = float(hist.train_loss[0] / th_train[1]) if float(th_train[1]) > 1e-14 else "∞ (loss 0)"
        checks.append(Check(f"{method_style(name)[1]}: train loss cut by step 1", seed_txt, theory_cut, float(cut)))
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.2), sharex=True)
    for name, (hist, th_train, th_test) in curves.items():
        color, label = method_style(name)
        axes[0].plot(ts, th_train.clamp_min(1e-16), color=color, label=label, **THEORY)
        axes[0].plot(ts, hist.train_loss, color=color, **EXPERIMENT)
        axes[1].plot(ts, th_test, color=color, label=label, **THEORY)
        axes[1].plot(ts, hist.test_loss, color=color, **EXPERIMENT)
    zero = [method_style(k)[1] for k, (_, th, _) in curves.items() if float(th[1]) < 1e-14]
    if zero:
        axes[0].text(
            0.5,
            0.03,
            r"theory reaches 0 at t = 1 ($\bar\Theta = \alpha I$):" "\n" + ", ".join(zero),
            transform=axes[0].transAxes,
            ha="center",
            va="bottom",
            fontsize=7.5,
            bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0},
        )
    log_axis(axes[0], "training loss (1/2N) Σ‖f − y‖²")
    log_axis(axes[1], "test loss (1/2N′) Σ‖f − y‖²")
    axes[0].set_ylim(bottom=1e-14)
    axes[0].set_title("training set (N = 100)")
    axes[1].set_title("test set (N′ = 100)")
    legend_theory_experiment(axes[1], outside=True)
    fig.suptitle(f"ReLU MLP, L = 3, M = {width}, MNIST 0 vs 7; NGD at η = 1/α̂, GD at η = 1/λ_max(Θ)", fontsize=10)
    fig.tight_layout()
    worst = min(c.experiment for c in checks[1:])
    summary = (
        f"M = {width}: one NGD step cuts the training loss by ≥ {worst:.3g}× (every Fisher), "
        f"GD by {checks[0].experiment:.3g}×"
    )
    return Result(NAME, TITLE, summary, checks, rows, fig, settings.describe())
