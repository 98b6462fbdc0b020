"""Block tri-diagonal NGD against depth: α and the loss after one step at η = 1/α (seed Lemma 4.3, B.2).

The block tri-diagonal Fisher has the layer pattern Σ_{ll′} = 1 for |l − l′| ≤ 1. In the zero-damping
limit Θ̄(x, x) = α I with α = 1^T Σ^{-1} 1 (S.71), (S.93)–(S.94): s for L = 3s, s + 1 for L = 3s + 1,
while Σ is singular for L = 3s + 2 ((S.92): the eigenvalue 1 + 2cos(2π/3) = 0). The library refuses
ρ = 0 there (ValueError); the experiment measures what small dampings ρ give instead.

What the singular depths do as ρ → 0⁺ (our derivation, checked by the measurements). The null vector
z of Σ (z_l = sin(2πl/3)) is orthogonal to 1, so 1 lies in the range of Σ. Writing the damped dual
system as (Σ ⊗ I) w + ρ D^{-1} w = 1 ⊗ r with w_l = Θ_l v_l, D = blockdiag(Θ_l): its z-component forces
Σ_l z_l Θ_l^{-1} w_l = 0 for every ρ > 0, which fixes the null-space part of w at a finite value, and
Θ̄ r = Σ_l w_l = (1^T Σ^+ 1) r because 1^T z = 0. So the limit exists, is isotropic, and
α = 1^T Σ^+ 1 = s + 1 (1, 2, 3, 4 for L = 2, 5, 8, 11): at L = 2, Σ = 1 1^T is exact NGD, as in (S.91).

Setting: MNIST 0 vs 7, N = 100 (C = 1, ±1 targets), ReLU, σ_w² = 2, σ_b² = 0 (the convergence
experiment's network), all hidden widths M. Theory lines: α from Σ, and for the damped singular
depths the infinite-width Θ̄ at that ρ (``nat.theory.coefficient``); the loss after one step of the
linear model, ||(I − Θ̄/α) r||² / ||r||², is 0 at every non-singular depth, and what the finite network
shows there is its departure from the linear regime (exact NGD, drawn for reference, shows the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from .. import fisher as F
from .. import theory
from ..data import mnist_binary
from ..fisher import tridiagonal_sigma
from ..kernels import model_factors
from ..network import MLP
from .common import EXPERIMENT, THEORY, Check, Result, Settings, legend_theory_experiment, method_style, progress

NAME = "tridiagonal"
TITLE = "Block tri-diagonal NGD against depth: α = 1ᵀΣ⁻¹1 and the loss after one step (singular Σ at L = 3s + 2)"

SIGMA_W2, SIGMA_B2 = 2.0, 0.0
SINGULAR_DAMPINGS = (1e-3, 1e-6, 1e-9)
_DAMP_STYLE = {1e-3: ("#e377c2", "^"), 1e-6: ("#bcbd22", "s"), 1e-9: ("#17becf", "D")}


@dataclass(frozen=True)
class Sizes:
    """Hidden width M, the depths L swept, N training images, the dampings tried at singular depths."""

    width: int
    depths: tuple[int, ...]
    n: int = 100
    dampings: tuple[float, ...] = SINGULAR_DAMPINGS
    sweep_widths: tuple[int, ...] = ()
    sweep_depths: tuple[int, ...] = (4, 5)
    sweep_seeds: int = 3


QUICK = Sizes(width=512, depths=tuple(range(1, 8)), sweep_widths=(256, 512, 1024, 2048))
FULL = Sizes(width=2048, depths=tuple(range(1, 13)), sweep_widths=(512, 1024, 2048, 4096))
FLOOR = 1e-10  # the one-step loss ratios below this (L = 1: the network is linear in θ) are drawn here


def sigma_alpha(depth: int) -> tuple[float | None, float]:
    """(1^T Σ^{-1} 1 via ``nat.theory.alpha``, or None where Σ is singular; 1^T Σ^+ 1, the ρ → 0⁺ limit)."""
    try:
        a = theory.alpha(F.BlockTriDiagonal(), widths=[1] * depth + [1])
    except ValueError:
        a = None
    s = tridiagonal_sigma(depth)
    ones = torch.ones(depth, dtype=torch.float64)
    return a, float(ones @ torch.linalg.pinv(s) @ ones)


def _loss(f: torch.Tensor, y: torch.Tensor) -> float:
    return float(0.5 * ((f.double() - y.double()) ** 2).sum(-1).mean())


@torch.no_grad()
def one_step(net: MLP, fx, fisher: F.Fisher, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(α̂, cond Θ̄(x, x), loss after one NGD step at η = 1/α̂ over the initial loss); the network is
    restored afterwards."""
    iso = F.isotropy(fisher.coefficient_from_factors(fx))
    step = fisher.natural_gradient_from_factors(fx, y)
    eta = 1.0 / iso.alpha
    params = list(net.parameters())
    for p, g in zip(params, step, strict=True):
        p.sub_(g.to(p.dtype), alpha=eta)
    after = _loss(net(x), y)
    for p, g in zip(params, step, strict=True):
        p.add_(g.to(p.dtype), alpha=eta)
    return iso.alpha, iso.condition_number, after / _loss(fx.f, y)


