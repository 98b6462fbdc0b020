"""``report.md``: every experiment's figure, summary and theory-against-experiment table."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

import torch

from .. import __version__
from .common import Result


def _table(rows: list[list[str]], header: list[str]) -> str:
    def esc(c: str) -> str:
        return str(c).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(results: list[Result], out: str | Path, settings: dict) -> Path:
    """Write ``report.md`` into ``out`` (the figures are already there) and return its path."""
    out = Path(out)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "# natural-tangents: the paper's experiments, theory against experiment",
        "",
        f"natural-tangents {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{now}. Settings: {', '.join(f'{k} = {v}' for k, v in settings.items())}.",
        "",
        "Source: Karakida and Osawa, *Understanding Approximate Fisher Information for Fast Convergence of "
        "Natural Gradient Descent in Wide Neural Networks*, NeurIPS 2020 (supplementary material). In every "
        "figure lines are theory and open markers are experiment.",
        "",
        "## Summary",
        "",
        _table(
            [[f"[{r.name}](#{r.name})", r.summary, f"{r.seconds:.1f}"] for r in results],
            ["experiment", "result", "seconds"],
        ),
        "",
    ]
    for r in results:
        parts += [
            f"## {r.name}",
            "",
            f"**{r.title}**",
            "",
            r.summary + ".",
            "",
            f"![{r.name}]({r.files.get('png', r.name + '.png')})",
            "",
            _table([c.cells() for c in r.checks], ["quantity", "paper", "theory (ours)", "experiment (ours)"]),
            "",
            f"Data: [{r.files.get('csv')}]({r.files.get('csv')}), [{r.files.get('json')}]({r.files.get('json')}); "
            f"{r.seconds:.1f} s.",
            "",
        ]
    path = out / "report.md"
    tmp = out / f".report.md.{os.getpid()}.tmp"  # written whole, then renamed: never a half report.md
    try:
        tmp.write_text("\n".join(parts))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
