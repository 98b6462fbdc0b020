"""Benchmark: Jacobian factors and all per-layer kernels vs one autograd forward+backward.

Setting: L = 3, M = 4096, M_0 = 784, N = 100, C = 1, float32 and float64.
Prints, per dtype, the median time of (a) one forward + backward of the MSE loss through autograd
and (b) ``net.signals(x)`` plus the L per-layer kernels J_l J_l^T, their ratio, and
the peak extra memory of each (an explicit float32 Jacobian would need N·P·4 bytes ≈ 8 GB).

    python benchmarks/factors.py [--width 4096] [--n 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import natural_tangents as nat
from _harness import median_times, peak_extra_mib, table


def setup(width: int, n: int, dtype_name: str):
    torch.set_num_threads(torch.get_num_threads())
    dtype = getattr(torch, dtype_name)
    net = nat.MLP([784, width, width, 1], activation="relu", dtype=dtype)
    x = nat.data.gaussian(n, 784, dtype=dtype)
    y = torch.ones(n, 1, dtype=dtype)
    return net, x, y


def autograd_step(state) -> None:
    net, x, y = state
    net.zero_grad(set_to_none=True)
    loss = 0.5 * ((net(x) - y) ** 2).sum(1).mean()
    loss.backward()


def factors_and_kernels(state) -> None:
    net, x, _ = state
    fx = net.signals(x)
    fx.grams()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for dtype_name in ("float32", "float64"):
        state = setup(args.width, args.n, dtype_name)
        net = state[0]
        params = sum(p.numel() for p in net.parameters())
        t = median_times(
            {"autograd": lambda s=state: autograd_step(s), "factors": lambda s=state: factors_and_kernels(s)},
            repeats=args.repeats,
        )
        _, mem_ag = peak_extra_mib(setup, autograd_step, (args.width, args.n, dtype_name))
        _, mem_f = peak_extra_mib(setup, factors_and_kernels, (args.width, args.n, dtype_name))
        model_mib = params * net.W1.element_size() / 2**20
        jac_gib = args.n * params * net.W1.element_size() / 2**30
        rows.append(
            [
                dtype_name,
                f"{params / 1e6:.1f}M",
                f"{model_mib:.0f}",
                f"{jac_gib:.1f}",
                f"{t['autograd'] * 1e3:.0f}",
                f"{t['factors'] * 1e3:.0f}",
                f"{t['factors'] / t['autograd']:.2f}",
                f"{mem_ag:.0f}",
                f"{mem_f:.0f}",
            ]
        )
    print(f"L = 3, M = {args.width}, M_0 = 784, N = {args.n}, C = 1, threads = {torch.get_num_threads()}")
    print(
        table(
            rows,
            [
                "dtype",
                "P",
                "model MiB",
                "explicit J GiB",
                "fwd+bwd ms",
                "factors+kernels ms",
                "ratio",
                "fwd+bwd extra MiB",
                "factors extra MiB",
            ],
        )
    )


if __name__ == "__main__":
    main()
