"""K-FAC with fewer input dimensions than samples (M_0 < N), before and after the Forster
transformation (the paper's B.3.1, (S.108)–(S.111)).

With M_0 < N the input factor A*_0 (M_0 × M_0) is inverted as it is (S.108) and, on the training set,

    Θ̄ / N = (L − 1) I + I ⊙ X (X^T X)^{-1} X^T                                        (S.109)

whose eigenvalues are (L − 1) + h_n, h_n the leverage scores of the inputs (0 < h_n < 1, Σ h_n = M_0):
not isotropic, so η = 1/α is not one-step optimal. The Forster transformation puts the inputs in radial
isotropic position (X̄^T X̄ = (N/M_0) I, unit rows), where h_n = M_0/N for every n and Θ̄ = α I with
α = N (L − 1) + M_0 (S.111).

Setting: Gaussian inputs N = 80, M_0 = 40 (unit norm), tanh-teacher targets (``nat.data.synthetic``),
ReLU, L = 3, σ_w² = 2, σ_b² = 0 (no bias: a bias column would widen the input to M_0 + 1 and keep it out
of radial isotropic position), ρ = 0, the paper's output factor B*_L = 1/N.

The library warns (RuntimeWarning) when K-FAC meets M_0 < N without Forster; the experiment records the
warnings it gets and reports them in its summary and rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from .. import dynamics, theory
from .. import fisher as _fisher
from ..data import forster, synthetic
from ..training import History, train
from .common import Check, Result, Settings, progress
from .plotting import EXPERIMENT, THEORY, finish, legend_theory_experiment, log_axis, note

NAME = "kfac-forster"
TITLE = "K-FAC with M_0 < N: eigenvalues of Θ̄ and training before and after the Forster transformation"

SIGMA_W2, SIGMA_B2 = 2.0, 0.0
DEPTH = 3
COLORS = {"raw": "#d62728", "forster": "#1f77b4"}
LABELS = {"raw": "raw inputs", "forster": "Forster-transformed"}
FLOOR = 1e-14


@dataclass(frozen=True)
class Sizes:
    """Hidden width M, N samples of width M_0, K-FAC training steps."""

    width: int
    n: int = 80
    m0: int = 40
    steps: int = 4


QUICK = Sizes(width=1024)
FULL = Sizes(width=4096, steps=6)


def leverage(x: torch.Tensor) -> torch.Tensor:
    """Leverage scores h_n = [X (X^T X)^{-1} X^T]_nn of the rows of x (N, M_0), float64."""
    x = x.double()
    return torch.einsum("nm,nm->n", x, torch.linalg.solve(x.T @ x, x.T).T)


def theory_coefficient(x: torch.Tensor, depth: int = DEPTH) -> torch.Tensor:
    """Θ̄(x, x) of K-FAC from (S.109): N ((L − 1) I + I ⊙ X (X^T X)^{-1} X^T), (N, N) float64."""
    n = x.shape[0]
    return n * torch.diag((depth - 1) + leverage(x))


@dataclass
class Case:
    """One input set. Measured: eigenvalues of Θ̄ / N (ascending), isotropy, training history, the
    RuntimeWarnings raised. Predicted: eigenvalues of (S.109) / N, the linearized loss, the library's α."""

    iso: _fisher.Isotropy
    eigenvalues: torch.Tensor
    history: History
    warnings: list[str]
    eigenvalues_theory: torch.Tensor | None = None
    loss_theory: torch.Tensor | None = None
    alpha_theory: float = float("nan")


