"""Benchmark: one NGD step with each Fisher vs one GD step, at the seed's scale.

L = 3, M = 4096, M_0 = 784, N = 100, C = 1, float32 and float64 networks (the dual N × N algebra in
float64 either way). Prints each Fisher's median step time as a ratio to a GD step (autograd
forward + backward + update) measured interleaved in the same run (targets: ≤ 1.5 for exact,
layer-wise and K-FAC, ≤ 3 for unit-wise), and the extra peak memory of a step.

    python benchmarks/ngd_step.py [--width 4096] [--n 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import natural_tangents as nat
from _harness import median_times, peak_extra_mib, table
from natural_tangents import fisher as F

FISHERS = {
    "exact": F.Exact(),
    "block diagonal": F.BlockDiagonal(),
    "block tri-diagonal": F.BlockTriDiagonal(),
    "K-FAC": F.KFAC(),
    "unit-wise (ρ=0)": F.Unitwise(),
    "unit-wise (ρ=1e-12)": F.Unitwise(damping=1e-12),
}
LR = 1e-6  # a tiny fixed rate: the parameters barely move, so every repeat times the same work


def setup(width: int, n: int, dtype_name: str, method: str):
    dtype = getattr(torch, dtype_name)
    net = nat.MLP([784, width, width, 1], activation="relu", dtype=dtype)
    x = nat.data.gaussian(n, 784, dtype=dtype)
    y = torch.sign(torch.randn(n, 1, generator=torch.Generator().manual_seed(1), dtype=dtype))
    opt = nat.GD(net, lr=LR) if method == "gd" else nat.NGD(net, FISHERS[method], lr=LR)
    return opt, x, y


def step(state) -> None:
    opt, x, y = state
    opt.step(x, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for dtype_name in ("float32", "float64"):
        gd = setup(args.width, args.n, dtype_name, "gd")
        _, gd_mem = peak_extra_mib(setup, step, (args.width, args.n, dtype_name, "gd"))
        for name in FISHERS:
            state = setup(args.width, args.n, dtype_name, name)
            t = median_times({"gd": lambda g=gd: step(g), "ngd": lambda s=state: step(s)}, repeats=args.repeats)
            _, mem = peak_extra_mib(setup, step, (args.width, args.n, dtype_name, name))
            rows.append(
                [
                    dtype_name,
                    name,
                    f"{t['gd'] * 1e3:.0f}",
                    f"{t['ngd'] * 1e3:.0f}",
                    f"{t['ngd'] / t['gd']:.2f}",
                    f"{gd_mem:.0f}",
                    f"{mem:.0f}",
                ]
            )
    print(f"L = 3, M = {args.width}, M_0 = 784, N = {args.n}, C = 1, threads = {torch.get_num_threads()}")
    print(table(rows, ["dtype", "Fisher", "GD step ms", "NGD step ms", "ratio", "GD extra MiB", "NGD extra MiB"]))


if __name__ == "__main__":
    main()
