"""Many small independent tensor jobs on worker threads, one torch intra-op thread each.

Small batched LAPACK calls (the unit-wise systems, kernel tiles) run far slower with torch's
intra-op threads than one per worker: every operation synchronizes the thread pool, which costs a
scheduler slice on a busy machine. Whole jobs on separate threads (torch releases the GIL inside
its kernels) keep the cores busy without that synchronization.
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

__all__ = ["SCIPY_BLAS_PER_THREAD", "ordered_map", "single_thread"]

T = TypeVar("T")
R = TypeVar("R")


def _scipy_blas_threads() -> Callable[[int], int] | None:
    """SciPy's OpenBLAS ``openblas_set_num_threads_local`` (a per-thread setting), where SciPy
    bundles its own OpenBLAS (the wheels); None elsewhere."""
    try:
        import scipy

        libs = sorted((Path(scipy.__file__).parent.parent / "scipy.libs").glob("libscipy_openblas-*.so*"))
        setter = ctypes.CDLL(str(libs[0])).openblas_set_num_threads_local
    except (ImportError, IndexError, OSError, AttributeError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    return setter


_BLAS_THREADS = _scipy_blas_threads()
#: whether worker threads can call SciPy's LAPACK single-threaded (see :mod:`.lapack`)
SCIPY_BLAS_PER_THREAD = _BLAS_THREADS is not None


def single_thread() -> None:
    """Worker-thread initializer: one intra-op thread for torch and for SciPy's OpenBLAS (both
    settings are per thread), so that concurrent jobs do not oversubscribe the cores."""
    torch.set_num_threads(1)
    if _BLAS_THREADS is not None:
        _BLAS_THREADS(1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` on ``threads`` worker threads (default: torch's thread count), results in
    order, at most 2·threads jobs in flight (bounded memory). One thread: a plain loop."""
    threads = torch.get_num_threads() if threads is None else max(1, int(threads))
    if threads == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads, initializer=single_thread) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
