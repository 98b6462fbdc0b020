"""Benchmark: one process against two (torch.distributed, gloo on 127.0.0.1, launched by torchrun).

Two jobs, each timed in 1 and in 2 processes with the same total work:

* the analytic NTK of N = 5000 unit-norm inputs (L = 3, M_0 = 784, ReLU, float64), the ranks sharing
  the tiles (``nat.theory.ntk(..., process_group=)``);
* one exact NGD step at N = 1000, L = 3, M = 4096, M_0 = 784, float32 (``nat.NGD(...,
  process_group=)``), each rank holding N / 2 samples.

Reports the median wall time of each, the speed-up, and the bytes each rank sent through
collectives (counted by wrapping torch.distributed's all_gather and all_reduce). On a 2-core machine
two processes share the cores that one process uses with two threads, so the speed-up measures the
overhead of the distributed path rather than a gain; on several machines (or GPUs) the per-rank work
is what shrinks.

    python benchmarks/distributed.py [--n-kernel 5000] [--n-step 1000] [--width 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import natural_tangents as nat

SENT = {"bytes": 0}


def _count(fn, position: int):
    """``fn`` that adds the bytes of its argument at ``position`` (the tensor this rank sends) to SENT."""

    def wrapped(*args, **kwargs):
        t = args[position]
        SENT["bytes"] += t.numel() * t.element_size()
        return fn(*args, **kwargs)

    return wrapped


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args) -> None:
    group = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
        dist.all_gather = _count(dist.all_gather, 1)  # all_gather(outputs, input)
        dist.all_reduce = _count(dist.all_reduce, 0)
    rank = dist.get_rank() if group else 0
    world = dist.get_world_size() if group else 1
    out = {"world": world, "threads": torch.get_num_threads()}
    # the analytic NTK, tiles shared by the ranks
    x = nat.data.gaussian(args.n_kernel, 784, dtype=torch.float64)
    opts = {"depth": 3, "activation": "relu", "sigma_w2": 2.0, "sigma_b2": 0.0}
    SENT["bytes"] = 0
    out["kernel_s"] = _timed(lambda: nat.theory.ntk(x, process_group=group, progress=False, **opts), args.repeats)
    out["kernel_bytes"] = SENT["bytes"] / args.repeats
    # one exact NGD step, the batch sharded
    n = args.n_step
    xs = nat.data.gaussian(n, 784, dtype=torch.float32)
    ys = torch.sign(torch.randn(n, 1, generator=torch.Generator().manual_seed(1)))
    lo, hi = rank * n // world, (rank + 1) * n // world
    net = nat.MLP([784, args.width, args.width, 1], sigma_b2=0.5, dtype=torch.float32)
    opt = nat.NGD(net, nat.fisher.Exact(damping=1e-3), lr=1e-6, process_group=group)
    opt.step(xs[lo:hi], ys[lo:hi])  # warm-up
    SENT["bytes"] = 0
    out["step_s"] = _timed(lambda: opt.step(xs[lo:hi], ys[lo:hi]), args.repeats)
    out["step_bytes"] = SENT["bytes"] / args.repeats
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))
    if group:
        dist.destroy_process_group()


def launch(procs: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
        cmd += [__file__, "--worker", "--result", str(result), "--n-kernel", str(args.n_kernel)]
        cmd += ["--n-step", str(args.n_step), "--width", str(args.width), "--repeats", str(args.repeats)]
        subprocess.run(cmd, check=True, timeout=3600, env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // procs))})
        return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-kernel", type=int, default=5000)
    ap.add_argument("--n-step", type=int, default=1000)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    one, two = launch(1, args), launch(2, args)
    mib = 1024**2
    print(f"processes: 1 ({one['threads']} threads) vs 2 ({two['threads']} thread each), gloo, {os.cpu_count()} cores")
    print("| job | 1 process | 2 processes | speed-up | MiB sent per rank (2 processes) |")
    print("|---|---|---|---|---|")
    for key, label in (
        ("kernel", f"analytic NTK, N = {args.n_kernel}"),
        ("step", f"exact NGD step, N = {args.n_step}"),
    ):
        t1, t2 = one[f"{key}_s"], two[f"{key}_s"]
        print(f"| {label} | {t1:.2f} s | {t2:.2f} s | {t1 / t2:.2f}× | {two[f'{key}_bytes'] / mib:.1f} |")


if __name__ == "__main__":
    main()
