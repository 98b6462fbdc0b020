"""Large kernel matrices tile by tile: in memory, into a ``.npy`` file, and across processes.

:func:`tiled` evaluates an (…, N1, N2) kernel from a function that computes one rectangular tile,
``block_fn(rows, cols) -> (…, len(rows), len(cols))``. It is the engine behind the ``batch_size=``,
``out=`` and ``process_group=`` arguments of :func:`natural_tangents.theory.ntk`,
:func:`natural_tangents.theory.kernels` and the empirical kernels::

    from natural_tangents.tiling import tiled
    gram = lambda r, c: x[r] @ x[c].T
    k = tiled(gram, len(x), batch_size=1024)                    # symmetric: tiles (i, j ≥ i) only
    k = tiled(gram, len(x), out="gram.npy")                     # a tensor backed by gram.npy

* **Tiles.** The rows and columns are cut into tiles of side ``batch_size`` (the last ones ragged).
  Without ``n2`` the kernel is symmetric: only the tiles on and above the diagonal are computed, each
  off-diagonal one is written twice (as is and transposed), and a diagonal tile is made exactly
  symmetric by keeping its upper triangle. The working set is a few tiles; the output is the only
  N1 × N2 object.
* **out=** a path: the ``.npy`` header is written first (``numpy.lib.format.open_memmap``), then
  every tile row goes to its place in the file with ``os.pwrite``, so the written kernel never
  counts in the resident memory of the process; the result is ``torch.from_numpy`` of
  ``np.load(out, mmap_mode="r+")``: pages are read on demand, and writing to the tensor writes
  the file. While a run writes ``out``, a lock file ``out + ".lock"`` exists (created with
  ``O_EXCL``, removed at the end); a second run on the same path is refused.
* **process_group=** a ``torch.distributed`` group (default ``None``: this process alone, which
  is the one-rank case of the same code). The tile list is shared round-robin: rank r computes
  tiles r, r + K, r + 2K, … of K ranks. With ``out=`` every rank writes its own tiles into the one
  file (rank 0 creates it; a shared filesystem across machines), and all return after a barrier.
  Without ``out=`` every rank fills its tiles into a zero buffer and one all-reduce (sum) of the
  N1 × N2 buffer gives every rank the whole kernel (each entry is written by exactly one rank, so
  the sum is exact). Before any work the ranks all-gather a checksum of their arguments (sizes,
  tile side, dtype, path and the caller's ``signature``, e.g. the data and the architecture), and
  every rank refuses if they differ.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._parallel import ordered_map

__all__ = ["tiled", "tiles", "default_batch_size", "intra_op_threads"]

DEFAULT_TILE = 512
"""Default tile side: 512² float64 entries are 2 MiB, a working set that stays in cache-sized pieces."""


def default_batch_size(n1: int, n2: int, *, entries: int = DEFAULT_TILE * DEFAULT_TILE, stack: int = 1) -> int:
    """A tile side for an (N1, N2) kernel: about ``entries / stack`` entries per tile of each of the
    ``stack`` stacked outputs, and at most a quarter of the larger side (so that a few worker threads
    have several tiles to share), at least 32 (or the larger side, if smaller)."""
    side = int(math.sqrt(max(1, entries // max(1, stack))))
    longest = max(n1, n2)
    return max(min(32, longest), min(side, -(-longest // 4)))


@contextmanager
def intra_op_threads(n: int):
    """Run a block with ``n`` torch intra-op threads in this thread, then restore the setting.

    The tile engine parallelizes over tiles with worker threads; the O(N·M_0) setup around it is
    cheaper on one thread than with per-operation synchronization (which costs a scheduler slice per
    operation on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def tiles(n1: int, n2: int | None, batch_size: int) -> list[tuple[slice, slice]]:
    """The (rows, cols) tiles of an (N1, N2) kernel in row-major order; ``n2=None``: symmetric,
    only the tiles on and above the diagonal."""
    rows = [slice(s, min(n1, s + batch_size)) for s in range(0, n1, batch_size)]
    if n2 is None:
        return [(r, c) for i, r in enumerate(rows) for c in rows[i:]]
    cols = [slice(s, min(n2, s + batch_size)) for s in range(0, n2, batch_size)]
    return [(r, c) for r in rows for c in cols]


# ------------------------------------------------------------------------------ process groups
def _group_info(process_group) -> tuple[int, int]:
    """(rank, world size) in ``process_group``; (0, 1) for None. Refuses an uninitialized group."""
    if process_group is None:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "process_group: torch.distributed is not initialized in this process; call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment for it), "
            "or pass process_group=None to compute in this process alone"
        )
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise RuntimeError("process_group: this process is not a member of the group; pass a group it belongs to")
    return rank, dist.get_world_size(process_group)


