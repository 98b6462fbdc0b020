"""Figure S.1 of the paper: fast convergence of unit-wise NGD for tanh, ReLU and the shifted ReLU,
with η set from the analytic α = Σ_{l<L} γ_l M_l (S.128), (S.141), (S.156)."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch

from .. import activations as A
from .. import fisher as _fisher
from .. import theory
from ..data import mnist_binary
from ..training import History, train
from .common import Check, Result, Settings, progress
from .plotting import finish, legend_theory_experiment, log_axis, theory_and_experiment

NAME = "unitwise"
TITLE = "Unit-wise NGD for tanh, ReLU and shifted ReLU (the paper's Figure S.1)"

SIGMA_W2, SIGMA_B2 = 2.0, 0.5
#: the learning rate as a fraction of 1/α: below 1 so that the geometric decay (1 − c)^{2t} is visible
RATE = 0.5
DAMPING = 1e-10
#: (label, activation, the paper's α/M)
CASES = [
    ("tanh", A.Tanh(), "2"),
    ("ReLU", A.ReLU(), "1"),
    ("shifted ReLU (s = 1)", A.ShiftedReLU(1.0), "1.723…"),
]


@dataclass(frozen=True)
class Sizes:
    """Hidden width M (L = 3), training steps, N training images."""

    width: int
    steps: int
    n: int = 100


QUICK = Sizes(width=2048, steps=6)
FULL = Sizes(width=4096, steps=8)


def _widths(sizes: Sizes) -> list[int]:
    return [784, sizes.width, sizes.width, 1]


def predict(act: A.Activation, sizes: Sizes) -> tuple[float, float]:
    """(α with the C output units, α without them as the paper counts it) from (S.141), (S.156)."""
    kw = {"widths": _widths(sizes), "activation": act, "sigma_w2": SIGMA_W2, "sigma_b2": SIGMA_B2}
    return theory.alpha(_fisher.Unitwise(), **kw), theory.alpha(_fisher.Unitwise(), include_output=False, **kw)


def active_units(net, x) -> float:
    """The number of units active per sample, Σ_{l,i} 1[δ_{l,i}(x_n) ≠ 0] averaged over x (with the
    C output units): α̂ by (S.137) when every Θ_{l,i} has the rank of its support."""
    layers = net.signals(x).layers
    return sum(float((layer.kronecker.d != 0).any(0).sum()) for layer in layers) / x.shape[0]


def measure(settings: Settings, sizes: Sizes, act: A.Activation, alpha: float) -> tuple[float, float, History]:
    """(α̂ = tr Θ̄ / N at ρ = 0, the active units per sample (S.137), training at η = RATE/α).

    The two agree when every unit's Θ_{l,i} has the rank of its support; at small widths ReLU units
    that are inactive on every sample leave the next layer's inputs of rank below N, and α̂ is the
    smaller."""
    ds = mnist_binary((0, 7), n_train=sizes.n, n_test=100, seed=settings.seed, dtype=settings.dtype)
    x, y = ds.x_train.to(settings.device), ds.y_train.to(settings.device)
    net = settings.network(_widths(sizes), act, SIGMA_W2, SIGMA_B2)
    alpha_hat, active = _fisher.Unitwise().alpha_hat(net, x), active_units(net, x)
    return alpha_hat, active, train(net, x, y, _fisher.Unitwise(damping=DAMPING), lr=RATE / alpha, steps=sizes.steps)


def plot(results: list[tuple], sizes: Sizes):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), sharey=True)
    ts = torch.arange(sizes.steps + 1)
    for ax, (label, _, alpha_paper, hist, th) in zip(axes, results):
        theory_and_experiment(ax, ts, th, ts, hist.train_loss, "#1f77b4", label=r"theory $(1-\eta\alpha)^{2t}$")
        log_axis(ax, "training loss (1/2N) Σ‖f − y‖²")
        ax.set_title(f"{label}: α/M = {alpha_paper / sizes.width:.4g}", fontsize=10)
        legend_theory_experiment(ax)
    return finish(
        fig,
        f"Unit-wise NGD, L = 3, M = {sizes.width}, σ_w² = {SIGMA_W2}, σ_b² = {SIGMA_B2}, MNIST 0 vs 7, "
        f"η = {RATE}/α (analytic α), ρ = {DAMPING:g}",
    )


def run(settings: Settings, sizes: Sizes | None = None) -> Result:
    sizes = sizes or settings.sizes(QUICK, FULL)
    width, steps = sizes.width, sizes.steps
    ts = torch.arange(steps + 1)
    rows, checks, results = [], [], []
    for label, act, paper in progress(CASES, settings, "unitwise"):
        alpha, alpha_paper = predict(act, sizes)
        alpha_hat, active, hist = measure(settings, sizes, act, alpha)
        th = hist.train_loss[0] * (1 - RATE) ** (2 * ts.double())
        results.append((label, alpha, alpha_paper, hist, th))
        rows += [
            {
                "activation": label,
                "step": t,
                "train_loss": hist.train_loss[t],
                "train_loss_theory": float(th[t]),
                "alpha_theory": alpha,
                "alpha_measured": alpha_hat,
                "active_units": active,
                "lr": hist.lr,
            }
            for t in range(steps + 1)
        ]
        checks.append(
            Check(
                f"{label}: α/M (S.141), without the C output units", paper, alpha_paper / width, (alpha_hat - 1) / width
            )
        )
    cut = min(r[3].train_loss[0] / r[3].train_loss[-1] for r in results)
    summary = (
        f"M = {width}: measured α/M "
        + ", ".join(f"{c.experiment:.4f}" for c in checks)
        + " vs theory "
        + ", ".join(f"{c.theory:.4f}" for c in checks)
        + f"; loss cut after {steps} steps ≥ {cut:.3g}× (theory {(1 - RATE) ** (-2 * steps):.3g}×)"
    )
    return Result(NAME, TITLE, summary, checks, rows, plot(results, sizes), settings.describe())
