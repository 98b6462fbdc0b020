"""Figure S.1 of the seed: fast convergence of unit-wise NGD for tanh, ReLU and the shifted ReLU,
with η set from the analytic α = Σ_{l<L} γ_l M_l (S.128), (S.141), (S.156)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .. import activations as A
from .. import fisher as F
from .. import theory
from ..data import mnist_binary
from ..optim import train
from .common import EXPERIMENT, THEORY, Check, Result, Settings, legend_theory_experiment, log_axis, progress

NAME = "unitwise"
TITLE = "Unit-wise NGD for tanh, ReLU and shifted ReLU (the seed's Figure S.1)"

SIGMA_W2, SIGMA_B2 = 2.0, 0.5
#: the learning rate as a fraction of 1/α: below 1 so that the geometric decay (1 − c)^{2t} is visible
RATE = 0.5
DAMPING = 1e-10
CASES = [
    ("tanh", A.Tanh(), "2"),
    ("ReLU", A.ReLU(), "1"),
    ("shifted ReLU (s = 1)", A.ShiftedReLU(1.0), "1.723…"),
]


def run(settings: Settings) -> Result:
    width = settings.width(4096, 2048)
    steps = 6 if settings.quick else 8
    n = 100
    ds = mnist_binary((0, 7), n_train=n, n_test=100, seed=settings.seed, dtype=settings.dtype)
    x, y = ds.x_train.to(settings.device), ds.y_train.to(settings.device)
    widths = [784, width, width, 1]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), sharey=True)
    rows, checks, cuts = [], [], []
    ts = torch.arange(steps + 1)
    for ax, (label, act, seed_value) in zip(axes, progress(CASES, settings, "unitwise")):
        alpha = theory.alpha(F.Unitwise(), widths=widths, activation=act, sigma_w2=SIGMA_W2, sigma_b2=SIGMA_B2)
        alpha_seed = theory.alpha(
            F.Unitwise(),
            widths=widths,
            activation=act,
            sigma_w2=SIGMA_W2,
            sigma_b2=SIGMA_B2,
            include_output=False,
        )
        net = settings.network(widths, act, SIGMA_W2, SIGMA_B2)
        alpha_hat = F.Unitwise().alpha_hat(net, x)  # ρ = 0: the number of active units per sample (S.137)
        hist = train(net, x, y, F.Unitwise(damping=DAMPING), lr=RATE / alpha, steps=steps)
        th = hist.train_loss[0] * (1 - RATE) ** (2 * ts.double())
        ax.plot(ts, th, color="#1f77b4", label=r"theory $(1-\eta\alpha)^{2t}$", **THEORY)
        ax.plot(ts, hist.train_loss, color="#1f77b4", **EXPERIMENT)
        log_axis(ax, "training loss (1/2N) Σ‖f − y‖²")
        ax.set_title(f"{label}: α/M = {alpha_seed / width:.4g}", fontsize=10)
        legend_theory_experiment(ax)
        for t in range(steps + 1):
            rows.append(
                {
                    "activation": label,
                    "step": t,
                    "train_loss": hist.train_loss[t],
                    "train_loss_theory": float(th[t]),
                    "alpha_theory": alpha,
                    "alpha_measured": alpha_hat,
                    "lr": hist.lr,
                }
            )
        checks.append(
            Check(
                f"{label}: α/M (S.141), without the C output units",
                seed_value,
                alpha_seed / width,
                (alpha_hat - 1) / width,
            )
        )
        cuts.append(hist.train_loss[0] / hist.train_loss[-1])
    fig.suptitle(
        f"Unit-wise NGD, L = 3, M = {width}, σ_w² = {SIGMA_W2}, σ_b² = {SIGMA_B2}, MNIST 0 vs 7, "
        f"η = {RATE}/α (analytic α), ρ = {DAMPING:g}",
        fontsize=10,
    )
    fig.tight_layout()
    summary = (
        f"M = {width}: measured α/M "
        + ", ".join(f"{c.experiment:.4f}" for c in checks)
        + " vs theory "
        + ", ".join(f"{c.theory:.4f}" for c in checks)
        + f"; loss cut after {steps} steps ≥ {min(cuts):.3g}× (theory {(1 - RATE) ** (-2 * steps):.3g}×)"
    )
    return Result(NAME, TITLE, summary, checks, rows, fig, settings.describe())
