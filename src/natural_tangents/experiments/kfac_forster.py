"""K-FAC with fewer input dimensions than samples (M_0 < N), before and after the Forster
transformation (seed B.3.1, (S.108)–(S.111)).

With M_0 < N the input factor A*_0 (M_0 × M_0) is inverted as it is (S.108) and, on the training set,

    Θ̄ / N = (L − 1) I + I ⊙ X (X^T X)^{-1} X^T                                        (S.109)

whose eigenvalues are (L − 1) + h_n, h_n the leverage scores of the inputs (0 < h_n < 1, Σ h_n = M_0):
not isotropic, so η = 1/α is not one-step optimal. The Forster transformation puts the inputs in radial
isotropic position (X̄^T X̄ = (N/M_0) I, unit rows), where h_n = M_0/N for every n and Θ̄ = α I with
α = N (L − 1) + M_0 (S.111).

Setting: Gaussian inputs N = 80, M_0 = 40 (unit norm), tanh-teacher targets (``nat.data.synthetic``),
ReLU, L = 3, σ_w² = 2, σ_b² = 0 (no bias: a bias column would widen the input to M_0 + 1 and keep it out
of radial isotropic position), ρ = 0, the seed's output factor B*_L = 1/N.

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
from .. import fisher as F
from ..data import forster, synthetic
from ..optim import train
from .common import EXPERIMENT, THEORY, Check, Result, Settings, legend_theory_experiment, log_axis, progress

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


def run(settings: Settings, sizes: Sizes | None = None) -> Result:
    sizes = sizes or (QUICK if settings.quick else FULL)
    m, n, m0, steps = sizes.width, sizes.n, sizes.m0, sizes.steps
    ds = synthetic(n, m0, n_test=0, seed=settings.seed, dtype=torch.float64)
    inputs = {"raw": ds.x_train, "forster": forster(ds.x_train)}
    y64 = ds.y_train
    y = y64.to(settings.device, settings.dtype)
    kfac = F.KFAC()
    ts = list(range(steps + 1))

    rows, res, caught = [], {}, []
    for key in progress(list(inputs), settings, "kfac-forster"):
        x64 = inputs[key]
        x = x64.to(settings.device, settings.dtype)
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            net = settings.network([m0, m, m, 1], "relu", SIGMA_W2, SIGMA_B2)
            with torch.no_grad():
                f0 = net(x).double().cpu()
            tb = kfac.coefficient(net, x)
            iso = F.isotropy(tb)
            hist = train(net, x, y, kfac, lr="optimal", steps=steps)
            a_th = theory.alpha(kfac, widths=[m0, m, m, 1], sigma_b2=SIGMA_B2, n_train=n, forster=key == "forster")
        msgs = sorted({str(w.message) for w in log if issubclass(w.category, RuntimeWarning)})
        caught.append((key, len([w for w in log if issubclass(w.category, RuntimeWarning)]), msgs))
        th = theory_coefficient(x64)
        ev_th = torch.linalg.eigvalsh(th) / n
        ev = iso.eigenvalues / n
        lin = dynamics.ngd(th, y64, f0, hist.lr)
        th_loss = lin.loss(ts)
        res[key] = (ev, ev_th, hist, th_loss, iso, a_th)
        for i in range(n):
            rows.append(
                {
                    "inputs": key,
                    "kind": "eigenvalue",
                    "index": i + 1,
                    "eigenvalue_over_N": float(ev[i]),
                    "eigenvalue_over_N_theory": float(ev_th[i]),
                }
            )
        for t in ts:
            rows.append(
                {
                    "inputs": key,
                    "kind": "training",
                    "step": t,
                    "lr": hist.lr,
                    "train_loss": hist.train_loss[t],
                    "train_loss_theory": float(th_loss[t]),
                }
            )
        rows.append(
            {
                "inputs": key,
                "kind": "summary",
                "alpha_hat": iso.alpha,
                "alpha_theory": a_th,
                "condition_number": iso.condition_number,
                "condition_number_theory": float(ev_th[-1] / ev_th[0]),
                "runtime_warnings": caught[-1][1],
                "warning": " | ".join(msgs),
            }
        )

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    idx = np.arange(1, n + 1)
    for key, (ev, ev_th, hist, th_loss, _, _) in res.items():
        c = COLORS[key]
        th_label = "(L−1) + h_n (S.109)" if key == "raw" else "(L−1) + M_0/N (S.111)"
        ax1.plot(idx, ev_th.numpy(), color=c, label=f"{LABELS[key]}: {th_label}", **THEORY)
        ax1.plot(idx, ev.numpy(), color=c, **{**EXPERIMENT, "markersize": 4})
        ax2.plot(ts, th_loss.clamp_min(FLOOR).numpy(), color=c, label=LABELS[key], **THEORY)
        ax2.plot(ts, np.maximum(hist.train_loss, FLOOR), color=c, **EXPERIMENT)
    ax1.set_xlabel("eigenvalue index n (ascending)")
    ax1.set_ylabel(r"eigenvalue of $\bar{\Theta}(x, x) / N$ (dimensionless)")
    ax1.set_title(f"K-FAC, N = {n} > M_0 = {m0}: isotropic only after Forster", fontsize=10)
    ax1.grid(True, alpha=0.25)
    legend_theory_experiment(ax1)
    log_axis(ax2, "training loss (1/2N) Σ (f − y)²", "K-FAC step t (η = 1/α̂)")
    ax2.set_ylim(FLOOR / 3, None)
    ax2.text(
        0.98, 0.06, f"values below {FLOOR:g} drawn at {FLOOR:g}", transform=ax2.transAxes, fontsize=7.5, ha="right"
    )
    ax2.set_title(r"training at η = 1/α̂ (lines: linear model with $\bar{\Theta}$ of (S.109))", fontsize=10)
    ax2.set_xticks(ts)
    legend_theory_experiment(ax2)
    fig.suptitle(f"ReLU, L = 3, M = {m}, Gaussian inputs, σ_w² = 2, σ_b² = 0, ρ = 0, B*_L = 1/N", fontsize=10)
    fig.tight_layout()

    raw, fst = res["raw"], res["forster"]
    ratio = {k: v[2].train_loss[1] / v[2].train_loss[0] for k, v in res.items()}
    ratio_th = {k: float(v[3][1] / v[3][0]) for k, v in res.items()}
    alpha_seed = n * (DEPTH - 1) + m0
    checks = [
        Check(
            "cond(Θ̄) before Forster",
            "> 1: not isotropic (S.109)",
            float(raw[1][-1] / raw[1][0]),
            raw[4].condition_number,
        ),
        Check(
            "cond(Θ̄) − 1 after Forster", "0 (S.111)", float(fst[1][-1] / fst[1][0]) - 1.0, fst[4].condition_number - 1.0
        ),
        Check("α after Forster", f"N(L−1) + M_0 = {alpha_seed} (S.111)", fst[5], fst[4].alpha),
        Check("mean eigenvalue of Θ̄ before Forster", f"tr: N(L−1) + M_0 = {alpha_seed}", raw[5], raw[4].alpha),
        Check("loss after 1 step / initial, before Forster", "> 0 (not one-step)", ratio_th["raw"], ratio["raw"]),
        Check("loss after 1 step / initial, after Forster", "0 (one-step)", ratio_th["forster"], ratio["forster"]),
    ]
    warn_raw = next(c for c in caught if c[0] == "raw")
    warn_fst = next(c for c in caught if c[0] == "forster")
    warned = (
        f"K-FAC raised {warn_raw[1]} RuntimeWarning(s) on the raw inputs"
        + (f" ({warn_raw[2][0].split(';')[0]})" if warn_raw[2] else "")
        + f" and {warn_fst[1]} after Forster"
    )
    summary = (
        f"M = {m}: cond(Θ̄) = {raw[4].condition_number:.3g} before Forster "
        f"(theory {float(raw[1][-1] / raw[1][0]):.3g}), 1 + {fst[4].condition_number - 1:.1g} after with "
        f"α̂ = {fst[4].alpha:.6g} (theory {alpha_seed}); one step cuts the loss by "
        f"{1 / ratio['raw']:.3g}× before, {1 / ratio['forster']:.3g}× after (finite width dominates step 1); "
        f"loss after {steps} steps {raw[2].train_loss[-1]:.2g} before, {fst[2].train_loss[-1]:.2g} after. {warned}"
    )
    return Result(NAME, TITLE, summary, checks, rows, fig, settings.describe())
