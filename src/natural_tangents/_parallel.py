"""Many small independent tensor jobs on worker threads, one torch intra-op thread each.

Small batched LAPACK calls (the unit-wise systems, kernel tiles) run far slower with torch's
intra-op threads than one per worker: every operation synchronizes the thread pool, which costs a
scheduler slice on a busy machine. Whole jobs on separate threads (torch releases the GIL inside
its kernels) keep the cores busy without that synchronization.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["ordered_map", "single_thread"]

T = TypeVar("T")
R = TypeVar("R")


def single_thread() -> None:
    """Worker-thread initializer: one intra-op thread (the setting is per thread)."""
    torch.set_num_threads(1)


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
