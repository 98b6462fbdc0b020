"""Benchmark: the analytic NTK Θ_ana(x, x) of an L = 3 MLP for N × N inputs, float64.

    .venv/bin/python benchmarks/kernels.py            # N = 2000, every case
    .venv/bin/python benchmarks/kernels.py --n 500 --cases relu tanh-series

Each case runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own;
the table reports the wall time of ``natural_tangents.theory.ntk`` (symmetric path: only the upper triangle is
integrated), the process's peak RSS, and the increase over the RSS just before the call (the
inputs are created and torch is warmed up by then). Inputs: N unit-norm Gaussian vectors in
M_0 = 100 dimensions; σ_w² = 2, σ_b² = 0.5.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = {
    "relu": ("relu", "auto"),  # closed form (S.176)–(S.178)
    "erf": ("erf", "auto"),  # arcsine closed form
    "tanh-quadrature": ("tanh", "quadrature"),  # 2-D Gauss–Hermite, order 48 (the default for tanh)
    "tanh-trapezoid": ("tanh", "trapezoid"),  # 2-D trapezoidal rule, 48 nodes per dimension
    "tanh-series": ("tanh", "series"),  # Hermite (Mehler) series
    "gelu-series": ("gelu", "series"),
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_case(name: str, n: int, threads: int) -> dict:
    import torch

    from natural_tangents import theory

    torch.set_num_threads(threads)
    activation, method = CASES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 100, generator=g, dtype=torch.float64)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    opts = {"depth": 3, "activation": activation, "sigma_w2": 2.0, "sigma_b2": 0.5, "method": method}
    theory.ntk(x[:8], **opts)  # warm-up: quadrature rules, caches, thread pool
    before = _current_rss_mib()
    start = time.perf_counter()
    theta = theory.ntk(x, **opts)
    seconds = time.perf_counter() - start
    peak = _rss_mib()
    assert theta.shape == (n, n) and theta.dtype == torch.float64 and bool(torch.isfinite(theta).all())
    return {
        "case": name,
        "seconds": seconds,
        "peak_mib": peak,
        "delta_mib": peak - before,
        "trace": float(theta.trace()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="number of inputs N (default 2000)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.n, args.threads)))
        return
    rows = []
    for name in args.cases:
        cmd = [sys.executable, __file__, "--child", name, "--n", str(args.n), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"case {name} failed:\n{proc.stderr}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"analytic NTK, N = {args.n}, L = 3, float64, {args.threads} threads")
    print("| case | method | wall time (s) | peak RSS (MiB) | RSS increase (MiB) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        act, method = CASES[r["case"]]
        print(f"| {act} | {method} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | {r['delta_mib']:.0f} |")


if __name__ == "__main__":
    main()
