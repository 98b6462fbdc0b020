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
* **out=** a path: the tiles go to ``out + ".partial"`` (a full-size ``.npy``: header first, then
  every tile row to its place with ``os.pwrite``, so the written kernel never counts in the resident
  memory of the process), which is synced and renamed to ``out`` when every tile is in it: a file at
  ``out`` is always a whole kernel. The result is ``torch.from_numpy`` of
  ``np.load(out, mmap_mode="r+")``: pages are read on demand, and writing to the tensor writes the
  file. An existing ``out`` is refused unless ``overwrite=True`` (then replaced when the new kernel
  is complete). While a run writes, a lock file ``out + ".lock"`` names its process; a second run is
  refused, and a lock whose process on this host has died is taken over with a warning.
* **Resuming.** A journal ``out + ".journal"`` records the finished tiles (after syncing their
  data, every ``checkpoint`` seconds and when the run stops, also on an error or Ctrl-C), with a
  SHA-256 fingerprint of the sizes, tile side, dtype and the caller's ``signature`` (the inputs and
  settings). A re-run with the same arguments computes only the tiles not recorded; a re-run with
  other arguments is refused (naming what differs) unless ``overwrite=True``, which discards the
  unfinished run. Without a ``signature`` a run cannot be checked, so it never resumes. Details of
  the files: :mod:`natural_tangents.tiling_files`.
