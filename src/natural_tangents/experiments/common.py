"""What every experiment shares: settings, the result record, and writing JSON/CSV/PNG.

An experiment module has three parts: ``measure`` (finite networks: the experiment, drawn as open
markers), ``predict`` (what the theory says: drawn as lines) and ``plot``; its ``run(settings) -> Result``
joins them and reports a few headline quantities as :class:`Check` rows: the value the paper
(Karakida and Osawa, NeurIPS 2020) gives, our theory, our measurement. Each module has ``QUICK`` and
``FULL`` problem sizes; :meth:`Settings.sizes` picks one. The figures' common look is in
:mod:`.plotting`; notation and normalizations are those of docs/conventions.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from ..losses import MSE
from ..network import MLP

__all__ = ["Settings", "Check", "Result", "progress", "write", "timed", "mse", "mse_path"]

S = TypeVar("S")
_MSE = MSE()


def mse(f: torch.Tensor, y: torch.Tensor) -> float:
    """The training loss (1/2N) Σ_n ||f(x_n) − y_n||² of (N, C) outputs, as a float."""
    return float(_MSE.value(f, y))


def mse_path(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The MSE loss along a path of outputs f (T, N, C) against targets y (N, C): shape (T,)."""
    return torch.stack([_MSE.value(ft, y) for ft in f])


@dataclass(frozen=True)
class Settings:
    """How to run the experiments.

    quick: the experiments' ``QUICK`` sizes, so that ``reproduce all`` takes minutes on a laptop;
    otherwise their ``FULL`` sizes, the paper's settings. seed: the random seed of the networks and
    data draws. device, dtype: of the networks (the N × N algebra is float64 regardless). progress:
    show progress bars. max_width: a cap on the ``width`` of every experiment's sizes, for smoke
    tests (the swept widths of condition and the width sweep of tridiagonal stay as they are).
    """

    quick: bool = True
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    progress: bool = True
    max_width: int | None = None  # caps the experiments' widths (the tests run them tiny)

    def width(self, full: int, quick: int) -> int:
        """A single width: ``quick`` or ``full``, capped by ``max_width``."""
        w = quick if self.quick else full
        return w if self.max_width is None else min(w, self.max_width)

    def sizes(self, quick: S, full: S) -> S:
        """An experiment's ``QUICK`` or ``FULL`` problem sizes; ``max_width`` caps any ``width`` field."""
        chosen = quick if self.quick else full
        if self.max_width is None or "width" not in {f.name for f in fields(chosen)}:
            return chosen
        return replace(chosen, width=min(chosen.width, self.max_width))

    def network(self, widths, activation="relu", sigma_w2: float = 2.0, sigma_b2: float = 0.0, seed: int | None = None):
        """An :class:`~natural_tangents.MLP` with these settings' seed (unless ``seed``), dtype and device."""
        seed = self.seed if seed is None else seed
        return MLP(widths, activation, sigma_w2, sigma_b2, seed=seed, dtype=self.dtype, device=self.device)

    def describe(self) -> dict:
        return {"quick": self.quick, "seed": self.seed, "device": self.device, "dtype": str(self.dtype)}


@dataclass(frozen=True)
class Check:
    """One headline number: what the paper reports, what our theory gives, what we measured."""

    quantity: str
    paper: str
    theory: float | str
    experiment: float | str

    def cells(self) -> list[str]:
        return [self.quantity, self.paper, _fmt(self.theory), _fmt(self.experiment)]


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
    """``fn(settings)`` with its wall-clock time recorded in ``Result.seconds``."""
    start = time.perf_counter()
    result = fn(settings)
    result.seconds = time.perf_counter() - start
    return result
