"""Benchmark: the analytic NTK Θ_ana(x, x) of an L = 3 MLP for N × N inputs, float64.

Inputs: N unit-norm Gaussian vectors in M_0 = 100 dimensions; σ_w² = 2, σ_b² = 0.5. For each
activation and integration method the table gives the median wall time of
``natural_tangents.theory.ntk(x, ...)`` (symmetric path: only the upper triangle is integrated;
the 2-D quadrature cases are timed once, they take tens of seconds) and the peak extra memory of
one call, measured in a fresh process (see ``_harness.py``) on top of the inputs. For scale: one
N × N float64 matrix is 30.5 MiB at N = 2000.

    python benchmarks/kernels.py [--n 2000] [--repeats 3] [--threads 2] [--cases relu erf tanh-series]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import median_times, peak_extra_mib, table
from natural_tangents import theory

CASES = {
    "relu": ("relu", "auto", "closed form (S.176)–(S.178)"),
    "erf": ("erf", "auto", "closed form (arcsine)"),
    "tanh-quadrature": ("tanh", "quadrature", "2-D Gauss–Hermite, 48² nodes (default)"),
    "tanh-trapezoid": ("tanh", "trapezoid", "2-D trapezoid, 48² nodes"),
    "tanh-series": ("tanh", "series", "Hermite (Mehler) series"),
    "gelu-quadrature": ("gelu", "quadrature", "2-D Gauss–Hermite, 48² nodes (default)"),
    "gelu-series": ("gelu", "series", "Hermite (Mehler) series"),
}
SLOW = {"tanh-quadrature", "tanh-trapezoid", "gelu-quadrature"}


def setup(n: int, case: str, threads: int):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 100, generator=g, dtype=torch.float64)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    activation, method, _ = CASES[case]
    opts = {"depth": 3, "activation": activation, "sigma_w2": 2.0, "sigma_b2": 0.5, "method": method}
    theory.ntk(x[:8], **opts)  # warm-up: quadrature rules and Hermite bases are cached
    return x, opts


def run(state) -> None:
    x, opts = state
    theta = theory.ntk(x, **opts)
    assert theta.shape == (x.shape[0],) * 2 and bool(torch.isfinite(theta).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    rows = []
    for case in args.cases:
        state = setup(args.n, case, args.threads)
        repeats = 1 if case in SLOW else args.repeats
        seconds = median_times({case: lambda state=state: run(state)}, repeats=repeats, warmup=0)[case]
        _, extra = peak_extra_mib(setup, run, (args.n, case, args.threads))
        activation, method, what = CASES[case]
        rows.append([activation, method, what, f"{seconds:.2f}", f"{extra:.0f}"])
    print(f"analytic NTK Θ_ana(x, x), N = {args.n}, L = 3, float64, {args.threads} threads")
    print(table(rows, ["activation", "method", "integration", "time (s)", "peak extra (MiB)"]))


if __name__ == "__main__":
    main()
