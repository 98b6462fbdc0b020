"""Cross-entropy (the paper's Appendix D): exact and layer-wise NGD follow the same function-space
path when η is scaled by 1/α (S.167). In the linear regime with ρ = 0 both reduce to the
kernel-free recursion f_{t+1} = f_t − c (Λ(σ_t) + ρ̃ I)^{-1} (σ_t − y) on the logits."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from .. import fisher as _fisher
from ..data import mnist_binary
from ..losses import CrossEntropy
from ..training import History, train
from .common import Check, Result, Settings, progress
from .plotting import DOTTED, EXPERIMENT, THEORY, finish, legend_theory_experiment, log_axis, method_style

NAME = "cross-entropy"
TITLE = "Cross-entropy: exact and layer-wise NGD follow one function-space path (S.167)"

RATE = 0.5  # c in η = c / α
OUTPUT_DAMPING = 1e-3  # ρ̃
LOSS = CrossEntropy(output_damping=OUTPUT_DAMPING)


@dataclass(frozen=True)
class Sizes:
    """Hidden width M (L = 3, C = 2), training steps, N training images."""

    width: int
    steps: int
    n: int = 100


QUICK = Sizes(width=2048, steps=6)
FULL = Sizes(width=4096, steps=10)


def cases() -> list[tuple[str, _fisher.Fisher, float]]:
    """(name, Fisher, its α) of the methods compared."""
    return [
        ("exact", _fisher.Exact(loss=LOSS), 1.0),
        ("block_diagonal", _fisher.BlockDiagonal(loss=LOSS), 3.0),
        ("block_tridiagonal", _fisher.BlockTriDiagonal(loss=LOSS), 1.0),
    ]


def function_space_path(f0: torch.Tensor, y: torch.Tensor, steps: int, loss: CrossEntropy = LOSS) -> torch.Tensor:
    """The theory: f_{t+1} = f_t − c (Λ_t + ρ̃ I)^{-1} (σ_t − y), (T+1, N, C)."""
    out = [f0]
    f = f0
    for _ in range(steps):
        step = torch.linalg.solve(loss.output_fisher(f), loss.residual(f, y)[:, :, None])[:, :, 0]
        f = f - RATE * step
        out.append(f)
    return torch.stack(out)


def measure(settings: Settings, sizes: Sizes) -> tuple[dict[str, tuple[History, torch.Tensor]], torch.Tensor]:
    """(per method: its history and logits (T + 1, N, C), float64; the one-hot targets y (N, C))."""
    ds = mnist_binary((0, 7), n_train=sizes.n, n_test=10, seed=settings.seed, one_hot=True, dtype=settings.dtype)
    x, y = ds.x_train.to(settings.device), ds.y_train.to(settings.device)
    out = {}
    for name, fisher, alpha in progress(cases(), settings, "cross-entropy"):
        net = settings.network([784, sizes.width, sizes.width, 2])
        hist = train(net, x, y, fisher, lr=RATE / alpha, steps=sizes.steps)
        out[name] = (hist, torch.as_tensor(np.stack(hist.f_train), dtype=torch.float64))
    return out, y.double().cpu()


def predict(f0: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[float]]:
    """(the logits along (S.167) from f_0, (T + 1, N, C); their cross-entropy loss per step)."""
    path = function_space_path(f0, y, steps)
    return path, [float(LOSS.value(path[t], y)) for t in range(steps + 1)]


def _softmax_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """max over samples and classes of |softmax(a) − softmax(b)| per step, (T + 1,)."""
    return (torch.softmax(a, -1) - torch.softmax(b, -1)).abs().amax((1, 2))


def plot(measured, th_loss: list[float], gaps: dict[str, torch.Tensor], between: torch.Tensor, sizes: Sizes):
    ts = list(range(sizes.steps + 1))
    alphas = {name: alpha for name, _, alpha in cases()}
    fig, (ax_l, ax_d) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_l.plot(ts, th_loss, color="black", label="theory (S.167), any Fisher", **THEORY)
    for name, (hist, _) in measured.items():
        color, label = method_style(name)
        ax_l.plot(ts, hist.train_loss, color=color, label=f"{label} (η = {RATE}/{alphas[name]:g})", **EXPERIMENT)
        ax_d.plot(ts[1:], gaps[name][1:], color=color, label=f"{label} vs theory", **DOTTED)
    ax_d.plot(ts[1:], between[1:], color="black", label="exact vs block diagonal", **{**EXPERIMENT, "marker": "s"})
    log_axis(ax_l, "cross-entropy training loss")
    ax_l.set_title(f"ReLU MLP, L = 3, M = {sizes.width}, C = 2, MNIST 0 vs 7 (N = {sizes.n})", fontsize=10)
    legend_theory_experiment(ax_l)
    log_axis(ax_d, "max |Δσ_t| over samples and classes")
    ax_d.set_title("distance between softmax outputs (experiment)", fontsize=10)
    ax_d.legend(fontsize=8)
    return finish(fig, f"Cross-entropy NGD at η = {RATE}/α, ρ = 0, ρ̃ = {OUTPUT_DAMPING:g}")


def run(settings: Settings, sizes: Sizes | None = None) -> Result:
    sizes = sizes or settings.sizes(QUICK, FULL)
    steps = sizes.steps
    measured, y = measure(settings, sizes)
    theory_f, th_loss = predict(next(iter(measured.values()))[1][0], y, steps)
    gaps = {name: _softmax_gap(f, theory_f) for name, (_, f) in measured.items()}
    between = _softmax_gap(measured["exact"][1], measured["block_diagonal"][1])
    rows = [
        {
            "method": name,
            "step": t,
            "train_loss": hist.train_loss[t],
            "train_loss_theory": th_loss[t],
            "max_softmax_gap_to_theory": float(gaps[name][t]),
            "accuracy": hist.train_accuracy[t],
        }
        for name, (hist, _) in measured.items()
        for t in range(steps + 1)
    ]
    checks = [
        Check("max |σ_exact − σ_block diagonal| over the run", "0 (identical paths)", 0.0, float(between.max())),
        Check(f"training loss after {steps} steps, exact NGD", "—", th_loss[-1], float(rows[steps]["train_loss"])),
    ]
    summary = (
        f"exact, block-diagonal and tri-diagonal NGD stay within {float(between.max()):.2g} of each other in "
        f"softmax output over {steps} steps; loss {rows[0]['train_loss']:.3g} → {rows[steps]['train_loss']:.3g}"
    )
    return Result(
        NAME, TITLE, summary, checks, rows, plot(measured, th_loss, gaps, between, sizes), settings.describe()
    )
