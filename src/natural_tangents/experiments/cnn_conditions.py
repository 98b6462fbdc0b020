"""Does the paper's isotropy condition hold beyond the MLP? α̂, the conditioning of Θ̄ and one-step
convergence of every approximate Fisher on a convolutional network as its channels grow.

The paper (Karakida and Osawa, NeurIPS 2020) proves fast convergence of layer-wise, K-FAC and
unit-wise NGD in wide MLPs through Condition 1, Θ̄(x, x) = α I on the training set, with
Θ̄ = J G^{-1} J^T / N (S.4); nothing in it covers weight sharing. Here the five Fishers act on the
CNN of :mod:`.cnn_network` (two 3×3 convolutions with M channels, ReLU, pooling, a linear readout;
NTK-style scaling; docs/cnn_conditions.md), on N unit-norm MNIST images with C = 1 (0 vs 7) and
C = 10, for several seeds, at ρ = 0 (pseudo-inverses) and at ρ = 10⁻³ λ̄ (λ̄ = tr Θ / (N·C), the mean
nonzero eigenvalue of the exact Fisher; the same relative damping at every width).

Measured per Fisher: α̂ = tr Θ̄ / (N·C), the condition number and ||Θ̄/α̂ − I||₂ of Θ̄(x, x), and the
training loss after one NGD step with η = 1/α̂ over the loss before, for the network and for its
linearization (||(I − Θ̄/α̂) r||² / ||r||², 0 when Θ̄ = α̂ I); next to them the MLP's closed-form α for
widths [784, M, M, C] and α̂ from ranks alone (:func:`~.cnn_network.rank_formula`).

What to expect at ρ = 0 (sums of projections, (S.71), (S.74), (S.137)): exact NGD projects on the
range of J (= I once J has full row rank N·C); block-diagonal Θ̄ = Σ_l Θ_l Θ_l^+, so α̂ = Σ_l rank
J_l / (N·C) and Θ̄ = L I as soon as every layer's Jacobian has full row rank (the first convolution
has 9M parameters, the pooled readout row rank min(N, M)·C); block tri-diagonal at L = 3 has
Σ^{-1} 1 = (0, 1, 0), so Θ̄ = Θ_2 Θ_2^+, the middle convolution's projection; unit-wise
Θ̄ = Σ_units J_u (J_u^T J_u)^+ J_u^T, projections of rank ≤ the unit's parameter count — nine for a
first-layer filter; K-FAC (KFC) shares its factors over positions and has no such formula.

Rows (CSV/JSON), one per C (``outputs``), ``channels`` M, network ``seed``, Fisher (``method``) and
damping (``damping_relative`` 0 or 10⁻³, ``damping`` the absolute ρ): ``alpha_hat``,
``alpha_rank_formula``, ``alpha_mlp``, ``condition_number`` (∞ when Θ̄ is singular), ``deviation``
(||Θ̄/α̂ − I||₂), ``rank_fraction`` (of Θ̄), ``loss_ratio`` (network), ``loss_ratio_linear``,
``relative_step`` (||η Δθ|| / ||θ||), ``runtime_warnings`` (K-FAC's narrow-readout warning),
``lambda_bar``, ``rank_layer1..3`` (row ranks of J_l), ``params_layer1..3`` and ``n_times_c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from .cnn_network import DEPTH, METHODS, RELATIVE_DAMPING, alpha_mlp, inputs, measure_network, network
from .common import Check, Result, Settings, progress
from .plotting import DOTTED, THEORY, finish, method_style, note

NAME = "cnn-conditions"
TITLE = "Beyond the MLP: α̂, isotropy of Θ̄ and one-step convergence of every Fisher on a CNN as channels grow"

#: Θ̄ counts as α̂ I when ||Θ̄/α̂ − I||₂ is below this: float64 networks, float32 networks
ISOTROPIC = {"torch.float64": 1e-6, "torch.float32": 1e-3}
FLOOR = 1e-14


@dataclass(frozen=True)
class Sizes:
    """Channels M swept for C = 1 and for C = 10, network seeds, N training images.

    The C = 10 sweep stops lower: the per-sample Jacobians of the middle convolution hold N·C·9M²
    numbers and each of its units solves an N·C × N·C system."""

    channels: tuple[int, ...]
    channels_c10: tuple[int, ...]
    seeds: int
    n: int = 100


QUICK = Sizes(channels=(4, 8, 16, 32), channels_c10=(4, 8, 16, 32), seeds=2, n=24)
FULL = Sizes(channels=(8, 16, 32, 64, 128, 256), channels_c10=(8, 16, 32, 64, 128), seeds=3)


def channel_sweeps(settings: Settings, sizes: Sizes) -> dict[int, tuple[int, ...]]:
    """C → the channels swept (``settings.max_width`` caps them)."""
    out = {}
    for c, chans in ((1, sizes.channels), (10, sizes.channels_c10)):
        kept = tuple(m for m in chans if settings.max_width is None or m <= settings.max_width)
        out[c] = kept or (min(chans),)
    return out


def measure(settings: Settings, sizes: Sizes) -> list[dict]:
    """All rows: per C, channels M, seed, Fisher and damping."""
    rows = []
    sweeps = channel_sweeps(settings, sizes)
    jobs = [(c, m, s) for c, chans in sweeps.items() for m in chans for s in range(sizes.seeds)]
    data = {c: inputs(c, sizes.n, seed=settings.seed, dtype=settings.dtype, device=settings.device) for c in sweeps}
    for c, m, s in progress(jobs, settings, NAME):
        x, y = data[c]
        net = network(m, c, seed=settings.seed + s, dtype=settings.dtype, device=settings.device)
        net_rows, facts = measure_network(net, x, y)
        params = [p.numel() for p in net.parameters()]
        for r in net_rows:
            rows.append(
                {
                    "outputs": c,
                    "channels": m,
                    "seed": settings.seed + s,
                    **r,
                    "alpha_mlp": alpha_mlp(r["method"], m, c, sizes.n),
                    "lambda_bar": facts["lambda_bar"],
                    **{f"rank_layer{l + 1}": k for l, k in enumerate(facts["layer_ranks"])},
                    **{f"params_layer{l + 1}": p for l, p in enumerate(params)},
                    "n_times_c": sizes.n * c,
                }
            )
    return rows


# ------------------------------------------------------------------------------------ the report
def _value(v) -> float:
    """A row's number as a float: rows read back from the JSON hold None for NaN and "inf" for ∞."""
    if v is None:
        return float("nan")
    return float(v)


