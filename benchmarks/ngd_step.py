"""Benchmark: one NGD step with each Fisher against one GD step, as the batch N grows.

L = 3, M = 4096, M_0 = 784, C = 1, σ_b² = 0.5 (biases), ρ = 1e-3, ReLU. For each network dtype and
each N, every Fisher's step (``nat.NGD.step`` with a fixed rate: signals, Grams, solve, update) is
timed interleaved with a GD step (autograd forward + backward + update of the MSE loss) on the same
batch, and the median ratio is printed (floors: ≤ 1.5 for exact, layer-wise and K-FAC; unit-wise ≤ 3
at N = 100 and ≤ 6 at N = 500; "unit-wise" is the default ``solver="auto"``, "unit-wise direct"
Cholesky for every unit).
``--memory`` adds the extra peak resident memory of one step at the
largest N (a fresh process per case). ``--variants`` adds the no-bias, ρ = 0 network.

    python benchmarks/ngd_step.py [--n 100 500 2000] [--dtypes float32 float64] [--repeats 3] [--memory]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import natural_tangents as nat
from _harness import median_times, peak_extra_mib, table

FISHERS = {
    "exact": nat.fisher.Exact,
    "block diagonal": nat.fisher.BlockDiagonal,
    "block tri-diagonal": nat.fisher.BlockTriDiagonal,
    "K-FAC": nat.fisher.KFAC,
    "unit-wise": nat.fisher.Unitwise,
    "unit-wise direct": lambda damping: nat.fisher.Unitwise(damping=damping, solver="direct"),
}
LR = 1e-9  # a tiny fixed rate: the parameters barely move, so every repeat times the same work


def setup(width: int, n: int, dtype_name: str, method: str, sigma_b2: float = 0.5, damping: float = 1e-3):
    dtype = getattr(torch, dtype_name)
    net = nat.MLP([784, width, width, 1], activation="relu", sigma_b2=sigma_b2, dtype=dtype)
    x = nat.data.gaussian(n, 784, dtype=dtype)
    y = torch.sign(torch.randn(n, 1, generator=torch.Generator().manual_seed(1), dtype=dtype))
    opt = nat.GD(net, lr=LR) if method == "gd" else nat.NGD(net, FISHERS[method](damping=damping), lr=LR)
    return opt, x, y


def step(state) -> None:
    opt, x, y = state
    opt.step(x, y)


def _row(args, dtype_name: str, n: int, sigma_b2: float, damping: float) -> list[str]:
    gd = setup(args.width, n, dtype_name, "gd", sigma_b2, damping)
    cells = [dtype_name, str(n), f"{sigma_b2:g}", f"{damping:g}"]
    gd_time = None
    for name in args.fishers:
        state = setup(args.width, n, dtype_name, name, sigma_b2, damping)
        # steps of minutes run once: every unit's Cholesky at N = 2000, and unit-wise at ρ = 0 there
        # (supports of ~N/2 samples: O(M N³) work, no iterative route)
        slow = name == "unit-wise direct" or (name == "unit-wise" and damping == 0)
        repeats = 1 if (slow and n >= 2000) else args.repeats
        t = median_times({"gd": lambda g=gd: step(g), "ngd": lambda s=state: step(s)}, repeats=repeats)
        gd_time = t["gd"] if gd_time is None else min(gd_time, t["gd"])
        cells.append(f"{t['ngd'] / t['gd']:.2f}")
        print(f"  {dtype_name} N={n} {name}: GD {t['gd'] * 1e3:.0f} ms, NGD {t['ngd'] * 1e3:.0f} ms", flush=True)
    return [*cells[:4], f"{gd_time * 1e3:.0f}", *cells[4:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--n", type=int, nargs="+", default=[100, 500, 2000])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--fishers", nargs="+", default=list(FISHERS), choices=list(FISHERS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="extra peak memory of one step at the largest N")
    ap.add_argument("--variants", action="store_true", help="also no bias and ρ = 0")
    ap.add_argument("--only-variants", action="store_true", help="only no bias and ρ = 0")
    args = ap.parse_args()
    configs = [] if args.only_variants else [(0.5, 1e-3)]
    configs += [(0.0, 0.0)] if (args.variants or args.only_variants) else []
    rows = []
    for dtype_name in args.dtypes:
        for sigma_b2, damping in configs:
            for n in args.n:
                rows.append(_row(args, dtype_name, n, sigma_b2, damping))
    print(f"\nL = 3, M = {args.width}, M_0 = 784, C = 1, ReLU, threads = {torch.get_num_threads()}; NGD step / GD step")
    print(table(rows, ["dtype", "N", "σ_b²", "ρ", "GD step ms", *args.fishers]))
    if args.memory:
        n, mem_rows = max(args.n), []
        for dtype_name in args.dtypes:
            _, gd_mem = peak_extra_mib(setup, step, (args.width, n, dtype_name, "gd"))
            model_mib = sum(p.numel() for p in setup(args.width, 1, dtype_name, "gd")[0].model.parameters())
            model_mib *= torch.empty(0, dtype=getattr(torch, dtype_name)).element_size() / 2**20
            cells = [dtype_name, str(n), f"{model_mib:.0f}", f"{gd_mem:.0f}"]
            for name in args.fishers:
                _, mem = peak_extra_mib(setup, step, (args.width, n, dtype_name, name))
                cells.append(f"{mem:.0f} ({mem / model_mib:.1f}×)")
            mem_rows.append(cells)
        print("\nextra peak MiB of one step (× the model's size)")
        print(table(mem_rows, ["dtype", "N", "model MiB", "GD", *args.fishers]))


if __name__ == "__main__":
    main()