* **process_group=** a ``torch.distributed`` group (default ``None``: this process alone, which
  is the one-rank case of the same code). The tile list is shared round-robin: rank r computes
  tiles r, r + K, r + 2K, … of K ranks. With ``out=`` every rank writes its own tiles into the one
  file (rank 0 creates it; a shared filesystem across machines), each rank records its own tiles
  in its own journal (``out + ".journal.<rank>"``; rank 0 merges them all when a run resumes, also
  with another number of ranks), and all return after rank 0 renamed the finished file.
  Without ``out=`` every rank fills its tiles into a zero buffer and one all-reduce (sum) of the
  N1 × N2 buffer gives every rank the whole kernel (each entry is written by exactly one rank, so
  the sum is exact). Before any work the ranks all-gather a checksum of their arguments (sizes,
  tile side, dtype, path and the caller's ``signature``, e.g. the data and the architecture), and
  every rank refuses if they differ.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .distributed import agree_on, all_reduce_in_place, barrier, rank_and_size, share_outcome
from .linalg.threads import ordered_map
from .tiling_files import Journal, Layout, Lock, fingerprint, finish, partial_path, prepare, recorded, warn

__all__ = ["tiled", "tiles", "default_batch_size", "intra_op_threads", "fingerprint", "finished_tiles"]

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


# ------------------------------------------------------------------------------------ the file
class _FileSink:
    """Writes tiles of a C-ordered (*lead, N1, N2) array into the body of a .npy with pwrite."""

    def __init__(self, out: Path, lead: tuple[int, ...], n1: int, n2: int, dtype: torch.dtype):
        self.fd = os.open(out, os.O_RDWR)
        self.offset = int(np.load(out, mmap_mode="r").offset)  # maps without reading: the header's length
        self.lead, self.n1, self.n2 = int(np.prod(lead, dtype=np.int64)), n1, n2
        self.item = torch.empty(0, dtype=dtype).element_size()

    def put(self, block: Tensor, rows: slice, cols: slice) -> None:
        block = block.reshape(self.lead, rows.stop - rows.start, cols.stop - cols.start).cpu().contiguous()
        data = block.numpy()
        for k in range(self.lead):
            base = self.offset + ((k * self.n1 + rows.start) * self.n2 + cols.start) * self.item
            for i in range(data.shape[1]):
                os.pwrite(self.fd, data[k, i].tobytes(), base + i * self.n2 * self.item)

    def close(self) -> None:
        try:
            os.fsync(self.fd)  # every tile on disk before the file is renamed to out
        finally:
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
    overwrite: bool = False,
    process_group=None,
    progress: bool | None = None,
    dtype: torch.dtype = torch.float64,
    lead: Sequence[int] = (),
    device: torch.device | str = "cpu",
    signature: Sequence[object] = (),
    desc: str = "kernel",
    threads: int | None = None,
    on_tile: Callable[[int, slice, slice], None] | None = None,
    checkpoint: float = 1.0,
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
            None: an in-memory tensor. An interrupted run into ``out`` with the same arguments and
            ``signature`` is resumed.
        overwrite: with ``out=``: replace an existing ``out`` (when the new kernel is complete) and
            discard an unfinished run of other arguments; False (default): refuse both.
        process_group: a ``torch.distributed`` process group sharing the tiles (None: one process).
            Every rank must call with the same arguments and gets the same result.
        progress: a tqdm bar on rank 0: None shows it when stderr is a terminal and there are at
            least 8 tiles, True always, False never.
        dtype: the output dtype; lead: leading (stacked) dimensions of every tile.
        device: where the in-memory result lives (the collectives' backend must support it).
        signature: items that identify the kernel's inputs (e.g. :func:`fingerprint` of the data,
            the settings): every rank must agree on them, and an interrupted run into ``out`` is
            resumed only when they are the same (empty: never resumed).
        desc: the progress bar's label.
        threads: worker threads, each computing whole tiles with one intra-op thread (default
            ``torch.get_num_threads()``; 1: tiles one after another with torch's own threads).
        on_tile: called as ``on_tile(index, rows, cols)`` on the calling thread after each tile this
            process computed and stored, ``index`` counting in :func:`tiles` order (a progress hook;
            an exception it raises stops the run, keeping the stored tiles for a re-run).
        checkpoint: with ``out=``, the seconds between two journal records (each syncs the data
            written so far first; the first tile is recorded at once); 0: after every tile. A
            killed run loses the tiles of at most that last interval (and those in flight); an
            exception or Ctrl-C loses none.

    Returns:
        The (*lead, N1, N2) kernel, on every rank.

    Raises:
        RuntimeError: ``process_group`` is given but torch.distributed is not initialized.
        ValueError: bad sizes or tile side, or ranks that disagree on the arguments.
        FileExistsError: ``out`` exists and ``overwrite`` is False; ``out`` is being written by
            another run (its lock file names a live process); an unfinished run into ``out`` had
            other arguments and ``overwrite`` is False.
    """
    batch_size, lead = _check_args(n1, n2, batch_size, lead)
    symmetric = n2 is None
    ncols = n1 if symmetric else int(n2)
    rank, world = rank_and_size(process_group)
    out_path = None if out is None else Path(os.fspath(out))
    items = (n1, n2, batch_size, lead, str(dtype), None if out_path is None else str(out_path.resolve()))
    agree_on(
        (*items, *signature), process_group, "the sizes, batch_size, dtype, out, or the data and settings of the kernel"
    )
    shape = (*lead, n1, ncols)
    threads = torch.get_num_threads() if threads is None else max(1, int(threads))
    every = [(i, rows, cols) for i, (rows, cols) in enumerate(tiles(n1, n2, batch_size))]
    engine = dict(symmetric=symmetric, dtype=dtype, progress=progress, rank=rank, desc=desc, threads=threads)
    if out_path is None:
        alloc = torch.zeros if world > 1 else torch.empty  # one rank writes every entry
        buf = alloc(shape, dtype=dtype, device=device)
        _fill(block_fn, every[rank::world], _MemorySink(buf), None, on_tile, **engine)
        if world > 1:
            all_reduce_in_place(buf, process_group)  # each entry from one rank: the sum is exact
        return buf
    if not (isinstance(checkpoint, (int, float)) and checkpoint >= 0):
        raise ValueError(f"checkpoint: expected the seconds between journal records (>= 0), got {checkpoint!r}")
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    inputs = fingerprint(*signature) if signature else None
    layout = Layout(shape, str(np_dtype), batch_size, symmetric, len(every), inputs)
    return _to_file(block_fn, every, out_path, layout, overwrite, process_group, world, on_tile, checkpoint, engine)


def finished_tiles(out: str | os.PathLike) -> set[int]:
    """The tiles (indices in :func:`tiles` order) that an interrupted run into ``out`` recorded as
    finished; a re-run with the same arguments computes only the others. Empty: no such run."""
    return recorded(Path(os.fspath(out)))


def _to_file(block_fn, every, out: Path, layout, overwrite, process_group, world, on_tile, checkpoint, engine):
    rank, lock, error, done = engine["rank"], None, None, set()
    if rank == 0:
        try:
            lock = Lock.take(out)
            if lock.note:
                warn(lock.note)
            done = prepare(out, layout, overwrite)
        except (OSError, ValueError) as err:  # FileExistsError, a missing folder, a full disk
            error = err  # raised on every rank by share_outcome
            if lock is not None:
                lock.release()
    try:
        done = set(share_outcome(process_group, error, sorted(done)))  # also: rank 0 has made the file
        todo = [tile for tile in every if tile[0] not in done][rank::world]
        sink = _FileSink(partial_path(out), layout.shape[:-2], layout.shape[-2], layout.shape[-1], engine["dtype"])
        try:
            journal = Journal(out, rank, layout, sink.fd, checkpoint)
            try:
                _fill(block_fn, todo, sink, journal.record, on_tile, **engine)
            finally:
                journal.close()
        finally:
            sink.close()
        barrier(process_group)  # every rank's tiles are on disk
        error = None
        if rank == 0:
            try:
                finish(out)
            except OSError as err:
                error = err
        share_outcome(process_group, error)
    finally:
        if lock is not None:
            lock.release()
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


def _fill(block_fn, todo, sink, record, on_tile, *, symmetric, dtype, progress, rank: int, desc: str, threads: int):
    """Compute and store this rank's tiles ``todo`` (index, rows, cols); after each, ``record(index)``
    (the journal) and ``on_tile(index, rows, cols)`` on this thread. With ``threads`` > 1, that many
    worker threads take whole tiles (each with one intra-op thread), at most 2·threads tiles in
    flight: no synchronization per elementwise operation, which matters on small tiles and on a
    loaded machine."""

    def stored(index: int, rows: slice, cols: slice) -> None:
        bar.update(1)
        if record is not None:
            record(index)
        if on_tile is not None:
            on_tile(index, rows, cols)

    with _progress_bar(len(todo), progress, rank, desc) as bar:
        if threads <= 1 or len(todo) <= 1:
            with intra_op_threads(threads):  # one tile: torch's own threads inside it
                for index, rows, cols in todo:
                    _one_tile(block_fn, sink, symmetric, dtype, rows, cols)
                    stored(index, rows, cols)
            return
        work = ordered_map(lambda tile: _one_tile(block_fn, sink, symmetric, dtype, *tile[1:]), todo, threads)
        with closing(work):  # on an exception here: wait for the tiles in flight before the file closes
            for _, tile in zip(work, todo):
                stored(*tile)
