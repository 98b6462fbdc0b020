"""Generalization: the test loss and accuracy that GD and each NGD reach, against the prediction
of the infinite-width theory — the analytic Θ̄(x′, x) of each Fisher in (S.26) (the analytic NTK
for GD). Unit-wise NGD has no closed form on test inputs (S.155): its prediction uses the
empirical Θ̄ of the network at initialization."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .. import dynamics, theory
from ..data import mnist_binary
from ..optim import train
from .common import (
    EXPERIMENT,
    THEORY,
    Check,
    Result,
    Settings,
    legend_theory_experiment,
    log_axis,
    method_style,
    progress,
)
from .convergence import methods

NAME = "generalization"
TITLE = "Test loss and accuracy reached by GD and NGD: experiment against the analytic Θ̄(x′, x)"


def _loss(f, y):
    return 0.5 * ((f - y) ** 2).sum(-1).mean(-1)


def _accuracy(f, y):
    return ((f[..., 0] > 0) == (y[..., 0] > 0)).double().mean(-1)


def run(settings: Settings) -> Result:
    width = settings.width(4096, 2048)
    steps = 5 if settings.quick else 10
    n = 100
    ds = mnist_binary(
        (0, 7), n_train=n, n_test=200 if settings.quick else 500, seed=settings.seed, dtype=settings.dtype
    )
    x, y, xt, yt = (t.to(settings.device) for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    x64, xt64, y64, yt64 = x.double().cpu(), xt.double().cpu(), y.double().cpu(), yt.double().cpu()
    widths = [784, width, width, 1]
    kw = {"depth": 3, "activation": "relu", "sigma_w2": 2.0, "sigma_b2": 0.0}
    ts = list(range(steps + 1))
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(13.5, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    rows, checks = [], []
    for i, (name, fisher) in enumerate(progress(methods(), settings, "generalization")):
        net = settings.network(widths)
        with torch.no_grad():
            f0, f0t = net(x).double().cpu(), net(xt).double().cpu()
        if fisher is None:
            k, kt = theory.ntk(x64, **kw) / n, theory.ntk(xt64, x64, **kw) / n
            how = "analytic NTK"
        elif fisher.name == "unitwise":
            k, kt = fisher.coefficient(net, x).cpu(), fisher.coefficient(net, x, xt).cpu()
            how = "empirical Θ̄ (no closed form)"
        else:
            k = theory.coefficient(fisher, None, x64, widths=widths, **kw)
            kt = theory.coefficient(fisher, xt64, x64, widths=widths, **kw)
            how = "analytic Θ̄"
        hist = train(net, x, y, "gd" if fisher is None else fisher, lr="optimal", steps=steps, x_test=xt, y_test=yt)
        pred = dynamics.linearized(k, y64, f0, hist.lr, kt, f0t).test(ts)
        th_loss, th_acc = _loss(pred, yt64), _accuracy(pred, yt64)
        color, label = method_style(name)
        ax_l.plot(ts, th_loss, color=color, label=label, **THEORY)
        ax_l.plot(ts, hist.test_loss, color=color, **EXPERIMENT)
        ax_a.hlines(float(th_acc[-1]), i - 0.3, i + 0.3, color=color, **THEORY)
        ax_a.plot([i], [hist.test_accuracy[-1]], color=color, **EXPERIMENT)
        for t in ts:
            rows.append(
                {
                    "method": name,
                    "step": t,
                    "test_loss": hist.test_loss[t],
                    "test_loss_theory": float(th_loss[t]),
                    "test_accuracy": hist.test_accuracy[t],
                    "test_accuracy_theory": float(th_acc[t]),
                    "theory": how,
                }
            )
        checks.append(Check(f"{label}: test loss at step {steps} ({how})", "—", float(th_loss[-1]), hist.test_loss[-1]))
    log_axis(ax_l, "test loss (1/2N′) Σ‖f − y‖²")
    ax_l.set_title(f"test loss, N′ = {len(yt)}", fontsize=10)
    legend_theory_experiment(ax_l, outside=True)
    names = [method_style(n)[1] for n, _ in methods()]
    ax_a.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax_a.set_ylabel(f"test accuracy after {steps} steps")
    ax_a.set_title("test accuracy (line: theory, marker: experiment)", fontsize=10)
    ax_a.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"ReLU MLP, L = 3, M = {width}, MNIST 0 vs 7, N = {n}; η = 1/α (GD: 1/λ_max)", fontsize=10)
    fig.tight_layout()
    worst = max(abs(c.experiment - c.theory) / c.theory for c in checks)
    summary = (
        f"after {steps} steps the test loss of every method is within {100 * worst:.0f}% of the "
        "infinite-width prediction; NGD reaches "
        + ", ".join(f"{c.experiment:.3g}" for c in checks[1:])
        + f", GD {checks[0].experiment:.3g}"
    )
    return Result(NAME, TITLE, summary, checks, rows, fig, settings.describe())
