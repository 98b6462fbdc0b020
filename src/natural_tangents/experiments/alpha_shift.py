"""Unit-wise α/M against the shift s of the shifted ReLU φ_s(u) = max(u, −s) (the paper's Figure S.2, C.3.3).

Theory (S.156): α = Σ_{l=1}^{L−1} γ_l M_l with γ_l = 1/2 + erf(s / √(2 q_l)) / 2, the probability that a
unit of layer l has φ′(u) ≠ 0, at the forward variances q_l of unit-norm inputs (q_0 = 1/M_0). With
L = 3 and M_1 = M_2 = M, α/M = γ_1 + γ_2 rises from 1 (ReLU, s = 0) towards 2 (linear, s → ∞).

Experiment (the paper's procedure): the mean of the diagonal of the unit-wise Θ̄(x, x) of a finite
network, ``nat.fisher.Unitwise(damping=1e-12).coefficient(net, x)``. At finite width the C output units
add exactly C to every diagonal entry (their Θ_{L,k} is positive definite); the paper drops this
O(C/M) term, and so do we: the points are (mean diag Θ̄ − C)/M. Per layer, the fraction of units whose
backward signal δ_{l,i}(x_n) is non-zero is drawn against γ_l.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from .. import fisher as _fisher
from .. import theory
from ..activations import ShiftedReLU
from ..data import gaussian
from .common import Check, Result, Settings, progress
from .plotting import EXPERIMENT, THEORY, legend_theory_experiment, method_style

NAME = "alpha-shift"
TITLE = "Unit-wise α/M against the shift s of the shifted ReLU (the paper's Figure S.2)"

DAMPING = 1e-12
SIGMA_W2, SIGMA_B2 = 2.0, 0.5
DEPTH = 3
#: α/M at s = 1 for L = 3, M_0 = 10, σ_w² = 2, σ_b² = 0.5 (computed independently; docs/conventions.md)
REFERENCE_S1 = 1.666365


@dataclass(frozen=True)
class Sizes:
    """Hidden width M, the shifts s measured, N samples of width M_0."""

    width: int
    shifts: tuple[float, ...]
    n: int = 10
    m0: int = 10


QUICK = Sizes(width=1024, shifts=(0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0))
FULL = Sizes(width=4096, shifts=tuple(float(s) for s in np.round(np.arange(0.0, 3.01, 0.25), 2)))


def predict(s: float, m0: int, width: int = 4096) -> tuple[float, list[float]]:
    """Theory: (α/M without the output units, [γ_1, …, γ_{L−1}]) for the shifted ReLU φ_s (S.156)."""
    act = ShiftedReLU(s)
    widths = [m0] + [width] * (DEPTH - 1) + [1]
    a = theory.alpha(
        _fisher.Unitwise(), widths=widths, activation=act, sigma_w2=SIGMA_W2, sigma_b2=SIGMA_B2, include_output=False
    )
    qs = theory.variances(DEPTH, activation=act, sigma_w2=SIGMA_W2, sigma_b2=SIGMA_B2, q0=1.0 / m0)
    gammas = [float(theory.gamma(act, float(qs[l]))) for l in range(DEPTH - 1)]
    return a / width, gammas


def measure(settings: Settings, sizes: Sizes) -> list[dict]:
    """Per shift: (mean diag Θ̄ − C)/M, its spread over samples, and per hidden layer the fraction of
    (sample, unit) pairs with δ ≠ 0, with the theory next to them (one row per shift)."""
    m, n, m0 = sizes.width, sizes.n, sizes.m0
    x = gaussian(n, m0, seed=settings.seed, dtype=settings.dtype).to(settings.device)
    fisher = _fisher.Unitwise(damping=DAMPING)
    rows = []
    for s in progress(sizes.shifts, settings, "alpha-shift"):
        net = settings.network([m0, m, m, 1], ShiftedReLU(s), SIGMA_W2, SIGMA_B2)
        diag = torch.diagonal(fisher.coefficient(net, x)).double()
        c = net.out_features
        fx = net.signals(x)
        active = [float((fx.backward[l] != 0).any(0).double().mean()) for l in range(DEPTH - 1)]
        th, gammas = predict(s, m0, m)
        rows.append(
            {
                "s": s,
                "width": m,
                "alpha_over_M": float(diag.mean() - c) / m,
                "alpha_over_M_theory": th,
                "diag_std_over_M": float(diag.std()) / m,
                "output_term_subtracted": c / m,
                **{f"active_fraction_layer{l + 1}": a for l, a in enumerate(active)},
                **{f"gamma{l + 1}_theory": g for l, g in enumerate(gammas)},
            }
        )
    return rows


def plot(rows: list[dict], sizes: Sizes):
    fine = np.linspace(0.0, max(sizes.shifts), 121)
    th_fine = [predict(float(s), sizes.m0, sizes.width) for s in fine]
    shifts = [r["s"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    color, _ = method_style(_fisher.Unitwise)
    ax.plot(fine, [t[0] for t in th_fine], color=color, label=r"$\alpha/M = \gamma_1 + \gamma_2$ (S.156)", **THEORY)
    ax.errorbar(
        shifts,
        [r["alpha_over_M"] for r in rows],
        yerr=[r["diag_std_over_M"] for r in rows],
        color=color,
        capsize=2,
        label=r"mean diag $\bar{\Theta}$ (− C) / M; bar: spread over samples",
        **EXPERIMENT,
    )
    layer_colors = ("#8c564b", "#7f7f7f")
    for l in range(DEPTH - 1):
        ax.plot(
            fine,
            [t[1][l] for t in th_fine],
            color=layer_colors[l],
            label=rf"$\gamma_{l + 1}$ (layer {l + 1})",
            **{**THEORY, "linestyle": "--", "linewidth": 1.2},
        )
        ax.plot(
            shifts,
            [r[f"active_fraction_layer{l + 1}"] for r in rows],
            color=layer_colors[l],
            label="fraction of units with δ ≠ 0 (per layer)" if l == 0 else None,
            **{**EXPERIMENT, "marker": "s", "markersize": 4},
        )
    ax.axhline(2.0, color="black", linewidth=0.6, linestyle=":")
    ax.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
    ax.set_xlabel("shift s of φ_s(u) = max(u, −s) (units of the pre-activation u)")
    ax.set_ylabel(r"$\alpha / M$ (per hidden unit; $\gamma_l$: fraction of active units)")
    ax.grid(True, alpha=0.25)
    legend_theory_experiment(ax)
    ax.get_legend().set_loc("lower right")
    ax.set_ylim(0.0, 2.08)
    ax.set_title(
        f"unit-wise NGD, L = 3, M = {sizes.width}, M_0 = N = {sizes.m0}, σ_w² = 2, σ_b² = 0.5, ρ = 1e-12", fontsize=9
    )
    fig.tight_layout()
    return fig


def run(settings: Settings, sizes: Sizes | None = None) -> Result:
    sizes = sizes or settings.sizes(QUICK, FULL)
    rows = measure(settings, sizes)

    def at(s: float) -> dict:
        return min(rows, key=lambda r: abs(r["s"] - s))

    p1, p0, pl = at(1.0), at(0.0), rows[-1]
    th, ex = "alpha_over_M_theory", "alpha_over_M"
    checks = [
        Check("α/M at s = 1", "≈ 1.67 (Figure S.2); 1.666365 (computed independently)", p1[th], p1[ex]),
        Check("α/M at s = 0 (ReLU)", "1 (α = Σ M_l / 2)", p0[th], p0[ex]),
        Check(f"α/M at s = {pl['s']:g}", "→ 2 as s → ∞", pl[th], pl[ex]),
    ]
    worst = max(abs(r[ex] / r[th] - 1) for r in rows)
    summary = (
        f"M = {sizes.width}: measured α/M follows (S.156) within {100 * worst:.2g} % for s in 0…{pl['s']:g} "
        f"(α/M = {p1[ex]:.4f} at s = 1 against {p1[th]:.6f}); output term C/M = {1 / sizes.width:.1e} subtracted"
    )
    return Result(NAME, TITLE, summary, checks, rows, plot(rows, sizes), settings.describe())
