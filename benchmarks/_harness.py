"""Shared measuring code for the benchmarks: interleaved timing ratios and peak memory.

Times are medians over repeats, and every case is timed interleaved with its baseline in the same
process, so a ratio is robust to a noisy machine. Peak memory is measured in a fresh subprocess per
case: the peak resident set size (VmHWM, reset after setup and a malloc_trim) minus the resident
size before it, i.e. the extra memory the case needs on top of the model and the data.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def median_times(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, calling them round-robin ``repeats`` times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def _status_mib(key: str) -> float:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB; ru_maxrss as a fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak() -> None:
    """Reset the peak resident set size (VmHWM) of this process (Linux ≥ 4.0: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _trim() -> None:
    """Return freed heap memory to the OS (glibc), so that the case's allocations show up in RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _child(setup, case, args, queue) -> None:
    state = setup(*args)
    _trim()
    _reset_peak()
    base = _status_mib("VmRSS")
    case(state)
    queue.put((base, _status_mib("VmHWM")))


def peak_extra_mib(setup: Callable, case: Callable, args: tuple) -> tuple[float, float]:
    """(resident MiB after ``setup(*args)``, extra peak MiB of ``case(state)``), in a fresh process.

    ``setup`` and ``case`` must be module-level functions (they are pickled by name)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(setup, case, args, queue))
    proc.start()
    base, peak = queue.get()
    proc.join()
    return base, peak - base


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
