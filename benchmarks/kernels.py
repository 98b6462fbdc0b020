"""Benchmark: the analytic NTK Θ_ana(x, x), time and peak memory, against neural-tangents when importable.

Setting: L = 3, M_0 = 784, σ_w² = 2, σ_b² = 0, float64, N unit-norm Gaussian inputs.
Every case runs in a fresh subprocess, so the peak resident set size (VmHWM) is the case's own: the
whole process (interpreter, torch or jax, the inputs), over the warm-up and the timed calls (the
warm-up kernel stays alive, so two N × N kernels at once), measured the same way for both libraries.

* N = 2000, 5000 in memory, ReLU and erf: ``natural_tangents.theory.ntk(x, ...)`` and, when
  ``neural_tangents`` imports in this interpreter, its jit-compiled ``stax`` ``kernel_fn(x, None, "ntk")``
  (warm: compiled by a first call). Times are medians over ``--repeats`` calls after one warm-up call;
  both kernels are saved and compared (max absolute difference, max relative difference
  max|Δ| / max|Θ|, and the worst relative difference on the diagonal).
* N = 20000 (``--big``), ReLU, written with ``out=`` into a ``.npy`` (3.2 GB): time and peak RSS.
* ``--methods``: the other integration routes of natural-tangents (tanh and GELU by quadrature and by
  the Hermite series) at N = 2000, M_0 = 100, σ_b² = 0.5, for choosing a method.

neural-tangents is never a dependency: install it in a separate environment, e.g.

    python -m venv /work/ntvenv
    /work/ntvenv/bin/pip install -c constraints.txt "jax[cpu]==0.4.30" neural-tangents==0.6.5 torch==2.13.0 -e .
    /work/ntvenv/bin/python benchmarks/kernels.py            # full run (about 5 minutes on 2 idle cores)
    python benchmarks/kernels.py --quick                     # N = 2000 only, no N = 20000, no neural-tangents needed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEPTH, M0, SIGMA_W2, SIGMA_B2 = 3, 784, 2.0, 0.0


def _inputs(n: int, m0: int = M0) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, m0))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) / 1024.0
    return float("nan")


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# ----------------------------------------------------------------------------------- the children
def _child_ours(case: dict) -> dict:
    import torch

    from natural_tangents import theory

    torch.set_num_threads(case["threads"])
    x = torch.from_numpy(_inputs(case["n"], case.get("m0", M0)))
    opts = {
        "depth": DEPTH,
        "activation": case["activation"],
        "sigma_w2": SIGMA_W2,
        "sigma_b2": case.get("sigma_b2", SIGMA_B2),
        "method": case.get("method", "auto"),
        "progress": False,
    }
    base = _status_mib("VmRSS")
    if case.get("out"):
        start = time.perf_counter()
        k = theory.ntk(x, out=case["out"], **opts)
        seconds = time.perf_counter() - start
        del k
        return {"seconds": seconds, "base_mib": base, "peak_mib": _status_mib("VmHWM")}
    k = theory.ntk(x, **opts)  # warm-up
    seconds = _timed(lambda: theory.ntk(x, **opts), case["repeats"])
    if case.get("save"):
        np.save(case["save"], k.numpy())
    return {"seconds": seconds, "base_mib": base, "peak_mib": _status_mib("VmHWM")}


def _child_nt(case: dict) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from neural_tangents import stax

    act = {"relu": stax.Relu, "erf": stax.Erf}[case["activation"]]
    dense = lambda: stax.Dense(1, W_std=SIGMA_W2**0.5, b_std=None, parameterization="ntk")  # noqa: E731
    layers = [dense()]
    for _ in range(DEPTH - 1):
        layers += [act(), dense()]
    kernel_fn = jax.jit(stax.serial(*layers)[2], static_argnames="get")
    x = jnp.asarray(_inputs(case["n"]))
    base = _status_mib("VmRSS")
    k = kernel_fn(x, None, "ntk").block_until_ready()  # compile and warm up
    seconds = _timed(lambda: kernel_fn(x, None, "ntk").block_until_ready(), case["repeats"])
    if case.get("save"):
        np.save(case["save"], np.asarray(k))
    return {"seconds": seconds, "base_mib": base, "peak_mib": _status_mib("VmHWM")}


def _spawn(kind: str, case: dict, timeout: float = 1800) -> dict:
    """Run one case in a fresh interpreter; its result is the last line of its stdout (JSON)."""
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(case)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _have_nt() -> bool:
    probe = "import jax, neural_tangents"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


# --------------------------------------------------------------------------------------- the tables
def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def compare(args, tmp: Path, nt: bool) -> str:
    rows = []
    for act in args.activations:
        for n in args.sizes:
            case = {"n": n, "activation": act, "repeats": args.repeats, "threads": args.threads}
            ours = _spawn("ours", {**case, "save": str(tmp / "ours.npy")})
            row = [act, str(n), f"{ours['seconds']:.2f}", f"{ours['peak_mib']:.0f}"]
            if nt:
                theirs = _spawn("nt", {**case, "save": str(tmp / "nt.npy")})
                a, b = np.load(tmp / "ours.npy"), np.load(tmp / "nt.npy")
                d = np.abs(a - b)
                diag = np.abs(np.diag(a) - np.diag(b)) / np.abs(np.diag(b))
                row += [
                    f"{theirs['seconds']:.2f}",
                    f"{ours['seconds'] / theirs['seconds']:.2f}",
                    f"{theirs['peak_mib']:.0f}",
                    f"{d.max():.1e}",
                    f"{d.max() / np.abs(b).max():.1e}",
                    f"{diag.max():.1e}",
                ]
            rows.append(row)
            print(" | ".join(row), file=sys.stderr, flush=True)
    header = ["activation", "N", "natural-tangents (s)", "peak RSS (MiB)"]
    if nt:
        header += ["neural-tangents (s)", "time ratio", "nt peak RSS (MiB)", "max abs diff", "max rel diff"]
        header += ["diagonal rel diff"]
    return table(rows, header)


def big(args, tmp: Path) -> str:
    out = tmp / "ntk_big.npy"
    case = {"n": args.big, "activation": "relu", "threads": args.threads, "out": str(out)}
    try:
        r = _spawn("ours", case)
        size = out.stat().st_size / 2**30
    finally:
        out.unlink(missing_ok=True)
    row = ["relu", str(args.big), f"{size:.2f} GiB .npy", f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}"]
    return table([row], ["activation", "N", "out=", "time (s)", "peak RSS (MiB)"])


METHODS = [("tanh", "quadrature"), ("tanh", "series"), ("gelu", "quadrature"), ("gelu", "series")]


def methods(args) -> str:
    rows = []
    for act, method in METHODS:
        case = {"n": 2000, "m0": 100, "sigma_b2": 0.5, "activation": act, "method": method}
        r = _spawn("ours", {**case, "repeats": 1, "threads": args.threads})
        rows.append([act, method, f"{r['seconds']:.2f}", f"{r['peak_mib']:.0f}"])
    return table(rows, ["activation", "method", "time (s)", "peak RSS (MiB)"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 2000 only, no N = 20000 run, one repeat")
    ap.add_argument("--sizes", type=int, nargs="*", default=[2000, 5000])
    ap.add_argument("--activations", nargs="*", default=["relu", "erf"], choices=["relu", "erf"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big", type=int, default=20000, help="N of the out= run (0: skip)")
    ap.add_argument("--methods", action="store_true", help="also time the quadrature and series methods")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--tmp", default=None, help="folder for the kernels written to disk (default: a temp folder)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, case = args.child
        print(json.dumps((_child_ours if kind == "ours" else _child_nt)(json.loads(case))))
        return
    if args.quick:
        args.sizes, args.big, args.repeats = [2000], 0, 1
    nt = _have_nt()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        print(f"analytic NTK, L = {DEPTH}, M_0 = {M0}, σ_w² = {SIGMA_W2:g}, σ_b² = {SIGMA_B2:g}, float64, ")
        print(f"{args.threads} torch threads; neural-tangents {'found' if nt else 'not importable: skipped'}\n")
        print(compare(args, Path(tmp), nt))
        if args.big:
            print(f"\nN = {args.big} into a .npy with out=\n")
            print(big(args, Path(tmp)))
        if args.methods:
            print("\nintegration methods, N = 2000, M_0 = 100, σ_b² = 0.5\n")
            print(methods(args))


if __name__ == "__main__":
    main()