def _linear_theory(fisher: F.Fisher, x: torch.Tensor, depth: int, r: torch.Tensor) -> tuple[float, float]:
    """Infinite-width (α = mean eigenvalue of Θ̄, one-step loss ratio ||(I − Θ̄/α) r||² / ||r||²) at the
    Fisher's damping, for the initial residual r (N,)."""
    tb = theory.coefficient(fisher, None, x, depth=depth, activation="relu", sigma_w2=SIGMA_W2, sigma_b2=SIGMA_B2)
    a = float(torch.linalg.eigvalsh(0.5 * (tb + tb.T)).mean())
    res = r - tb @ r / a
    return a, float(res @ res / (r @ r))


def run(settings: Settings, sizes: Sizes | None = None) -> Result:
    sizes = sizes or (QUICK if settings.quick else FULL)
    m, n = sizes.width, sizes.n
    ds = mnist_binary((0, 7), n_train=n, n_test=0, seed=settings.seed, dtype=torch.float64)
    x64, y64 = ds.x_train, ds.y_train
    x, y = x64.to(settings.device, settings.dtype), y64.to(settings.device, settings.dtype)

    rows, raised = [], []
    for depth in progress(sizes.depths, settings, "tridiagonal"):
        a_inv, a_pinv = sigma_alpha(depth)
        singular = a_inv is None
        net = settings.network([x.shape[1]] + [m] * (depth - 1) + [1], "relu", SIGMA_W2, SIGMA_B2)
        fx = model_factors(net, x)
        r = (fx.f.double() - y64.to(fx.f.device)).reshape(-1).cpu()
        base = {
            "sweep": "depth",
            "depth": depth,
            "width": m,
            "singular_sigma": singular,
            "alpha_sigma_inverse": a_inv,
            "alpha_sigma_pinv": a_pinv,
        }
        a_e, c_e, l_e = one_step(net, fx, F.Exact(), x, y)
        rows.append(
            {
                **base,
                "fisher": "exact",
                "damping": 0.0,
                "alpha_hat": a_e,
                "condition_number": c_e,
                "loss_ratio": l_e,
                "alpha_theory": 1.0,
                "loss_ratio_theory": 0.0,
            }
        )
        if not singular:
            a_t, c_t, l_t = one_step(net, fx, F.BlockTriDiagonal(), x, y)
            rows.append(
                {
                    **base,
                    "fisher": "block_tridiagonal",
                    "damping": 0.0,
                    "alpha_hat": a_t,
                    "condition_number": c_t,
                    "loss_ratio": l_t,
                    "alpha_theory": a_inv,
                    "loss_ratio_theory": 0.0,
                }
            )
            continue
        try:  # the library refuses ρ = 0 for a singular Σ
            F.BlockTriDiagonal().coefficient_from_factors(fx)
        except ValueError:
            raised.append(depth)
        for rho in sizes.dampings:
            fisher = F.BlockTriDiagonal(damping=rho)
            a_t, c_t, l_t = one_step(net, fx, fisher, x, y)
            a_th, l_th = _linear_theory(fisher, x64, depth, r)
            rows.append(
                {
                    **base,
                    "fisher": "block_tridiagonal",
                    "damping": rho,
                    "alpha_hat": a_t,
                    "condition_number": c_t,
                    "loss_ratio": l_t,
                    "alpha_theory": a_th,
                    "loss_ratio_theory": l_th,
                }
            )

    sweep = []
    grid = [(m_s, d, k) for m_s in sizes.sweep_widths for d in sizes.sweep_depths for k in range(sizes.sweep_seeds)]
    for m_s, depth, k in progress(grid, settings, "tridiagonal widths"):
        net = settings.network(
            [x.shape[1]] + [m_s] * (depth - 1) + [1], "relu", SIGMA_W2, SIGMA_B2, seed=settings.seed + k
        )
        fx = model_factors(net, x)
        rho = 0.0 if sigma_alpha(depth)[0] is not None else min(sizes.dampings)
        for name, fisher in (("exact", F.Exact()), ("block_tridiagonal", F.BlockTriDiagonal(damping=rho))):
            a_hat, cond, ratio = one_step(net, fx, fisher, x, y)
            sweep.append(
                {
                    "sweep": "width",
                    "depth": depth,
                    "width": m_s,
                    "network_seed": settings.seed + k,
                    "fisher": name,
                    "damping": 0.0 if name == "exact" else rho,
                    "alpha_hat": a_hat,
                    "condition_number": cond,
                    "loss_ratio": ratio,
                    "singular_sigma": sigma_alpha(depth)[0] is None,
                }
            )
        del net, fx
    rows.extend(sweep)

    fig = _figure([r for r in rows if r["sweep"] == "depth"], sizes, sweep)
    depths = list(sizes.depths)
    seq_th, seq_ex = [], []
    for depth in depths:
        a_inv, _ = sigma_alpha(depth)
        seq_th.append("singular" if a_inv is None else f"{a_inv:g}")
        hit = [
            r
            for r in rows
            if r["depth"] == depth
            and r["fisher"] == "block_tridiagonal"
            and r["damping"] == 0
            and r["sweep"] == "depth"
        ]
        seq_ex.append(f"{hit[0]['alpha_hat']:.4g}" if hit else ("raises" if depth in raised else "—"))
    sing_th = [d for d in depths if sigma_alpha(d)[0] is None]
    seed_seq = "1, singular, 1, 2, singular, 2, 3, singular, 3, 4, singular, 4"
    seed_seq = ", ".join(seed_seq.split(", ")[: len(depths)]) if depths == list(range(1, len(depths) + 1)) else seed_seq
    main = [r for r in rows if r["sweep"] == "depth"]
    nonsing = [r for r in main if r["fisher"] == "block_tridiagonal" and r["damping"] == 0]
    exact = [r for r in main if r["fisher"] == "exact"]
    small = min(sizes.dampings)
    damped = [r for r in main if r["fisher"] == "block_tridiagonal" and r["damping"] == small]
    checks = [
        Check(f"α for L = {depths[0]}…{depths[-1]}", seed_seq, ", ".join(seq_th), ", ".join(seq_ex)),
        Check(
            "depths with singular Σ",
            "L = 3s + 2",
            ", ".join(map(str, sing_th)),
            "ρ = 0 raises at " + ", ".join(map(str, raised)),
        ),
        Check(
            f"α̂ at the singular depths, ρ = {small:g}",
            "no ρ → 0 limit (B.1)",
            "1ᵀΣ⁺1 = " + ", ".join(f"{r['alpha_sigma_pinv']:g}" for r in damped),
            ", ".join(f"{r['alpha_hat']:.4g}" for r in damped),
        ),
        Check(
            f"largest (loss after 1 step)/(initial), tri-diagonal, ρ = 0, M = {m}",
            "0 (one-step convergence)",
            0.0,
            max(r["loss_ratio"] for r in nonsing) if nonsing else float("nan"),
        ),
        Check(
            f"largest (loss after 1 step)/(initial), exact NGD, M = {m}",
            "0 (one-step convergence)",
            0.0,
            max(r["loss_ratio"] for r in exact),
        ),
    ]
    dev = max(abs(r["alpha_hat"] - r["alpha_theory"]) for r in nonsing) if nonsing else float("nan")
    summary = (
        f"M = {m}, MNIST N = {n}: α̂ = 1ᵀΣ⁻¹1 within {dev:.1g} at every non-singular depth; at L = "
        f"{', '.join(map(str, sing_th))} ρ = 0 raises and small ρ gives α̂ → 1ᵀΣ⁺1 = s + 1 with cond → 1 "
        f"(the ρ → 0⁺ limit exists); one-step loss ratios up to "
        f"{max(r['loss_ratio'] for r in nonsing + exact):.2g} come from finite width (exact NGD alike)"
    )
    return Result(NAME, TITLE, summary, checks, rows, fig, settings.describe())


