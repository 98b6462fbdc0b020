"""Block tri-diagonal NGD against depth: α and the loss after one step at η = 1/α (the paper's Lemma 4.3, B.2).

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

from .. import fisher as _fisher
from .. import theory
from ..data import mnist_binary
from ..fisher import tridiagonal_sigma
from ..models import signals as model_signals
from ..network import MLP
from .common import Check, Result, Settings, mse, progress
from .plotting import EXPERIMENT, THEORY, finish, legend_theory_experiment, method_style, note, width_axis

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
HALF = 0.32  # half the width of a theory line at one depth
FLOOR = 1e-10  # the one-step loss ratios below this (L = 1: the network is linear in θ) are drawn here


def predict(depth: int) -> tuple[float | None, float]:
    """(1^T Σ^{-1} 1 via ``nat.theory.alpha``, or None where Σ is singular; 1^T Σ^+ 1, the ρ → 0⁺ limit)."""
    try:
        a = theory.alpha(_fisher.BlockTriDiagonal(), widths=[1] * depth + [1])
    except ValueError:
        a = None
    s = tridiagonal_sigma(depth)
    ones = torch.ones(depth, dtype=torch.float64)
    return a, float(ones @ torch.linalg.pinv(s) @ ones)


@torch.no_grad()
def one_step(net: MLP, fx, fisher: _fisher.Fisher, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(α̂, cond Θ̄(x, x), loss after one NGD step at η = 1/α̂ over the initial loss); the network is
    restored afterwards."""
    bound = fisher.bind(fx)
    iso = bound.isotropy()
    step = bound.natural_gradient(y)
    eta = 1.0 / iso.alpha
    params = list(net.parameters())
    for p, g in zip(params, step, strict=True):
        p.sub_(g.to(p.dtype), alpha=eta)
    after = mse(net(x).double(), y.double())
    for p, g in zip(params, step, strict=True):
        p.add_(g.to(p.dtype), alpha=eta)
    return iso.alpha, iso.condition_number, after / mse(fx.f.double(), y.double())


def predict_damped(fisher: _fisher.Fisher, x: torch.Tensor, depth: int, r: torch.Tensor) -> tuple[float, float]:
    """Infinite-width (α = mean eigenvalue of Θ̄, one-step loss ratio ||(I − Θ̄/α) r||² / ||r||²) at the
    Fisher's damping, for the initial residual r (N,)."""
    tb = theory.coefficient(fisher, None, x, depth=depth, activation="relu", sigma_w2=SIGMA_W2, sigma_b2=SIGMA_B2)
    a = float(torch.linalg.eigvalsh(0.5 * (tb + tb.T)).mean())
    res = r - tb @ r / a
    return a, float(res @ res / (r @ r))


def _measured(fisher_name: str, damping: float, result: tuple[float, float, float]) -> dict:
    a, c, l = result
    return {"fisher": fisher_name, "damping": damping, "alpha_hat": a, "condition_number": c, "loss_ratio": l}


def _depth_rows(settings: Settings, sizes: Sizes, depth: int, data, raised: list[int]) -> list[dict]:
    """The rows of one depth: exact NGD, and tri-diagonal NGD at ρ = 0 or, for a singular Σ, at each
    of ``sizes.dampings`` (recording in ``raised`` that ρ = 0 raises)."""
    x64, y64, x, y = data
    a_inv, a_pinv = predict(depth)
    net = settings.network([x.shape[1]] + [sizes.width] * (depth - 1) + [1], "relu", SIGMA_W2, SIGMA_B2)
    fx = model_signals(net, x)
    base = {
        "sweep": "depth",
        "depth": depth,
        "width": sizes.width,
        "singular_sigma": a_inv is None,
        "alpha_sigma_inverse": a_inv,
        "alpha_sigma_pinv": a_pinv,
    }
    theory0 = {"loss_ratio_theory": 0.0}
    rows = [
        {**base, **_measured("exact", 0.0, one_step(net, fx, _fisher.Exact(), x, y)), "alpha_theory": 1.0, **theory0}
    ]
    if a_inv is not None:
        tri = one_step(net, fx, _fisher.BlockTriDiagonal(), x, y)
        return [*rows, {**base, **_measured("block_tridiagonal", 0.0, tri), "alpha_theory": a_inv, **theory0}]
    try:  # the library refuses ρ = 0 for a singular Σ
        _fisher.BlockTriDiagonal().bind(fx).coefficient()
    except ValueError:
        raised.append(depth)
    r = (fx.f.double() - y64.to(fx.f.device)).reshape(-1).cpu()
    for rho in sizes.dampings:
        fisher = _fisher.BlockTriDiagonal(damping=rho)
        measured = _measured("block_tridiagonal", rho, one_step(net, fx, fisher, x, y))
        a_th, l_th = predict_damped(fisher, x64, depth, r)
        rows.append({**base, **measured, "alpha_theory": a_th, "loss_ratio_theory": l_th})
    return rows


