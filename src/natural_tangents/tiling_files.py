"""The files of a kernel that :func:`natural_tangents.tiling.tiled` writes into ``out=``.

Next to ``out`` (say ``ntk.npy``), while a run is under way or after it was interrupted:

* ``ntk.npy.lock``: ``pid <pid> host <host>`` of the run writing, which also holds an advisory
  ``flock`` on it. Another run is refused while that process lives; a lock whose process on this
  host has died (killed, out of memory) is taken over, with a warning. A lock from another host,
  or one that cannot be read, is never taken over.
* ``ntk.npy.partial``: the ``.npy`` being written (full size, header first, unwritten tiles zero).
  When every tile is in it, it is synced and renamed to ``ntk.npy`` in one step: ``ntk.npy`` is
  always a whole kernel.
* ``ntk.npy.journal`` (rank 0) and ``ntk.npy.journal.<r>`` (rank r > 0 of a process group): a JSON
  header line (shape, dtype, tile side, number of tiles, and a SHA-256 fingerprint of the inputs
  and settings) followed by the index of every finished tile in :func:`~natural_tangents.tiling.tiles`
  order, one per line. Each rank appends only its own tiles to its own journal (no file has two
  writers), and records a tile only after the data written so far has been synced to disk
  (``fdatasync``): every ``checkpoint`` seconds and when the run stops, also on an exception or
  Ctrl-C. A re-run with the same arguments reads every journal, and rank 0 merges them into its
  own before any rank computes: the re-run computes only the tiles none of them recorded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["fingerprint", "Layout", "Lock", "Journal", "prepare", "finish", "recorded", "partial_path", "warn"]

FORMAT = "natural-tangents tile journal 1"
HOST = socket.gethostname()


def fingerprint(*items: object) -> str:
    """A SHA-256 (hex) of ``items``: tensors and arrays by dtype, shape and bytes; lists, tuples and
    dicts item by item; anything else by its ``repr``."""
    h = hashlib.sha256()

    def add(item: object) -> None:
        if isinstance(item, torch.Tensor):
            t = item.detach().cpu().contiguous().reshape(-1)
            h.update(f"tensor {t.dtype} {tuple(item.shape)};".encode())
            h.update(t.view(torch.uint8).numpy())
        elif isinstance(item, np.ndarray) and item.dtype != object:
            h.update(f"array {item.dtype} {item.shape};".encode())
            h.update(np.ascontiguousarray(item).reshape(-1).view(np.uint8))
        elif isinstance(item, (list, tuple)):
            h.update(f"{type(item).__name__} {len(item)};".encode())
            for part in item:
                add(part)
        elif isinstance(item, dict):
            h.update(f"dict {len(item)};".encode())
            for key, value in item.items():
                add(key)
                add(value)
        else:
            text = repr(item)
            h.update(f"{len(text)}:{text};".encode())

    add(items)
    return h.hexdigest()


def warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside this package."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the frame that called warn
    while frame is not None and frame.f_globals.get("__name__", "").startswith("natural_tangents"):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)


# ---------------------------------------------------------------------------------------- paths
def _beside(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def partial_path(out: Path) -> Path:
    return _beside(out, ".partial")


def _journal_path(out: Path, rank: int) -> Path:
    return _beside(out, ".journal" if rank == 0 else f".journal.{rank}")


def _journals(out: Path) -> list[Path]:
    others = [p for p in out.parent.glob(out.name + ".journal.*") if p.name.rsplit(".", 1)[-1].isdigit()]
    first = _journal_path(out, 0)
    return ([first] if first.exists() else []) + sorted(others)


def _datasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


# ----------------------------------------------------------------------------------------- lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _owner(text: str) -> tuple[int, str] | None:
    """(pid, host) from a lock file's ``pid <pid> host <host>`` line, or None."""
    words = text.split()
    if len(words) == 4 and words[0] == "pid" and words[1].isdigit() and words[2] == "host":
        return int(words[1]), words[3]
    return None


def _busy(out: Path, lock: Path, owner: tuple[int, str] | None) -> str:
    who = f"names process {owner[0]} on {owner[1]}" if owner else "exists"
    return (
        f"out: {out} is being written by another run (its lock file {lock} {who}); wait for that run, "
        f"choose another path, or delete {lock} if that run has died"
    )