def _figure(rows: list[dict], sizes: Sizes, sweep: list[dict]):
    panels = 3 if sweep else 2
    fig, axes = plt.subplots(
        1, panels, figsize=(6.0 * panels, 4.9), gridspec_kw={"width_ratios": [1.2, 1.2, 1][:panels]}
    )
    ax1, ax2 = axes[0], axes[1]
    color_t, label_t = method_style("block_tridiagonal")
    color_e, label_e = method_style("exact")
    depths = list(sizes.depths)
    half = 0.32
    singular = [d for d in depths if sigma_alpha(d)[0] is None]
    for ax in (ax1, ax2):
        for i, d in enumerate(singular):
            ax.axvspan(
                d - 0.5,
                d + 0.5,
                color="0.88",
                zorder=0,
                label="Σ singular (L = 3s + 2)" if ax is ax1 and i == 0 else None,
            )
    first = True
    for d in depths:
        a_inv, _ = sigma_alpha(d)
        if a_inv is not None:
            ax1.hlines(
                a_inv, d - half, d + half, color=color_t, label=r"$1^T\Sigma^{-1}1$" if first else None, **THEORY
            )
            first = False
    seen: set = set()
    for r in rows:
        if r["fisher"] != "block_tridiagonal" or r["damping"] == 0:
            continue
        d, rho = r["depth"], r["damping"]
        c, mk = _DAMP_STYLE.get(rho, ("#17becf", "D"))
        if d not in seen:
            ax1.hlines(
                r["alpha_sigma_pinv"],
                d - half,
                d + half,
                color=color_t,
                linestyles=":",
                linewidth=2.0,
                label=r"$\rho\to0^+$ limit $1^T\Sigma^+1$" if not seen else None,
            )
            seen.add(d)
        new = rho not in seen
        seen.add(rho)
        ax1.hlines(r["alpha_theory"], d - half, d + half, color=c, linewidth=1.2)
        ax1.plot(
            d, r["alpha_hat"], color=c, label=f"tri-diag., ρ = {rho:g}" if new else None, **{**EXPERIMENT, "marker": mk}
        )
        if r["loss_ratio_theory"] > FLOOR:
            ax2.hlines(r["loss_ratio_theory"], d - half, d + half, color=c, linewidth=1.2)
        ax2.plot(
            d,
            r["loss_ratio"],
            color=c,
            label=f"tri-diag., ρ = {rho:g}" if new else None,
            **{**EXPERIMENT, "marker": mk},
        )
    tri = [r for r in rows if r["fisher"] == "block_tridiagonal" and r["damping"] == 0]
    ex = [r for r in rows if r["fisher"] == "exact"]
    ax1.plot(
        [r["depth"] for r in tri], [r["alpha_hat"] for r in tri], color=color_t, label=f"{label_t}, ρ = 0", **EXPERIMENT
    )
    ax2.plot(
        [r["depth"] for r in tri],
        [max(r["loss_ratio"], FLOOR) for r in tri],
        color=color_t,
        label=f"{label_t}, ρ = 0",
        **EXPERIMENT,
    )
    ax2.plot(
        [r["depth"] for r in ex],
        [max(r["loss_ratio"], FLOOR) for r in ex],
        color=color_e,
        label=label_e,
        **{**EXPERIMENT, "marker": "x", "markerfacecolor": color_e},
    )
    ax1.set_yscale("log")
    ax1.set_xlabel("depth L (number of weight layers)")
    ax1.set_ylabel(r"$\alpha$ (mean eigenvalue of $\bar{\Theta}(x, x)$, dimensionless)")
    ax1.set_title("isotropy constant α; lines at singular L: M → ∞ at that ρ", fontsize=9.5)
    legend_theory_experiment(ax1)
    ax1.get_legend().set_loc("center")
    ax1.get_legend().set_bbox_to_anchor((0.62, 0.42))
    ax2.set_yscale("log")
    ax2.set_ylim(FLOOR / 3, None)
    ax2.set_xlabel("depth L (number of weight layers)")
    ax2.set_ylabel("training loss after one step / initial loss")
    ax2.set_title(f"one step at η = 1/α̂, M = {sizes.width} (theory at ρ = 0: exactly 0)", fontsize=9.5)
    if depths[0] == 1:
        ax2.annotate(
            "L = 1: linear in θ,\nratio ≈ 1e-27",
            xy=(1, FLOOR),
            xytext=(1.3, FLOOR * 1e3),
            fontsize=7.5,
            arrowprops={"arrowstyle": "->", "lw": 0.8},
        )
    ax2.text(
        0.98,
        0.03,
        r"lines: linear model with the M → ∞ $\bar{\Theta}$ at that ρ",
        transform=ax2.transAxes,
        fontsize=7.5,
        ha="right",
    )
    ax2.legend(fontsize=8, loc="center right")
    for ax in (ax1, ax2):
        ax.set_xticks(depths)
        ax.set_xlim(depths[0] - 0.6, depths[-1] + 0.6)
        ax.grid(True, which="major", axis="y", alpha=0.25)
    if sweep:
        ax3 = axes[2]
        markers = {d: mk for d, mk in zip(sizes.sweep_depths, ("o", "D", "s", "^"))}
        for d in sizes.sweep_depths:
            for name, color in (("exact", color_e), ("block_tridiagonal", color_t)):
                pts = [r for r in sweep if r["depth"] == d and r["fisher"] == name]
                if not pts:
                    continue
                rho = pts[0]["damping"]
                ws = sorted({r["width"] for r in pts})
                vals = [np.array([r["loss_ratio"] for r in pts if r["width"] == w]) for w in ws]
                mean = np.array([v.mean() for v in vals])
                err = np.array([v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0 for v in vals])
                lab = f"{method_style(name)[1]}, L = {d}" + (f" (singular, ρ = {rho:g})" if rho > 0 else "")
                ax3.errorbar(
                    ws,
                    mean,
                    yerr=np.minimum(err, 0.9 * mean),
                    color=color,
                    label=lab,
                    capsize=2,
                    **{**EXPERIMENT, "marker": markers[d]},
                )
        ws = sorted({r["width"] for r in sweep})
        ax3.set_xscale("log", base=2)
        ax3.set_yscale("log")
        ax3.set_xticks(ws, [str(w) for w in ws])
        ax3.xaxis.set_minor_locator(plt.NullLocator())
        ax3.set_xlabel("hidden width M (units per layer)")
        ax3.set_ylabel("training loss after one step / initial loss")
        ax3.set_title(f"mean ± s.e. over {sizes.sweep_seeds} networks; theory: → 0 as M → ∞", fontsize=9.5)
        ax3.grid(True, which="both", alpha=0.25)
        ax3.legend(fontsize=7.5, loc="lower left")
    fig.suptitle(f"Block tri-diagonal NGD: MNIST 0 vs 7, N = {sizes.n}, ReLU, σ_w² = 2, σ_b² = 0", fontsize=10)
    fig.tight_layout()
    return fig