def _comm_device(process_group) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _checksum(items: Sequence[object]) -> int:
    digest = hashlib.sha256(repr(tuple(items)).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def _check_agreement(process_group, world: int, items: Sequence[object]) -> None:
    """All-gather a checksum of ``items``; every rank raises if any two ranks differ."""
    import torch.distributed as dist

    mine = torch.tensor([_checksum(items)], dtype=torch.int64, device=_comm_device(process_group))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=process_group)
    sums = [int(t) for t in every]
    if len(set(sums)) > 1:
        odd = [r for r, s in enumerate(sums) if s != sums[0]]
        raise ValueError(
            f"process_group: the ranks disagree on the arguments (ranks {odd} differ from rank 0 in the "
            "sizes, batch_size, dtype, out, or the data and settings of the kernel); call the function "
            "with the same arguments on every rank"
        )


def _broadcast_error(process_group, message: str | None) -> None:
    """Rank 0's error (or None) to every rank; every rank raises it."""
    if process_group is not None:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=dist.get_global_rank(process_group, 0), group=process_group)
        message = box[0]
    if message is not None:
        raise FileExistsError(message) if "lock file" in message else OSError(message)


def _barrier(process_group) -> None:
    if process_group is not None:
        import torch.distributed as dist

        dist.barrier(group=process_group)