def _series(rows: list[dict], method: str, c: int, rel: float, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(channels, values (seeds × channels)) of one Fisher at one C and damping."""
    chans = sorted({r["channels"] for r in rows if r["outputs"] == c})
    seeds = sorted({r["seed"] for r in rows})
    vals = np.full((len(seeds), len(chans)), np.nan)
    for r in rows:
        if r["method"] == method and r["outputs"] == c and r["damping_relative"] == rel:
            vals[seeds.index(r["seed"]), chans.index(r["channels"])] = _value(r[key])
    return np.asarray(chans), vals


def _median(rows: list[dict], method: str, c: int, m: int, key: str, rel: float = 0.0) -> float:
    vals = [
        r[key] for r in rows if (r["method"], r["outputs"], r["channels"], r["damping_relative"]) == (method, c, m, rel)
    ]
    return float(np.median([_value(v) for v in vals])) if vals else float("nan")


def _band(ax, x, vals, color, *, lo=FLOOR, hi=None, **style) -> None:
    """Median over seeds (markers and dotted line) with the min–max band; values clipped to [lo, hi]."""
    v = np.clip(np.where(np.isinf(vals), hi if hi is not None else np.nan, vals), lo, hi)
    ax.plot(x, np.median(v, 0), color=color, **style)
    if v.shape[0] > 1:
        ax.fill_between(x, v.min(0), v.max(0), color=color, alpha=0.15, linewidth=0)


def plot(rows: list[dict], n: int):
    """Rows: C = 1, C = 10. Columns: α̂ (markers) against the MLP's closed-form α (lines);
    ||Θ̄/α̂ − I||₂ at ρ = 0 (markers, dotted) and ρ = 10⁻³ λ̄ (dashed); one-step loss ratio of the
    network (markers) and of its linearization (lines). Bands: min–max over the seeds."""
    outputs = sorted({r["outputs"] for r in rows})
    fig, axes = plt.subplots(len(outputs), 3, figsize=(15, 4.3 * len(outputs)), squeeze=False)
    top = 1e8
    for row, c in zip(axes, outputs):
        ax_a, ax_d, ax_l = row
        for name in METHODS:
            color, label = method_style(name)
            x, a = _series(rows, name, c, 0.0, "alpha_hat")
            _band(ax_a, x, a, color, **{**DOTTED, "linestyle": "none"})
            mlp = _series(rows, name, c, 0.0, "alpha_mlp")[1][0]
            ax_a.plot(x, mlp, color=color, label=label, **THEORY)
            if name == "kfac":
                est = np.median(_series(rows, name, c, 0.0, "alpha_rank_formula")[1], 0)
                ax_a.plot(x, est, color=color, linestyle="-.", linewidth=1.0, label="K-FAC: Σ rank A* rank B* / (N C)")
            _, dev = _series(rows, name, c, 0.0, "deviation")
            _band(ax_d, x, dev, color, **DOTTED, label=label)
            _, dev_r = _series(rows, name, c, RELATIVE_DAMPING, "deviation")
            ax_d.plot(x, np.clip(np.median(dev_r, 0), FLOOR, None), color=color, linestyle="--", linewidth=1.0)
            _, lin = _series(rows, name, c, 0.0, "loss_ratio_linear")
            _band(ax_l, x, lin, color, lo=1e-30, **THEORY, label=label)
            _, net = _series(rows, name, c, 0.0, "loss_ratio")
            _band(ax_l, x, net, color, lo=1e-30, hi=top, **{**DOTTED, "linestyle": "none"})
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(x), [str(m) for m in x])
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("channels M of both convolutions")
            ax.grid(True, which="both", alpha=0.25)
        ax_a.set_ylabel(r"$\hat\alpha$ = tr $\bar\Theta$ / (N C) (dimensionless)")
        ax_a.set_title(f"C = {c}: α̂ (markers); the MLP's α, widths [784, M, M, C] (lines)", fontsize=9)
        ax_a.legend(fontsize=7.5, loc="upper left")
        ax_d.set_ylabel(r"$\|\bar\Theta/\hat\alpha - I\|_2$ (0 ⇔ Condition 1)")
        ax_d.set_title(f"C = {c}: deviation from isotropy; ρ = 0 dotted, ρ = 10⁻³ λ̄ dashed", fontsize=9)
        ax_d.set_ylim(FLOOR / 3, None)
        note(ax_d, 0.02, 0.03, f"values below {FLOOR:g} drawn at {FLOOR:g}")
        ax_l.set_ylabel("training loss after one step / before (η = 1/α̂, ρ = 0)")
        ax_l.set_title(f"C = {c}: linearized network (lines) and network (markers)", fontsize=9)
        ax_l.axhline(1.0, color="gray", linewidth=0.8)
        note(ax_l, 0.02, 0.03, f"network ratios above {top:g} drawn at {top:g}")
    return finish(
        fig,
        f"CNN (conv 3×3 s2 → ReLU → pool → conv 3×3 s2 → ReLU → GAP → linear; NTK-style), MNIST N = {n}; "
        "bands: min–max over seeds",
    )


def _onset(rows: list[dict], method: str, c: int, tol: float) -> int | None:
    """The smallest M from which Θ̄ = α̂ I (deviation < tol) for every seed and every larger M."""
    x, dev = _series(rows, method, c, 0.0, "deviation")
    ok = np.all(dev < tol, 0)
    if not ok[-1]:
        return None
    first = len(ok) - 1
    while first > 0 and ok[first - 1]:
        first -= 1
    return int(x[first])


def trend(rows: list[dict], method: str, c: int, tol: float = ISOTROPIC["torch.float64"]) -> str:
    """How cond(Θ̄) (median over seeds, ρ = 0) behaves over the channels: Θ̄ = α̂ I from some M on,
    or the local exponent p of cond − 1 ∝ M^p over the last step of the sweep ("falling" below −0.3,
    else "levelling off")."""
    onset = _onset(rows, method, c, tol)
    if onset is not None:
        return f"C = {c}: Θ̄ = α̂ I from M = {onset} on"
    x, cond = _series(rows, method, c, 0.0, "condition_number")
    finite = np.all(np.isfinite(cond), 0)
    k = 0
    while k < len(x) and finite[len(x) - 1 - k]:
        k += 1
    if k == 0:
        return f"C = {c}: Θ̄ singular at every M"
    xs, ms = x[len(x) - k :], np.median(cond[:, len(x) - k :], 0)
    lead = "" if k == len(x) else f"singular up to M = {x[len(x) - k - 1]}, then "
    span = f"cond {ms[0]:.3g} at M = {xs[0]} → {ms[-1]:.3g} at M = {xs[-1]}"
    if k < 2:
        return f"C = {c}: {lead}{span}"
    p = math.log(max(ms[-1] - 1.0, 1e-300) / max(ms[-2] - 1.0, 1e-300)) / math.log(xs[-1] / xs[-2])
    verb = "still falling" if p < -0.3 else "levelling off"
    return f"C = {c}: {lead}{span}, {verb} (cond − 1 ∝ M^{p:.2f} from M = {xs[-2]} to {xs[-1]})"


def sentences(rows: list[dict], n: int, tol: float = ISOTROPIC["torch.float64"]) -> dict[str, str]:
    """One sentence per Fisher, with the numbers of this run (ρ = 0)."""
    outputs = sorted({r["outputs"] for r in rows})
    last = {c: max(r["channels"] for r in rows if r["outputs"] == c) for c in outputs}
    c0 = outputs[0]
    m0 = last[c0]

    def med(method: str, key: str, c: int = c0) -> float:
        return _median(rows, method, c, last[c], key)

    trends = {name: "; ".join(trend(rows, name, c, tol) for c in outputs) for name in METHODS}
    a_k, est_k = med("kfac", "alpha_hat"), med("kfac", "alpha_rank_formula")
    return {
        "exact": (
            f"Exact: Θ̄ is the projection on the range of J (α̂ = rank J/(N C) at every width, "
            f"{med('exact', 'alpha_hat'):.4g} at M = {m0}); {trends['exact']}: isotropic as soon as J has "
            "full row rank, as in the MLP"
        ),
        "block_diagonal": (
            f"Block diagonal: Θ̄ = Σ_l Θ_l Θ_l^+ and α̂ = Σ_l rank J_l/(N C) exactly (α̂ = "
            f"{med('block_diagonal', 'alpha_hat'):.4g} at M = {m0}, the MLP's L = {DEPTH}); "
            f"{trends['block_diagonal']}: Θ̄ = L I once every layer's Jacobian has row rank N C — the first "
            "convolution has 9M parameters and the pooled readout row rank min(N, M)·C, so this needs "
            "M ≥ N C/9 and M ≥ N; weight sharing does not matter"
        ),
        "block_tridiagonal": (
            f"Block tri-diagonal (L = 3: Σ^{{-1}} 1 = (0, 1, 0), so Θ̄ = Θ_2 Θ_2^+, the middle convolution's "
            f"projection; α̂ = {med('block_tridiagonal', 'alpha_hat'):.4g} at M = {m0}, the MLP's 1): "
            f"{trends['block_tridiagonal']} — the middle convolution has 9M² parameters"
        ),
        "kfac": (
            f"K-FAC (KFC): α̂ = {a_k:.4g} at M = {m0} (C = {c0}), not the MLP's N L = {n * DEPTH}: it is "
            f"{a_k / est_k:.2g} times Σ_l rank A*_l · rank B*_l/(N C) = {est_k:.4g}, the value if positions "
            f"were independent samples (N T patches fill A*_l, so α̂ grows with M); {trends['kfac']}: the "
            "factors average over positions and drop the cross-position terms Σ_{t≠s} δ_t δ_s^T ⊗ a_t a_s^T "
            "of the exact block, so Θ̄ is not a sum of projections and nothing forces it to α I"
        ),
        "unitwise": (
            f"Unit-wise: α̂ = {med('unitwise', 'alpha_hat'):.4g} at M = {m0} (the MLP's Σ γ_l M_l + C = "
            f"{med('unitwise', 'alpha_mlp'):.4g}); {trends['unitwise']}: Θ̄ = Σ_units J_u (J_u^T J_u)^+ J_u^T "
            "and a first-layer unit (one 3×3 filter) has 9 parameters, so its projection has rank ≤ 9 < N C; "
            "the M of them, all built from the same image patches, add an O(M) term (about 9M/(N C) per "
            "direction on average) that is not a multiple of I, while the wider units contribute I each "
            "(C = 1)"
        ),
    }


def one_step_sentence(rows: list[dict], tol: float = ISOTROPIC["torch.float64"]) -> str:
    """What one NGD step with η = 1/α̂ (ρ = 0) does to the linearized network and to the network."""
    zero = [r for r in rows if r["damping_relative"] == 0.0]
    iso = [r["loss_ratio_linear"] for r in zero if r["deviation"] < tol]
    c0 = min(r["outputs"] for r in zero)
    m0 = max(r["channels"] for r in zero if r["outputs"] == c0)
    lin = {name: _median(rows, name, c0, m0, "loss_ratio_linear") for name in ("kfac", "unitwise")}
    steps = [r["relative_step"] for r in zero if r["method"] == "exact"]
    net = [r["loss_ratio"] for r in zero if r["method"] == "exact"]
    lead = (
        f"One step with η = 1/α̂ takes the linearized network's loss to ≤ {max(iso):.0e} of its start wherever "
        "Θ̄ = α̂ I, and to"
        if iso
        else "Θ̄ is nowhere α̂ I; one step with η = 1/α̂ takes the linearized network's loss to"
    )
    return (
        f"{lead} {lin['kfac']:.2g} (K-FAC) and {lin['unitwise']:.2g} (unit-wise) of its start at M = {m0}, "
        f"C = {c0}; the networks themselves are far from linear at these widths: exact NGD moves the weights "
        f"by {min(steps):.2g}–{max(steps):.2g} times their norm, and their loss after the step is "
        f"{min(net):.2g}–{max(net):.2g} times the loss before"
    )


def _checks(rows: list[dict], n: int) -> list[Check]:
    outputs = sorted({r["outputs"] for r in rows})
    checks = []
    for name in METHODS:
        label = method_style(name)[1]
        for c in outputs:
            m = max(r["channels"] for r in rows if r["outputs"] == c)
            a_mlp = _median(rows, name, c, m, "alpha_mlp")
            paper = {
                "exact": "1",
                "block_diagonal": f"L = {DEPTH}",
                "block_tridiagonal": "1 (L = 3)",
                "kfac": f"N L = {n * DEPTH} (M ≥ N)",
                "unitwise": "Σ γ_l M_l + C (S.128)" if c == 1 else "— (C = 1 only; ours: Σ γ_l M_l / C + 1)",
            }[name]
            checks.append(
                Check(
                    f"{label}: α̂ at M = {m}, C = {c} (MLP: closed form)",
                    paper,
                    a_mlp,
                    _median(rows, name, c, m, "alpha_hat"),
                )
            )
            checks.append(
                Check(
                    f"{label}: cond(Θ̄) at M = {m}, C = {c}",
                    "1 for the MLP (Condition 1)" if name != "unitwise" else "→ 1 as M → ∞ for the MLP",
                    1.0 if name != "unitwise" else "—",
                    _median(rows, name, c, m, "condition_number"),
                )
            )
    return checks


def result(rows: list[dict], n: int, settings: dict) -> Result:
    """The :class:`Result` of measured rows (figure, sentences, checks)."""
    tol = ISOTROPIC.get(str(settings.get("dtype", torch.float64)), ISOTROPIC["torch.float32"])
    said = sentences(rows, n, tol)
    summary = ". ".join([*said.values(), one_step_sentence(rows, tol)])
    return Result(NAME, TITLE, summary, _checks(rows, n), rows, plot(rows, n), settings)


def run(settings: Settings, sizes: Sizes | None = None) -> Result:
    sizes = sizes or settings.sizes(QUICK, FULL)
    rows = measure(settings, sizes)
    return result(rows, sizes.n, {**settings.describe(), "n": sizes.n, "seeds": sizes.seeds})
