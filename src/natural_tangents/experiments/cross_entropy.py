"""Cross-entropy (the seed's Appendix D): exact and layer-wise NGD follow the same function-space
path when η is scaled by 1/α (S.167). In the linear regime with ρ = 0 both reduce to the
kernel-free recursion f_{t+1} = f_t − c (Λ(σ_t) + ρ̃ I)^{-1} (σ_t − y) on the logits."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .. import fisher as F
from ..data import mnist_binary
from ..losses import CrossEntropy
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

NAME = "cross-entropy"
TITLE = "Cross-entropy: exact and layer-wise NGD follow one function-space path (S.167)"

RATE = 0.5  # c in η = c / α
OUTPUT_DAMPING = 1e-3  # ρ̃


def function_space_path(f0: torch.Tensor, y: torch.Tensor, steps: int, loss: CrossEntropy) -> torch.Tensor:
    """The theory: f_{t+1} = f_t − c (Λ_t + ρ̃ I)^{-1} (σ_t − y), (T+1, N, C)."""
    out = [f0]
    f = f0
    for _ in range(steps):
        step = torch.linalg.solve(loss.output_fisher(f), loss.residual(f, y)[:, :, None])[:, :, 0]
        f = f - RATE * step
        out.append(f)
    return torch.stack(out)


def run(settings: Settings) -> Result:
    width = settings.width(4096, 2048)
    steps = 6 if settings.quick else 10
    ds = mnist_binary((0, 7), n_train=100, n_test=10, seed=settings.seed, one_hot=True, dtype=settings.dtype)
    x, y = ds.x_train.to(settings.device), ds.y_train.to(settings.device)
    loss = CrossEntropy(output_damping=OUTPUT_DAMPING)
    cases = [
        ("exact", F.Exact(loss=loss), 1.0),
        ("block_diagonal", F.BlockDiagonal(loss=loss), 3.0),
        ("block_tridiagonal", F.BlockTriDiagonal(loss=loss), 1.0),
    ]
    ts = list(range(steps + 1))
    fig, (ax_l, ax_d) = plt.subplots(1, 2, figsize=(11, 4.2))
    outputs, rows, checks = {}, [], []
    theory_f = None
    for name, fisher, alpha in progress(cases, settings, "cross-entropy"):
        net = settings.network([784, width, width, 2])
        hist = train(net, x, y, fisher, lr=RATE / alpha, steps=steps)
        f = torch.as_tensor(np.stack(hist.f_train), dtype=torch.float64)
        outputs[name] = f
        if theory_f is None:
            theory_f = function_space_path(f[0], y.double().cpu(), steps, loss)
            th_loss = [float(loss.value(theory_f[t], y.double().cpu())) for t in ts]
            ax_l.plot(ts, th_loss, color="black", label="theory (S.167), any Fisher", **THEORY)
        color, label = method_style(name)
        ax_l.plot(ts, hist.train_loss, color=color, label=f"{label} (η = {RATE}/{alpha:g})", **EXPERIMENT)
        gap = (torch.softmax(f, -1) - torch.softmax(theory_f, -1)).abs().amax((1, 2))
        ax_d.plot(
            ts[1:],
            gap[1:],
            color=color,
            label=f"{label} vs theory",
            **{**EXPERIMENT, "linestyle": ":", "linewidth": 0.8},
        )
        for t in ts:
            rows.append(
                {
                    "method": name,
                    "step": t,
                    "train_loss": hist.train_loss[t],
                    "train_loss_theory": th_loss[t],
                    "max_softmax_gap_to_theory": float(gap[t]),
                    "accuracy": hist.train_accuracy[t],
                }
            )
    between = (torch.softmax(outputs["exact"], -1) - torch.softmax(outputs["block_diagonal"], -1)).abs().amax((1, 2))
    ax_d.plot(ts[1:], between[1:], color="black", label="exact vs block diagonal", **{**EXPERIMENT, "marker": "s"})
    log_axis(ax_l, "cross-entropy training loss")
    ax_l.set_title(f"ReLU MLP, L = 3, M = {width}, C = 2, MNIST 0 vs 7 (N = 100)", fontsize=10)
    legend_theory_experiment(ax_l)
    log_axis(ax_d, "max |Δσ_t| over samples and classes")
    ax_d.set_title("distance between softmax outputs (experiment)", fontsize=10)
    ax_d.legend(fontsize=8)
    fig.suptitle(f"Cross-entropy NGD at η = {RATE}/α, ρ = 0, ρ̃ = {OUTPUT_DAMPING:g}", fontsize=10)
    fig.tight_layout()
    checks.append(
        Check("max |σ_exact − σ_block diagonal| over the run", "0 (identical paths)", 0.0, float(between.max()))
    )
    checks.append(
        Check(
            f"training loss after {steps} steps, exact NGD",
            "—",
            th_loss[-1],
            float(rows[steps]["train_loss"]),
        )
    )
    summary = (
        f"exact, block-diagonal and tri-diagonal NGD stay within {float(between.max()):.2g} of each other in "
        f"softmax output over {steps} steps; loss {rows[0]['train_loss']:.3g} → {rows[steps]['train_loss']:.3g}"
    )
    return Result(NAME, TITLE, summary, checks, rows, fig, settings.describe())
