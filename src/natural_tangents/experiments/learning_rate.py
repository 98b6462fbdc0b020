"""The loss after one NGD step against the learning rate: the isotropic condition Θ̄ = α I makes
the linearized one-step loss (1 − ηα)² L_0, minimal (zero) at ηα = 1, for every Fisher."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .. import fisher as F
from ..data import mnist_binary
from ..network import MLP
from .common import (
    EXPERIMENT,
    THEORY,
    Check,
    Result,
    Settings,
    legend_theory_experiment,
    method_style,
    progress,
)
from .convergence import UNITWISE_DAMPING

NAME = "learning-rate"
TITLE = "Training loss after one NGD step against ηα, for each Fisher"


def methods() -> list[tuple[str, F.Fisher]]:
    return [
        ("exact", F.Exact()),
        ("block_diagonal", F.BlockDiagonal()),
        ("block_tridiagonal", F.BlockTriDiagonal()),
        ("kfac", F.KFAC()),
        ("unitwise", F.Unitwise(damping=UNITWISE_DAMPING)),
    ]


def one_step_losses(net: MLP, fisher: F.Fisher, x, y, grid: np.ndarray) -> tuple[float, np.ndarray]:
    """(α̂, L(θ_0 − η Δ)/L(θ_0) for η = grid/α̂): one natural gradient Δ, re-used for every η."""
    alpha = fisher.alpha_hat(net, x)
    step = fisher.natural_gradient(net, x, y)
    theta0 = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        loss0 = float(0.5 * ((net(x) - y) ** 2).sum(1).mean())
        out = []
        for c in grid:
            for p, p0, d in zip(net.parameters(), theta0, step):
                p.copy_(p0 - (c / alpha) * d)
            out.append(float(0.5 * ((net(x) - y) ** 2).sum(1).mean()) / loss0)
        for p, p0 in zip(net.parameters(), theta0):
            p.copy_(p0)
    return alpha, np.array(out)


def run(settings: Settings) -> Result:
    width = settings.width(4096, 2048)
    grid = np.linspace(0.1, 2.5, 25)  # steps of 0.1, through ηα = 1
    ds = mnist_binary((0, 7), n_train=100, n_test=10, seed=settings.seed, dtype=settings.dtype)
    x, y = ds.x_train.to(settings.device), ds.y_train.to(settings.device)
    fine = np.linspace(grid[0], grid[-1], 400)
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    ax.plot(fine, np.maximum((1 - fine) ** 2, 1e-12), color="black", label=r"theory $(1-\eta\alpha)^2$", **THEORY)
    rows, checks = [], []
    for name, fisher in progress(methods(), settings, "learning-rate"):
        net = settings.network([784, width, width, 1])
        alpha, ratios = one_step_losses(net, fisher, x, y, grid)
        color, label = method_style(name)
        ax.plot(grid, ratios, color=color, label=label, **{**EXPERIMENT, "linestyle": ":", "linewidth": 0.8})
        best = float(grid[int(np.argmin(ratios))])
        checks.append(Check(f"{label}: ηα minimizing the one-step loss", "1", 1.0, best))
        rows += [
            {
                "method": name,
                "eta_alpha": float(c),
                "alpha": alpha,
                "loss_ratio": float(r),
                "loss_ratio_theory": float((1 - c) ** 2),
            }
            for c, r in zip(grid, ratios)
        ]
    ax.set_yscale("log")
    ax.axvline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlabel(r"learning rate times α, $\eta\alpha$")
    ax.set_ylabel(r"loss after one step / initial loss, $L_1/L_0$")
    ax.set_ylim(1e-4, 10)
    ax.grid(True, which="both", alpha=0.25)
    ax.set_title(f"ReLU MLP, L = 3, M = {width}, MNIST 0 vs 7 (N = 100)", fontsize=10)
    legend_theory_experiment(ax)
    fig.tight_layout()
    summary = (
        "one-step loss minimal at ηα = "
        + ", ".join(f"{c.experiment:.2g}" for c in checks)
        + " (exact, block diagonal, tri-diagonal, K-FAC, unit-wise; theory 1)"
    )
    return Result(NAME, TITLE, summary, checks, rows, fig, settings.describe())
