"""The look every experiment's figure shares: theory as lines, experiment as open markers, one colour
and one label per method, and the few axis layouts the figures repeat."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .. import fisher as _fisher

__all__ = [
    "THEORY",
    "EXPERIMENT",
    "DOTTED",
    "method_style",
    "theory_and_experiment",
    "log_axis",
    "width_axis",
    "note",
    "legend_theory_experiment",
    "finish",
]

THEORY = {"linestyle": "-", "linewidth": 1.6, "alpha": 0.9}
EXPERIMENT = {
    "linestyle": "none",
    "marker": "o",
    "markersize": 5,
    "markerfacecolor": "none",
    "markeredgewidth": 1.4,
}
#: experiment markers joined by a thin dotted line (curves sampled on a grid)
DOTTED = {**EXPERIMENT, "linestyle": ":", "linewidth": 0.8}

_COLORS = {
    "gd": "#555555",
    "exact": "#1f77b4",
    "block_diagonal": "#2ca02c",
    "block_tridiagonal": "#9467bd",
    "kfac": "#d62728",
    "unitwise": "#ff7f0e",
}
#: the methods' labels: gradient descent, and each Fisher's own ``label``
_LABELS = {"gd": "GD", **{cls.name: cls.label for cls in _fisher.ALL}}


def method_style(method: str | _fisher.Fisher | type[_fisher.Fisher] | None) -> tuple[str, str]:
    """(colour, label) of a method: a name ("gd", "exact", …), a Fisher (class or instance), or None
    for gradient descent."""
    name = "gd" if method is None else getattr(method, "name", method)
    return _COLORS.get(name, "#17becf"), _LABELS.get(name, name)


def theory_and_experiment(ax, x, theory, x_exp, experiment, color: str, label: str | None = None, **marker) -> None:
    """A theory line (labelled) and the experiment's open markers in the same colour."""
    ax.plot(x, theory, color=color, label=label, **THEORY)
    ax.plot(x_exp, experiment, color=color, **{**EXPERIMENT, **marker})


def log_axis(ax, ylabel: str, xlabel: str = "step t") -> None:
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.25)


def width_axis(ax, widths: Sequence[int]) -> None:
    """A log₂ x-axis of hidden widths M with a tick at each width drawn."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(widths), [str(w) for w in widths])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel("hidden width M (units per layer)")


def note(ax, x: float, y: float, text: str, **kwargs) -> None:
    """Small explanatory text at axes coordinates (x, y)."""
    ax.text(x, y, text, transform=ax.transAxes, **{"fontsize": 7.5, **kwargs})


def legend_theory_experiment(ax, extra: Sequence = (), outside: bool = False) -> None:
    """A legend that also explains the encoding: lines = theory, open markers = experiment
    (``outside``: to the right of the axes, clear of the data)."""
    handles, labels = ax.get_legend_handles_labels()
    proxy_t = plt.Line2D([], [], color="black", **THEORY)
    proxy_e = plt.Line2D([], [], color="black", **EXPERIMENT)
    where = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0} if outside else {"loc": "best"}
    ax.legend(
        [*handles, proxy_t, proxy_e, *extra],
        [*labels, "theory (line)", "experiment (markers)"],
        fontsize=8,
        **where,
    )


def finish(fig, title: str, fontsize: float = 10):
    """Give the figure its overall title, lay it out and return it."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    return fig