def _width_rows(settings: Settings, sizes: Sizes, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """One-step loss ratios of exact and tri-diagonal NGD against the width, over a few networks."""
    rows = []
    grid = [(m, d, k) for m in sizes.sweep_widths for d in sizes.sweep_depths for k in range(sizes.sweep_seeds)]
    for m, depth, k in progress(grid, settings, "tridiagonal widths"):
        seed = settings.seed + k
        net = settings.network([x.shape[1]] + [m] * (depth - 1) + [1], "relu", SIGMA_W2, SIGMA_B2, seed=seed)
        fx = model_signals(net, x)
        singular = predict(depth)[0] is None
        rho = min(sizes.dampings) if singular else 0.0
        for name, fisher in (("exact", _fisher.Exact()), ("block_tridiagonal", _fisher.BlockTriDiagonal(damping=rho))):
            a_hat, cond, ratio = one_step(net, fx, fisher, x, y)
            rows.append(
                {
                    "sweep": "width",
                    "depth": depth,
                    "width": m,
                    "network_seed": seed,
                    "fisher": name,
                    "damping": 0.0 if name == "exact" else rho,
                    "alpha_hat": a_hat,
                    "condition_number": cond,
                    "loss_ratio": ratio,
                    "singular_sigma": singular,
                }
            )
        del net, fx
    return rows


def measure(settings: Settings, sizes: Sizes) -> tuple[list[dict], list[int]]:
    """(rows of the depth sweep then the width sweep, the singular depths at which ρ = 0 raised)."""
    ds = mnist_binary((0, 7), n_train=sizes.n, n_test=0, seed=settings.seed, dtype=torch.float64)
    x64, y64 = ds.x_train, ds.y_train
    x, y = x64.to(settings.device, settings.dtype), y64.to(settings.device, settings.dtype)
    rows, raised = [], []
    for depth in progress(sizes.depths, settings, "tridiagonal"):
        rows += _depth_rows(settings, sizes, depth, (x64, y64, x, y), raised)
    return rows + _width_rows(settings, sizes, x, y), raised


def _checks(rows: list[dict], sizes: Sizes, raised: list[int]) -> list[Check]:
    depths = list(sizes.depths)
    main = [r for r in rows if r["sweep"] == "depth"]
    nonsing = [r for r in main if r["fisher"] == "block_tridiagonal" and r["damping"] == 0]
    seq_th = ["singular" if predict(d)[0] is None else f"{predict(d)[0]:g}" for d in depths]
    seq_ex = []
    for depth in depths:
        hit = [r for r in nonsing if r["depth"] == depth]
        seq_ex.append(f"{hit[0]['alpha_hat']:.4g}" if hit else ("raises" if depth in raised else "—"))
    paper_seq = "1, singular, 1, 2, singular, 2, 3, singular, 3, 4, singular, 4"
    if depths == list(range(1, len(depths) + 1)):
        paper_seq = ", ".join(paper_seq.split(", ")[: len(depths)])
    small = min(sizes.dampings)
    damped = [r for r in main if r["fisher"] == "block_tridiagonal" and r["damping"] == small]
    exact = [r for r in main if r["fisher"] == "exact"]
    one_step_title = "largest (loss after 1 step)/(initial), {}, M = " + str(sizes.width)
    return [
        Check(f"α for L = {depths[0]}…{depths[-1]}", paper_seq, ", ".join(seq_th), ", ".join(seq_ex)),
        Check(
            "depths with singular Σ",
            "L = 3s + 2",
            ", ".join(map(str, _singular(depths))),
            "ρ = 0 raises at " + ", ".join(map(str, raised)),
        ),
        Check(
            f"α̂ at the singular depths, ρ = {small:g}",
            "no ρ → 0 limit (B.1)",
            "1ᵀΣ⁺1 = " + ", ".join(f"{r['alpha_sigma_pinv']:g}" for r in damped),
            ", ".join(f"{r['alpha_hat']:.4g}" for r in damped),
        ),
        Check(
            one_step_title.format("tri-diagonal, ρ = 0"),
            "0 (one-step convergence)",
            0.0,
            max(r["loss_ratio"] for r in nonsing) if nonsing else float("nan"),
        ),
        Check(one_step_title.format("exact NGD"), "0 (one-step convergence)", 0.0, max(r["loss_ratio"] for r in exact)),
    ]


def _singular(depths) -> list[int]:
    return [d for d in depths if predict(d)[0] is None]


def run(settings: Settings, sizes: Sizes | None = None) -> Result:
    sizes = sizes or settings.sizes(QUICK, FULL)
    rows, raised = measure(settings, sizes)
    main = [r for r in rows if r["sweep"] == "depth"]
    nonsing = [r for r in main if r["fisher"] == "block_tridiagonal" and r["damping"] == 0]
    exact = [r for r in main if r["fisher"] == "exact"]
    dev = max(abs(r["alpha_hat"] - r["alpha_theory"]) for r in nonsing) if nonsing else float("nan")
    summary = (
        f"M = {sizes.width}, MNIST N = {sizes.n}: α̂ = 1ᵀΣ⁻¹1 within {dev:.1g} at every non-singular depth; at L = "
        f"{', '.join(map(str, _singular(sizes.depths)))} ρ = 0 raises and small ρ gives α̂ → 1ᵀΣ⁺1 = s + 1 with "
        f"cond → 1 (the ρ → 0⁺ limit exists); one-step loss ratios up to "
        f"{max(r['loss_ratio'] for r in nonsing + exact):.2g} come from finite width (exact NGD alike)"
    )
    fig = plot(main, sizes, [r for r in rows if r["sweep"] == "width"])
    return Result(NAME, TITLE, summary, _checks(rows, sizes, raised), rows, fig, settings.describe())


def _shade_singular(axes, depths) -> None:
    for ax in axes:
        for i, d in enumerate(_singular(depths)):
            label = "Σ singular (L = 3s + 2)" if ax is axes[0] and i == 0 else None
            ax.axvspan(d - 0.5, d + 0.5, color="0.88", zorder=0, label=label)


def _plot_damped(ax1, ax2, rows: list[dict]) -> None:
    """α̂ and the one-step loss at the singular depths for each damping, with the ρ → 0⁺ limit."""
    color_t, _ = method_style("block_tridiagonal")
    seen: set = set()
    for r in rows:
        if r["fisher"] != "block_tridiagonal" or r["damping"] == 0:
            continue
        d, rho = r["depth"], r["damping"]
        c, mk = _DAMP_STYLE.get(rho, ("#17becf", "D"))
        if d not in seen:
            label = r"$\rho\to0^+$ limit $1^T\Sigma^+1$" if not seen else None
            ax1.hlines(
                r["alpha_sigma_pinv"], d - HALF, d + HALF, color=color_t, linestyles=":", linewidth=2.0, label=label
            )
            seen.add(d)
        label = f"tri-diag., ρ = {rho:g}" if rho not in seen else None
        seen.add(rho)
        ax1.hlines(r["alpha_theory"], d - HALF, d + HALF, color=c, linewidth=1.2)
        ax1.plot(d, r["alpha_hat"], color=c, label=label, **{**EXPERIMENT, "marker": mk})
        if r["loss_ratio_theory"] > FLOOR:
            ax2.hlines(r["loss_ratio_theory"], d - HALF, d + HALF, color=c, linewidth=1.2)
        ax2.plot(d, r["loss_ratio"], color=c, label=label, **{**EXPERIMENT, "marker": mk})


def _plot_alpha_theory(ax1, depths: list[int]) -> None:
    """1ᵀΣ⁻¹1 at every depth where Σ is invertible."""
    color_t, _ = method_style("block_tridiagonal")
    first = True
    for d in depths:
        a_inv, _ = predict(d)
        if a_inv is not None:
            ax1.hlines(
                a_inv, d - HALF, d + HALF, color=color_t, label=r"$1^T\Sigma^{-1}1$" if first else None, **THEORY
            )
            first = False


def _plot_alpha(ax1, rows: list[dict]) -> None:
    """α̂ of tri-diagonal NGD at ρ = 0 against depth, and the panel's axes and legend."""
    color_t, label_t = method_style("block_tridiagonal")
    tri = [r for r in rows if r["fisher"] == "block_tridiagonal" and r["damping"] == 0]
    ax1.plot(
        [r["depth"] for r in tri], [r["alpha_hat"] for r in tri], color=color_t, label=f"{label_t}, ρ = 0", **EXPERIMENT
    )
    ax1.set_yscale("log")
    ax1.set_xlabel("depth L (number of weight layers)")
    ax1.set_ylabel(r"$\alpha$ (mean eigenvalue of $\bar{\Theta}(x, x)$, dimensionless)")
    ax1.set_title("isotropy constant α; lines at singular L: M → ∞ at that ρ", fontsize=9.5)
    legend_theory_experiment(ax1)
    ax1.get_legend().set_loc("center")
    ax1.get_legend().set_bbox_to_anchor((0.62, 0.42))


def _plot_one_step(ax2, rows: list[dict], sizes: Sizes) -> None:
    for name, marker in (("block_tridiagonal", {}), ("exact", {"marker": "x"})):
        color, label = method_style(name)
        pts = [r for r in rows if r["fisher"] == name and (name == "exact" or r["damping"] == 0)]
        if marker:
            marker["markerfacecolor"] = color
        ax2.plot(
            [r["depth"] for r in pts],
            [max(r["loss_ratio"], FLOOR) for r in pts],
            color=color,
            label=f"{label}, ρ = 0" if name != "exact" else label,
            **{**EXPERIMENT, **marker},
        )
    ax2.set_yscale("log")
    ax2.set_ylim(FLOOR / 3, None)
    ax2.set_xlabel("depth L (number of weight layers)")
    ax2.set_ylabel("training loss after one step / initial loss")
    ax2.set_title(f"one step at η = 1/α̂, M = {sizes.width} (theory at ρ = 0: exactly 0)", fontsize=9.5)
    if sizes.depths[0] == 1:
        ax2.annotate(
            "L = 1: linear in θ,\nratio ≈ 1e-27",
            xy=(1, FLOOR),
            xytext=(1.3, FLOOR * 1e3),
            fontsize=7.5,
            arrowprops={"arrowstyle": "->", "lw": 0.8},
        )
    note(ax2, 0.98, 0.03, r"lines: linear model with the M → ∞ $\bar{\Theta}$ at that ρ", ha="right")
    ax2.legend(fontsize=8, loc="center right")


def _plot_widths(ax3, sweep: list[dict], sizes: Sizes) -> None:
    """Mean ± s.e. of the one-step loss ratio over networks against the width."""
    markers = dict(zip(sizes.sweep_depths, ("o", "D", "s", "^")))
    for d in sizes.sweep_depths:
        for name in ("exact", "block_tridiagonal"):
            pts = [r for r in sweep if r["depth"] == d and r["fisher"] == name]
            if not pts:
                continue
            color, label = method_style(name)
            rho = pts[0]["damping"]
            ws = sorted({r["width"] for r in pts})
            vals = [np.array([r["loss_ratio"] for r in pts if r["width"] == w]) for w in ws]
            mean = np.array([v.mean() for v in vals])
            err = np.array([v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0 for v in vals])
            lab = f"{label}, L = {d}" + (f" (singular, ρ = {rho:g})" if rho > 0 else "")
            style = {**EXPERIMENT, "marker": markers[d]}
            ax3.errorbar(ws, mean, yerr=np.minimum(err, 0.9 * mean), color=color, label=lab, capsize=2, **style)
    ax3.set_yscale("log")
    width_axis(ax3, sorted({r["width"] for r in sweep}))
    ax3.set_ylabel("training loss after one step / initial loss")
    ax3.set_title(f"mean ± s.e. over {sizes.sweep_seeds} networks; theory: → 0 as M → ∞", fontsize=9.5)
    ax3.grid(True, which="both", alpha=0.25)
    ax3.legend(fontsize=7.5, loc="lower left")


def plot(rows: list[dict], sizes: Sizes, sweep: list[dict]):
    """α against depth, the one-step loss against depth, and (with a width sweep) against width."""
    panels = 3 if sweep else 2
    ratios = [1.2, 1.2, 1][:panels]
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.9), gridspec_kw={"width_ratios": ratios})
    depths = list(sizes.depths)
    _shade_singular(axes[:2], depths)
    _plot_alpha_theory(axes[0], depths)
    _plot_damped(axes[0], axes[1], rows)
    _plot_alpha(axes[0], rows)
    _plot_one_step(axes[1], rows, sizes)
    for ax in axes[:2]:
        ax.set_xticks(depths)
        ax.set_xlim(depths[0] - 0.6, depths[-1] + 0.6)
        ax.grid(True, which="major", axis="y", alpha=0.25)
    if sweep:
        _plot_widths(axes[2], sweep, sizes)
    return finish(fig, f"Block tri-diagonal NGD: MNIST 0 vs 7, N = {sizes.n}, ReLU, σ_w² = 2, σ_b² = 0")