class Lock:
    """The lock file of ``out``, held (``flock``) from :meth:`take` to :meth:`release`."""

    def __init__(self, path: Path, fd: int, note: str | None):
        self.path, self.fd, self.note = path, fd, note

    @classmethod
    def take(cls, out: Path) -> Lock:
        """Create the lock, or take over one whose process on this host has died (``note`` says so).

        Raises:
            FileExistsError: another run holds the lock (or it cannot be shown to be dead).
            OSError: the lock cannot be created (a missing or read-only folder)."""
        path = _beside(out, ".lock")
        for _ in range(5):  # a lock released between our open and our flock: try again
            fresh = True
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                fresh = False
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError:
                    continue
                except OSError as err:
                    raise FileExistsError(f"{_busy(out, path, None)} ({err.strerror})") from None
            except OSError as err:
                raise OSError(
                    f"out: cannot create {path} ({err.strerror}); check that the folder {out.parent} exists "
                    "and is writable"
                ) from None
            owner = None if fresh else _owner(os.pread(fd, 256, 0).decode(errors="replace"))
            try:  # a new lock: wait out a run that is looking at it (it lets go at once, as it is empty)
                fcntl.flock(fd, fcntl.LOCK_EX if fresh else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise FileExistsError(_busy(out, path, owner)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            note = None
            if not fresh:
                owner = _owner(os.pread(fd, 256, 0).decode(errors="replace"))  # read again under the flock
                if owner is None or owner[1] != HOST or _alive(owner[0]):
                    os.close(fd)
                    raise FileExistsError(_busy(out, path, owner))
                note = f"out: took over the lock {path} of process {owner[0]}, which is no longer running on this host"
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} host {HOST}\n".encode(), 0)
            return cls(path, fd, note)
        raise FileExistsError(_busy(out, path, None))

    def release(self) -> None:
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)  # while holding the flock, then let go of it
            os.close(self.fd)
            self.fd = -1


# -------------------------------------------------------------------------------------- journal
@dataclass(frozen=True)
class Layout:
    """What a journal is checked against: the file's shape and dtype, the tiles, and ``inputs``, a
    fingerprint of the caller's ``signature`` (None: none given, a run that cannot be resumed)."""

    shape: tuple[int, ...]
    dtype: str
    batch_size: int
    symmetric: bool
    tiles: int
    inputs: str | None

    def header(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)})

    def differences(self, head: dict) -> list[str]:
        """What differs between this run and the one whose journal header is ``head``."""
        mine = json.loads(self.header())
        labels = {"shape": "shape", "dtype": "dtype", "batch_size": "batch_size (the tile side)"}
        found = [f"{name} {head.get(k)} there, {mine[k]} here" for k, name in labels.items() if head.get(k) != mine[k]]
        if head.get("symmetric") != mine["symmetric"]:
            found.append("a symmetric kernel (x2 omitted) in one run only")
        if head.get("inputs") != mine["inputs"] and not found:
            found.append("other inputs or settings (data, model or architecture)")
        return found


def _read(path: Path) -> tuple[dict | None, set[int]]:
    """A journal's header (None if unreadable) and its recorded tiles (a torn last line is ignored)."""
    try:
        lines = path.read_text(errors="replace").split("\n")
        head = json.loads(lines[0])
    except (OSError, ValueError):
        return None, set()
    if not isinstance(head, dict) or head.get("format") != FORMAT or not isinstance(head.get("tiles"), int):
        return None, set()
    return head, {int(s) for s in lines[1:-1] if s.isdigit() and int(s) < head["tiles"]}


def recorded(out: Path) -> set[int]:
    """The tiles that the journals of an unfinished run into ``out`` record (empty: none)."""
    done: set[int] = set()
    if partial_path(out).exists():
        for path in _journals(out):
            done |= _read(path)[1]
    return done