def inputs(settings: Settings, sizes: Sizes) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({"raw": x, "forster": Forster(x)} in float64, the targets y (N, 1))."""
    ds = synthetic(sizes.n, sizes.m0, n_test=0, seed=settings.seed, dtype=torch.float64)
    return {"raw": ds.x_train, "forster": forster(ds.x_train)}, ds.y_train


def measure(settings: Settings, sizes: Sizes) -> tuple[dict[str, Case], dict[str, torch.Tensor]]:
    """(per input set: K-FAC's Θ̄ on a fresh network and its training at η = 1/α̂; f_0 per input set)."""
    xs, y64 = inputs(settings, sizes)
    y = y64.to(settings.device, settings.dtype)
    kfac = _fisher.KFAC()
    cases, f0 = {}, {}
    for key in progress(list(xs), settings, "kfac-forster"):
        x = xs[key].to(settings.device, settings.dtype)
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            net = settings.network([sizes.m0, sizes.width, sizes.width, 1], "relu", SIGMA_W2, SIGMA_B2)
            with torch.no_grad():
                f0[key] = net(x).double().cpu()
            iso = _fisher.isotropy(kfac.coefficient(net, x))
            hist = train(net, x, y, kfac, lr="optimal", steps=sizes.steps)
            a_th = theory.alpha(
                kfac,
                widths=[sizes.m0, sizes.width, sizes.width, 1],
                sigma_b2=SIGMA_B2,
                n_train=sizes.n,
                forster=key == "forster",
            )
        caught = [str(w.message) for w in log if issubclass(w.category, RuntimeWarning)]
        cases[key] = Case(iso, iso.eigenvalues / sizes.n, hist, caught, alpha_theory=a_th)
    return cases, f0


def predict(cases: dict[str, Case], f0: dict[str, torch.Tensor], settings: Settings, sizes: Sizes) -> None:
    """Fill in the eigenvalues of (S.109) and the linearized loss at the measured learning rate."""
    xs, y64 = inputs(settings, sizes)
    ts = list(range(sizes.steps + 1))
    for key, c in cases.items():
        th = theory_coefficient(xs[key])
        c.eigenvalues_theory = torch.linalg.eigvalsh(th) / sizes.n
        c.loss_theory = dynamics.ngd(th, y64, f0[key], c.history.lr).loss(ts)


def _rows(cases: dict[str, Case], sizes: Sizes) -> list[dict]:
    rows = []
    for key, c in cases.items():
        ev, ev_th, h = c.eigenvalues, c.eigenvalues_theory, c.history
        rows += [
            {
                "inputs": key,
                "kind": "eigenvalue",
                "index": i + 1,
                "eigenvalue_over_N": float(ev[i]),
                "eigenvalue_over_N_theory": float(ev_th[i]),
            }
            for i in range(sizes.n)
        ]
        rows += [
            {
                "inputs": key,
                "kind": "training",
                "step": t,
                "lr": h.lr,
                "train_loss": h.train_loss[t],
                "train_loss_theory": float(c.loss_theory[t]),
            }
            for t in range(sizes.steps + 1)
        ]
        rows.append(
            {
                "inputs": key,
                "kind": "summary",
                "alpha_hat": c.iso.alpha,
                "alpha_theory": c.alpha_theory,
                "condition_number": c.iso.condition_number,
                "condition_number_theory": float(ev_th[-1] / ev_th[0]),
                "runtime_warnings": len(c.warnings),
                "warning": " | ".join(sorted(set(c.warnings))),
            }
        )
    return rows


def plot(cases: dict[str, Case], sizes: Sizes):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    idx = np.arange(1, sizes.n + 1)
    ts = list(range(sizes.steps + 1))
    for key, c in cases.items():
        color = COLORS[key]
        th_label = "(L−1) + h_n (S.109)" if key == "raw" else "(L−1) + M_0/N (S.111)"
        ax1.plot(idx, c.eigenvalues_theory.numpy(), color=color, label=f"{LABELS[key]}: {th_label}", **THEORY)
        ax1.plot(idx, c.eigenvalues.numpy(), color=color, **{**EXPERIMENT, "markersize": 4})
        ax2.plot(ts, c.loss_theory.clamp_min(FLOOR).numpy(), color=color, label=LABELS[key], **THEORY)
        ax2.plot(ts, np.maximum(c.history.train_loss, FLOOR), color=color, **EXPERIMENT)
    ax1.set_xlabel("eigenvalue index n (ascending)")
    ax1.set_ylabel(r"eigenvalue of $\bar{\Theta}(x, x) / N$ (dimensionless)")
    ax1.set_title(f"K-FAC, N = {sizes.n} > M_0 = {sizes.m0}: isotropic only after Forster", fontsize=10)
    ax1.grid(True, alpha=0.25)
    legend_theory_experiment(ax1)
    log_axis(ax2, "training loss (1/2N) Σ (f − y)²", "K-FAC step t (η = 1/α̂)")
    ax2.set_ylim(FLOOR / 3, None)
    note(ax2, 0.98, 0.06, f"values below {FLOOR:g} drawn at {FLOOR:g}", ha="right")
    ax2.set_title(r"training at η = 1/α̂ (lines: linear model with $\bar{\Theta}$ of (S.109))", fontsize=10)
    ax2.set_xticks(ts)
    legend_theory_experiment(ax2)
    return finish(fig, f"ReLU, L = 3, M = {sizes.width}, Gaussian inputs, σ_w² = 2, σ_b² = 0, ρ = 0, B*_L = 1/N")


def _checks(raw: Case, fst: Case, alpha_paper: int) -> list[Check]:
    def cond_th(c: Case) -> float:
        return float(c.eigenvalues_theory[-1] / c.eigenvalues_theory[0])

    def one_step(c: Case) -> tuple[float, float]:
        return float(c.loss_theory[1] / c.loss_theory[0]), c.history.train_loss[1] / c.history.train_loss[0]

    return [
        Check("cond(Θ̄) before Forster", "> 1: not isotropic (S.109)", cond_th(raw), raw.iso.condition_number),
        Check("cond(Θ̄) − 1 after Forster", "0 (S.111)", cond_th(fst) - 1.0, fst.iso.condition_number - 1.0),
        Check("α after Forster", f"N(L−1) + M_0 = {alpha_paper} (S.111)", fst.alpha_theory, fst.iso.alpha),
        Check(
            "mean eigenvalue of Θ̄ before Forster", f"tr: N(L−1) + M_0 = {alpha_paper}", raw.alpha_theory, raw.iso.alpha
        ),
        Check("loss after 1 step / initial, before Forster", "> 0 (not one-step)", *one_step(raw)),
        Check("loss after 1 step / initial, after Forster", "0 (one-step)", *one_step(fst)),
    ]


def run(settings: Settings, sizes: Sizes | None = None) -> Result:
    sizes = sizes or settings.sizes(QUICK, FULL)
    cases, f0 = measure(settings, sizes)
    predict(cases, f0, settings, sizes)
    raw, fst = cases["raw"], cases["forster"]
    alpha_paper = sizes.n * (DEPTH - 1) + sizes.m0
    first_raw = sorted(set(raw.warnings))
    warned = (
        f"K-FAC raised {len(raw.warnings)} RuntimeWarning(s) on the raw inputs"
        + (f" ({first_raw[0].split(';')[0]})" if first_raw else "")
        + f" and {len(fst.warnings)} after Forster"
    )
    ratio = {k: c.history.train_loss[1] / c.history.train_loss[0] for k, c in cases.items()}
    summary = (
        f"M = {sizes.width}: cond(Θ̄) = {raw.iso.condition_number:.3g} before Forster "
        f"(theory {float(raw.eigenvalues_theory[-1] / raw.eigenvalues_theory[0]):.3g}), "
        f"1 + {fst.iso.condition_number - 1:.1g} after with "
        f"α̂ = {fst.iso.alpha:.6g} (theory {alpha_paper}); one step cuts the loss by "
        f"{1 / ratio['raw']:.3g}× before, {1 / ratio['forster']:.3g}× after (finite width dominates step 1); "
        f"loss after {sizes.steps} steps {raw.history.train_loss[-1]:.2g} before, "
        f"{fst.history.train_loss[-1]:.2g} after. {warned}"
    )
    return Result(
        NAME,
        TITLE,
        summary,
        _checks(raw, fst, alpha_paper),
        _rows(cases, sizes),
        plot(cases, sizes),
        settings.describe(),
    )