# ------------------------------------------------------------------------------------ the file
def _lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def _create(out: Path, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Rank 0: take the lock and write the header (and a sparse body). Returns an error or None."""
    lock = _lock_path(out)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return (
            f"out: {out} is being written by another run (its lock file {lock} exists); wait for that run, "
            f"choose another path, or delete {lock} if that run has died"
        )
    except OSError as err:
        return f"out: cannot create {lock} ({err.strerror}); check that the folder {out.parent} exists and is writable"
    with os.fdopen(fd, "w") as f:
        f.write(f"pid {os.getpid()}\n")
    try:
        arr = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=shape)
        del arr
    except OSError as err:
        lock.unlink(missing_ok=True)
        return f"out: cannot create {out} ({err.strerror}); check the folder and the free disk space"
    return None


def _data_offset(out: Path) -> int:
    return int(np.load(out, mmap_mode="r").offset)  # maps without reading: the header's length


class _FileSink:
    """Writes tiles of a C-ordered (*lead, N1, N2) array into the body of a .npy with pwrite."""

    def __init__(self, out: Path, lead: tuple[int, ...], n1: int, n2: int, dtype: torch.dtype):
        self.fd = os.open(out, os.O_RDWR)
        self.offset = _data_offset(out)
        self.lead, self.n1, self.n2 = int(np.prod(lead, dtype=np.int64)), n1, n2
        self.item = torch.empty(0, dtype=dtype).element_size()

    def put(self, block: Tensor, rows: slice, cols: slice) -> None:
        block = block.reshape(self.lead, rows.stop - rows.start, cols.stop - cols.start).cpu().contiguous()
        data = block.numpy()
        for k in range(self.lead):
            base = self.offset + ((k * self.n1 + rows.start) * self.n2 + cols.start) * self.item
            for i in range(data.shape[1]):
                os.pwrite(self.fd, data[k, i].tobytes(), base + i * self.n2 * self.item)

    def close(self, sync: bool) -> None:
        if sync:
            os.fsync(self.fd)
        os.close(self.fd)


class _MemorySink:
    def __init__(self, buf: Tensor):
        self.buf = buf

    def put(self, block: Tensor, rows: slice, cols: slice) -> None:
        self.buf[..., rows, cols] = block


# --------------------------------------------------------------------------------------- engine
def _progress_bar(total: int, progress: bool | None, rank: int, desc: str):
    from tqdm.auto import tqdm

    show = rank == 0 and (progress if progress is not None else (sys.stderr.isatty() and total >= 8))
    return tqdm(total=total, desc=desc, disable=not show, leave=False, file=sys.stderr, dynamic_ncols=True)


def _check_args(n1: int, n2: int | None, batch_size: int | None, lead: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    for name, n in (("n1", n1), ("n2", n2)):
        if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
            raise ValueError(f"{name}: expected a positive number of samples, got {n!r}")
    if batch_size is None:
        batch_size = default_batch_size(n1, n2 or n1, stack=max(1, int(np.prod(lead, dtype=np.int64))))
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer (the tile side), got {batch_size!r}")
    return int(batch_size), tuple(int(s) for s in lead)


def tiled(
    block_fn: Callable[[slice, slice], Tensor],
    n1: int,
    n2: int | None = None,
    *,
    batch_size: int | None = None,
    out: str | os.PathLike | None = None,
    process_group=None,
    progress: bool | None = None,
    dtype: torch.dtype = torch.float64,
    lead: Sequence[int] = (),
    device: torch.device | str = "cpu",
    signature: Sequence[object] = (),
    desc: str = "kernel",
    threads: int | None = None,
) -> Tensor:
    """Compute a (*lead, N1, N2) kernel tile by tile (module docstring: tiles, files, processes).

    Args:
        block_fn: ``block_fn(rows, cols)`` returns the (*lead, len(rows), len(cols)) tile of the
            kernel for the row and column ``slice`` objects (any dtype; cast to ``dtype``).
        n1, n2: the numbers of rows and columns; ``n2=None``: a symmetric N1 × N1 kernel, of which
            only the tiles on and above the diagonal are computed (``block_fn`` must then return
            the true tile of a symmetric kernel; diagonal tiles are symmetrized from their upper
            triangle).
        batch_size: the tile side (default :func:`default_batch_size`: about 512² entries per tile).
        out: a ``.npy`` path to write the kernel into (returned as a tensor backed by that file);
            None: an in-memory tensor.
        process_group: a ``torch.distributed`` process group sharing the tiles (None: one process).
            Every rank must call with the same arguments and gets the same result.
        progress: a tqdm bar on rank 0: None shows it when stderr is a terminal and there are at
            least 8 tiles, True always, False never.
        dtype: the output dtype; lead: leading (stacked) dimensions of every tile.
        device: where the in-memory result lives (the collectives' backend must support it).
        signature: extra items every rank must agree on (e.g. a checksum of the data, the settings).
        desc: the progress bar's label.
        threads: worker threads, each computing whole tiles with one intra-op thread (default
            ``torch.get_num_threads()``; 1: tiles one after another with torch's own threads).

    Returns:
        The (*lead, N1, N2) kernel, on every rank.

    Raises:
        RuntimeError: ``process_group`` is given but torch.distributed is not initialized.
        ValueError: bad sizes or tile side, or ranks that disagree on the arguments.
        FileExistsError: ``out`` is being written by another run (its lock file exists).
    """
    batch_size, lead = _check_args(n1, n2, batch_size, lead)
    symmetric = n2 is None
    ncols = n1 if symmetric else int(n2)
    rank, world = _group_info(process_group)
    out_path = None if out is None else Path(os.fspath(out))
    if world > 1:
        items = (n1, n2, batch_size, lead, str(dtype), None if out_path is None else str(out_path.resolve()))
        _check_agreement(process_group, world, (*items, *signature))
    shape = (*lead, n1, ncols)
    threads = torch.get_num_threads() if threads is None else max(1, int(threads))
    todo = tiles(n1, n2, batch_size)[rank::world]
    if out_path is None:
        alloc = torch.zeros if world > 1 else torch.empty  # one rank writes every entry
        buf = alloc(shape, dtype=dtype, device=device)
        sink = _MemorySink(buf)
        _fill(block_fn, todo, sink, symmetric, dtype, progress, rank, desc, threads)
        if world > 1:
            import torch.distributed as dist

            comm = _comm_device(process_group)
            moved = buf.to(comm)
            dist.all_reduce(moved, group=process_group)
            buf.copy_(moved)
        return buf
    return _to_file(
        block_fn, todo, out_path, shape, symmetric, dtype, progress, process_group, rank, world, desc, threads
    )


def _to_file(
    block_fn, todo, out: Path, shape, symmetric, dtype, progress, process_group, rank, world, desc, threads
) -> Tensor:
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    error = _create(out, shape, np_dtype) if rank == 0 else None
    _broadcast_error(process_group, error)  # also the barrier after rank 0 created the file
    try:
        sink = _FileSink(out, shape[:-2], shape[-2], shape[-1], dtype)
        try:
            _fill(block_fn, todo, sink, symmetric, dtype, progress, rank, desc, threads)
        finally:
            sink.close(sync=world > 1)
        _barrier(process_group)
    finally:
        if rank == 0:
            _lock_path(out).unlink(missing_ok=True)
    return torch.from_numpy(np.load(out, mmap_mode="r+"))


def _one_tile(block_fn, sink, symmetric: bool, dtype: torch.dtype, rows: slice, cols: slice) -> None:
    block = block_fn(rows, cols)
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    if tuple(block.shape[-2:]) != shape:
        raise ValueError(
            f"block_fn: returned a tile of shape {tuple(block.shape)} for rows {rows.start}:{rows.stop} "
            f"and columns {cols.start}:{cols.stop}; expected (..., {shape[0]}, {shape[1]})"
        )
    block = block.to(dtype)
    if symmetric and rows == cols:
        block = torch.triu(block) + torch.triu(block, 1).transpose(-1, -2)
    sink.put(block, rows, cols)
    if symmetric and rows != cols:
        sink.put(block.transpose(-1, -2), cols, rows)


def _fill(block_fn, todo, sink, symmetric: bool, dtype, progress, rank: int, desc: str, threads: int) -> None:
    """Compute and store this rank's tiles. With ``threads`` > 1, that many worker threads take whole
    tiles (each with one intra-op thread), at most 2·threads tiles in flight: no synchronization
    per elementwise operation, which matters on small tiles and on a loaded machine."""
    with _progress_bar(len(todo), progress, rank, desc) as bar:
        if threads <= 1 or len(todo) <= 1:
            with intra_op_threads(threads):  # one tile: torch's own threads inside it
                for rows, cols in todo:
                    _one_tile(block_fn, sink, symmetric, dtype, rows, cols)
                    bar.update(1)
            return
        for _ in ordered_map(lambda tile: _one_tile(block_fn, sink, symmetric, dtype, *tile), todo, threads):
            bar.update(1)
