"""The loss after one NGD step against the learning rate: the isotropic condition Θ̄ = α I makes
the linearized one-step loss (1 − ηα)² L_0, minimal (zero) at ηα = 1, for every Fisher."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from .. import fisher as _fisher
from ..data import mnist_binary
from ..network import MLP
from .common import Check, Result, Settings, mse, progress
from .convergence import UNITWISE_DAMPING
from .plotting import DOTTED, THEORY, legend_theory_experiment, method_style

NAME = "learning-rate"
TITLE = "Training loss after one NGD step against ηα, for each Fisher"


@dataclass(frozen=True)
class Sizes:
    """Hidden width M (L = 3), N training images, the grid of ηα."""

    width: int
    n: int = 100
    grid: tuple[float, ...] = tuple(np.linspace(0.1, 2.5, 25))  # steps of 0.1, through ηα = 1


QUICK = Sizes(width=2048)
FULL = Sizes(width=4096)


def methods() -> list[tuple[str, _fisher.Fisher]]:
    return [
        ("exact", _fisher.Exact()),
        ("block_diagonal", _fisher.BlockDiagonal()),
        ("block_tridiagonal", _fisher.BlockTriDiagonal()),
        ("kfac", _fisher.KFAC()),
        ("unitwise", _fisher.Unitwise(damping=UNITWISE_DAMPING)),
    ]


def one_step_losses(net: MLP, fisher: _fisher.Fisher, x, y, grid: np.ndarray) -> tuple[float, np.ndarray]:
    """(α̂, L(θ_0 − η Δ)/L(θ_0) for η = grid/α̂): one natural gradient Δ, re-used for every η."""
    alpha = fisher.alpha_hat(net, x)
    step = fisher.natural_gradient(net, x, y)
    theta0 = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        loss0 = mse(net(x), y)
        out = []
        for c in grid:
            for p, p0, d in zip(net.parameters(), theta0, step):
                p.copy_(p0 - (c / alpha) * d)
            out.append(mse(net(x), y) / loss0)
        for p, p0 in zip(net.parameters(), theta0):
            p.copy_(p0)
    return alpha, np.array(out)


def measure(settings: Settings, sizes: Sizes) -> dict[str, tuple[float, np.ndarray]]:
    """Per Fisher, (α̂, one-step loss ratios over the grid) of a fresh network."""
    ds = mnist_binary((0, 7), n_train=sizes.n, n_test=10, seed=settings.seed, dtype=settings.dtype)
    x, y = ds.x_train.to(settings.device), ds.y_train.to(settings.device)
    grid = np.asarray(sizes.grid)
    return {
        name: one_step_losses(settings.network([784, sizes.width, sizes.width, 1]), fisher, x, y, grid)
        for name, fisher in progress(methods(), settings, "learning-rate")
    }


def predict(eta_alpha: np.ndarray) -> np.ndarray:
    """The linearized one-step loss ratio (1 − ηα)² (Condition 1)."""
    return (1 - eta_alpha) ** 2


def plot(measured: dict[str, tuple[float, np.ndarray]], sizes: Sizes):
    grid = np.asarray(sizes.grid)
    fine = np.linspace(grid[0], grid[-1], 400)
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    ax.plot(fine, np.maximum(predict(fine), 1e-12), color="black", label=r"theory $(1-\eta\alpha)^2$", **THEORY)
    for name, (_, ratios) in measured.items():
        color, label = method_style(name)
        ax.plot(grid, ratios, color=color, label=label, **DOTTED)
    ax.set_yscale("log")
    ax.axvline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlabel(r"learning rate times α, $\eta\alpha$")
    ax.set_ylabel(r"loss after one step / initial loss, $L_1/L_0$")
    ax.set_ylim(1e-4, 10)
    ax.grid(True, which="both", alpha=0.25)
    ax.set_title(f"ReLU MLP, L = 3, M = {sizes.width}, MNIST 0 vs 7 (N = {sizes.n})", fontsize=10)
    legend_theory_experiment(ax)
    fig.tight_layout()
    return fig


def run(settings: Settings, sizes: Sizes | None = None) -> Result:
    sizes = sizes or settings.sizes(QUICK, FULL)
    grid = np.asarray(sizes.grid)
    measured = measure(settings, sizes)
    rows, checks = [], []
    for name, (alpha, ratios) in measured.items():
        best = float(grid[int(np.argmin(ratios))])
        checks.append(Check(f"{method_style(name)[1]}: ηα minimizing the one-step loss", "1", 1.0, best))
        rows += [
            {
                "method": name,
                "eta_alpha": float(c),
                "alpha": alpha,
                "loss_ratio": float(r),
                "loss_ratio_theory": float(p),
            }
            for c, r, p in zip(grid, ratios, predict(grid))
        ]
    summary = (
        "one-step loss minimal at ηα = "
        + ", ".join(f"{c.experiment:.2g}" for c in checks)
        + " (exact, block diagonal, tri-diagonal, K-FAC, unit-wise; theory 1)"
    )
    return Result(NAME, TITLE, summary, checks, rows, plot(measured, sizes), settings.describe())