def _write_journal(out: Path, layout: Layout, done: set[int]) -> None:
    """Rank 0's journal with ``done``, replacing every journal of ``out`` (written aside, then renamed)."""
    new = _beside(out, ".journal-new")
    with open(new, "w") as f:
        f.write(layout.header() + "\n" + "".join(f"{i}\n" for i in sorted(done)))
        f.flush()
        os.fsync(f.fileno())
    first = _journal_path(out, 0)
    for path in _journals(out):
        if path != first:
            path.unlink(missing_ok=True)
    os.replace(new, first)


def _resumable(out: Path, layout: Layout, overwrite: bool) -> set[int] | None:
    """The tiles an interrupted run into ``out`` with this layout finished, or None (start afresh).

    Raises FileExistsError for a run of other arguments unless ``overwrite``."""
    partial, journals = partial_path(out), _journals(out)
    if not (journals and partial.exists()):
        return None
    read = [_read(p) for p in journals]
    heads = [head for head, _ in read if head is not None]
    differences = sorted({d for head in heads for d in layout.differences(head)})
    if differences and not overwrite:
        raise FileExistsError(
            f"out: {out} has an unfinished run in {partial} with other arguments ({'; '.join(differences)}); "
            "re-run with that run's arguments to resume it, or pass overwrite=True to discard it and start afresh"
        )
    if differences or not heads:
        return None
    if layout.inputs is None:
        warn(f"out: discarding the unfinished run in {partial}: without a signature of the inputs it cannot be resumed")
        return None
    try:
        data = np.load(partial, mmap_mode="r")
        whole = tuple(data.shape) == layout.shape and str(data.dtype) == layout.dtype
        del data
    except (OSError, ValueError):
        whole = False
    if not whole:
        return None
    return set().union(*(done for head, done in read if head is not None))


def prepare(out: Path, layout: Layout, overwrite: bool) -> set[int]:
    """Rank 0, holding the lock: the tiles already finished by an interrupted run of the same
    arguments (its journals merged into rank 0's), or a fresh ``.partial`` file and journal.

    Raises:
        FileExistsError: ``out`` exists and not ``overwrite``; or an unfinished run of other
            arguments, and not ``overwrite``.
        OSError: the file cannot be created."""
    if out.is_dir():
        raise IsADirectoryError(f"out: {out} is a folder; pass a path ending in a file name such as ntk.npy")
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"out: {out} exists; pass overwrite=True to replace it (when the new kernel is complete), "
            "or choose another path"
        )
    done = _resumable(out, layout, overwrite)
    if done is not None:
        _write_journal(out, layout, done)
        warn(f"out: resuming the interrupted run in {partial_path(out)}: {len(done)} of {layout.tiles} tiles were done")
        return done
    partial = partial_path(out)
    for path in _journals(out):
        path.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    try:
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.dtype(layout.dtype), shape=layout.shape)
        del arr
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise OSError(
            f"out: cannot create {partial} ({err.strerror}); check the folder and the free disk space"
        ) from None
    _write_journal(out, layout, set())
    return set()


class Journal:
    """One rank's journal: :meth:`record` a stored tile; at the first tile, then at most every
    ``every`` seconds and at :meth:`close`, the data file is synced and the tiles appended."""

    def __init__(self, out: Path, rank: int, layout: Layout, data_fd: int, every: float):
        path = _journal_path(out, rank)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if rank else 0)
        self.fd = os.open(path, flags, 0o644)
        if rank:
            os.write(self.fd, (layout.header() + "\n").encode())
        self.data_fd, self.every = data_fd, float(every)
        self.pending: list[int] = []
        self.last = -math.inf  # the first tile is recorded at once

    def record(self, index: int) -> None:
        self.pending.append(index)
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        if batch:
            _datasync(self.data_fd)  # the data first: a recorded tile is on disk
            os.write(self.fd, "".join(f"{i}\n" for i in batch).encode())
        self.last = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self.fd)


def finish(out: Path) -> None:
    """Rank 0, after every rank synced its tiles: the ``.partial`` file becomes ``out`` (one rename),
    then the journals go."""
    os.replace(partial_path(out), out)
    try:
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself on disk
        finally:
            os.close(fd)
    except OSError:
        pass  # a filesystem without directory sync
    for path in _journals(out):
        path.unlink(missing_ok=True)
