"""The ``natural-tangents`` command: reproduce the seed's experiments.

natural-tangents reproduce all --quick --out results
natural-tangents reproduce convergence --seed 1 --dtype float32
natural-tangents list
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .experiments import REGISTRY, Settings, write
from .experiments.common import timed
from .experiments.report import write_report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="natural-tangents", description="Natural gradient descent in wide networks.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reproduce", help="run one experiment of the seed, or all of them (with a report)")
    r.add_argument("name", help=f"'all' or one of: {', '.join(REGISTRY)}")
    r.add_argument(
        "--quick",
        action="store_true",
        help="small widths and few steps (minutes); default: the seed's settings",
    )
    r.add_argument("--out", default="results", help="output folder (default: results)")
    r.add_argument("--seed", type=int, default=0, help="seed of networks and data draws (default 0)")
    r.add_argument("--device", default="cpu", help="torch device of the networks (default cpu)")
    r.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="network dtype (default float64)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--max-width", type=int, default=None, help=argparse.SUPPRESS)  # smoke tests: cap every width
    sub.add_parser("list", help="list the experiments")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        for name, mod in REGISTRY.items():
            print(f"{name:16s} {mod.TITLE}")
        return 0
    names = list(REGISTRY) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        print(
            f"natural-tangents: unknown experiment {unknown[0]!r}; use 'all' or one of: {', '.join(REGISTRY)}",
            file=sys.stderr,
        )
        return 2
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as err:
        print(f"natural-tangents: --device {args.device!r} is not available here ({err})", file=sys.stderr)
        return 2
    settings = Settings(
        quick=args.quick,
        seed=args.seed,
        device=str(device),
        dtype=getattr(torch, args.dtype),
        progress=not args.no_progress,
        max_width=args.max_width,
    )
    start = time.perf_counter()
    results = []
    for name in names:
        print(f"[{name}] running ({'quick' if args.quick else 'full'}) …", file=sys.stderr, flush=True)
        results.append(write(timed(REGISTRY[name].run, settings), args.out))
    if args.name == "all":
        path = write_report(results, args.out, settings.describe())
        print(f"report: {path}")
    for r in results:
        print(f"{r.name:16s} {r.seconds:6.1f} s  {r.summary}")
    print(f"total {time.perf_counter() - start:.1f} s; outputs in {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
