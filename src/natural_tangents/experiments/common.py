"""What every experiment shares: settings, the result record, writing JSON/CSV/PNG, plot style.

An experiment is a function ``run(settings) -> Result``. It measures something on finite networks
(the experiment, drawn as markers) and computes what the theory predicts (drawn as lines), and
reports a few headline quantities as :class:`Check` rows: the seed's value, our theory, our
measurement.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

__all__ = ["Settings", "Check", "Result", "progress", "write", "method_style", "THEORY", "EXPERIMENT"]

THEORY = {"linestyle": "-", "linewidth": 1.6, "alpha": 0.9}
EXPERIMENT = {
    "linestyle": "none",
    "marker": "o",
    "markersize": 5,
    "markerfacecolor": "none",
    "markeredgewidth": 1.4,
}

_COLORS = {
    "gd": "#555555",
    "exact": "#1f77b4",
    "block_diagonal": "#2ca02c",
    "block_tridiagonal": "#9467bd",
    "kfac": "#d62728",
    "unitwise": "#ff7f0e",
}
_LABELS = {
    "gd": "GD",
    "exact": "Exact NGD",
    "block_diagonal": "Block diagonal",
    "block_tridiagonal": "Block tri-diagonal",
    "kfac": "K-FAC",
    "unitwise": "Unit-wise",
}


def method_style(name: str) -> tuple[str, str]:
    """(colour, label) of a method name ("gd", "exact", …)."""
    return _COLORS.get(name, "#17becf"), _LABELS.get(name, name)


@dataclass(frozen=True)
class Settings:
    """How to run the experiments.

    quick: shrink widths and steps so that ``reproduce all`` takes a few minutes on a laptop;
    otherwise the seed's settings. seed: of the networks and data draws. device, dtype: of the
    networks (the N × N algebra is float64 regardless). progress: show progress bars. max_width: a
    cap on every network width, for smoke tests.
    """

    quick: bool = True
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    progress: bool = True
    max_width: int | None = None  # caps every width (the tests run the experiments tiny)

    def width(self, full: int, quick: int) -> int:
        w = quick if self.quick else full
        return w if self.max_width is None else min(w, self.max_width)

    def network(self, widths, activation="relu", sigma_w2: float = 2.0, sigma_b2: float = 0.0, seed: int | None = None):
        """An :class:`~natural_tangents.MLP` with these settings' seed (unless ``seed``), dtype and device."""
        from ..network import MLP

        seed = self.seed if seed is None else seed
        return MLP(widths, activation, sigma_w2, sigma_b2, seed=seed, dtype=self.dtype, device=self.device)

    def describe(self) -> dict:
        return {"quick": self.quick, "seed": self.seed, "device": self.device, "dtype": str(self.dtype)}


@dataclass(frozen=True)
class Check:
    """One headline number: what the seed reports, what our theory gives, what we measured."""

    quantity: str
    seed: str
    theory: float | str
    experiment: float | str
    ok: bool | None = None

    def cells(self) -> list[str]:
        return [self.quantity, self.seed, _fmt(self.theory), _fmt(self.experiment)]


@dataclass
class Result:
    name: str
    title: str
    summary: str
    checks: list[Check]
    rows: list[dict]
    figure: plt.Figure
    settings: dict
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, int) or (isinstance(v, float) and v == int(v) and abs(v) < 1e6):
        return f"{v:g}"
    return f"{v:.4g}"


def progress(iterable: Iterable, settings: Settings, desc: str, total: int | None = None):
    """A progress bar (to stderr) when ``settings.progress``; the bare iterable otherwise."""
    if not settings.progress:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist())
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write(result: Result, out: str | os.PathLike) -> Result:
    """Write ``NAME.json`` (summary, checks, settings, rows), ``NAME.csv`` and ``NAME.png`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png, csv_path, js = out / f"{result.name}.png", out / f"{result.name}.csv", out / f"{result.name}.json"
    result.figure.savefig(png, dpi=130, bbox_inches="tight")
    plt.close(result.figure)
    keys: list[str] = []
    for row in result.rows:
        keys.extend(k for k in row if k not in keys)
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for row in result.rows:
            w.writerow({k: _jsonable(v) for k, v in row.items()})
    payload = {
        "name": result.name,
        "title": result.title,
        "summary": result.summary,
        "seconds": result.seconds,
        "settings": result.settings,
        "checks": [asdict(c) for c in result.checks],
        "rows": result.rows,
    }
    js.write_text(json.dumps(_jsonable(payload), indent=1))
    result.files = {"png": png.name, "csv": csv_path.name, "json": js.name}
    return result


def timed(fn, settings: Settings) -> Result:
    start = time.perf_counter()
    result = fn(settings)
    result.seconds = time.perf_counter() - start
    return result


def log_axis(ax, ylabel: str, xlabel: str = "step t") -> None:
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.25)


def legend_theory_experiment(ax, extra: Sequence = (), outside: bool = False) -> None:
    """A legend that also explains the encoding: lines = theory, open markers = experiment
    (``outside``: to the right of the axes, clear of the data)."""
    handles, labels = ax.get_legend_handles_labels()
    proxy_t = plt.Line2D([], [], color="black", **THEORY)
    proxy_e = plt.Line2D([], [], color="black", **EXPERIMENT)
    if outside:
        ax.legend(
            [*handles, proxy_t, proxy_e, *extra],
            [*labels, "theory (line)", "experiment (markers)"],
            fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
        )
        return
    ax.legend(
        [*handles, proxy_t, proxy_e, *extra],
        [*labels, "theory (line)", "experiment (markers)"],
        fontsize=8,
        loc="best",
    )
