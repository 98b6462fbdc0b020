"""Data parallelism with torch.distributed: the batch sharded over the ranks of a process group.

Every rank holds the same parameters and its own shard of the batch (uneven sizes allowed; the batch
is the shards concatenated in rank order). The design (the dual form makes every N × N object a Gram
of per-sample signals):

* the ranks all-gather their layers' signals (O(N · Σ_l signal width) bytes, the activations that
  data-parallel training computes anyway), so every rank holds the whole batch's signals;
* each rank computes its own rows of every per-layer Gram against the whole batch (O(N_r N M)
  work) and the rows are all-gathered (O(N² L) bytes);
* the small N·C × N·C solves are replicated, so every rank holds the same dual vectors;
* each rank applies J_l^T to its own rows of the dual vectors and the parts are summed by an
  all-reduce (O(P) bytes, what data-parallel SGD sends).

The result is the natural gradient of the whole batch, the same on every rank. K-FAC and unit-wise
solve their factor and unit systems from the gathered signals on every rank. Any backend works
(gloo on CPU, NCCL on GPU), under torchrun or any launcher.

Before anything else the ranks compare a descriptor of their inputs (input shape beyond the sample
axis, whether the shard passed its checks) and a checksum of the parameters, and all refuse together,
with the same error, when they disagree — so a mismatched replica or shard fails at once instead of
hanging a collective.

Every process-group call of the package's kernels and command line lives here too: the one group
check (:func:`check_group`), the rank and size (:func:`rank_and_size`, also for ``None``: this
process alone), the backend's device (:func:`comm_device`), the tiling engine's agreement on its
arguments (:func:`agree_on`), rank 0's outcome shared with every rank (:func:`share_outcome`),
:func:`barrier`, the in-place sum of a kernel buffer (:func:`all_reduce_in_place`) and the group a
launcher such as torchrun sets up (:func:`launched_group`).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "agree",
    "agree_on",
    "all_reduce_in_place",
    "all_reduce_sum",
    "all_reduce_tensors",
    "mean_gradient",
    "whole_batch_mean",
    "barrier",
    "check_group",
    "comm_device",
    "gather_batch",
    "gather_rows",
    "gather_signals",
    "launched_group",
    "rank_and_size",
    "share_outcome",
]


# ---------------------------------------------------------------------------------- the group
def check_group(process_group) -> None:
    """Raise unless ``process_group`` (a group such as ``torch.distributed.group.WORLD``) can be used:
    torch.distributed is initialized in this process and this process is a member of the group.

    Raises:
        RuntimeError: torch.distributed is not initialized, or this process is not in the group.
        ValueError: ``process_group`` is None where a group is required.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group: torch.distributed is not initialized in this process; call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment), or pass "
            "process_group=None to compute in this process alone"
        )
    if process_group is None:
        raise ValueError("process_group: expected a process group (e.g. torch.distributed.group.WORLD)")
    if dist.get_rank(process_group) < 0:
        raise RuntimeError("process_group: this process is not a member of the group; pass a group it belongs to")


def rank_and_size(process_group) -> tuple[int, int]:
    """(rank, world size) of this process in ``process_group``; (0, 1) for None (this process alone).

    Raises:
        RuntimeError: as :func:`check_group`, for a group that cannot be used.
    """
    if process_group is None:
        return 0, 1
    check_group(process_group)
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def comm_device(process_group) -> torch.device:
    """The device the group's backend communicates from: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(process_group) -> None:
    """Wait until every rank of ``process_group`` arrives (nothing for None: this process alone)."""
    if process_group is not None:
        dist.barrier(group=process_group)


def _checksum(items: Sequence[object]) -> int:
    digest = hashlib.sha256(repr(tuple(items)).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def agree_on(items: Sequence[object], process_group, what: str = "the arguments") -> None:
    """Every rank checks that the ranks passed the same ``items`` and all raise together otherwise.

    The items are compared by a SHA-256 checksum of their ``repr`` (one all-gather of 8 bytes per
    rank), so they must print the same on equal inputs (pass a fingerprint of a tensor, not the
    tensor). Nothing is sent for None or a group of one rank.

    Args:
        items: what every rank must agree on (sizes, settings, a fingerprint of the data).
        process_group: the group, or None (this process alone).
        what: the items in words, for the error (e.g. "the sizes, batch_size, dtype and out").

    Raises:
        ValueError: on every rank, when any rank's items differ from rank 0's (the error names them).
    """
    _rank, world = rank_and_size(process_group)
    if world == 1:
        return
    mine = torch.tensor([_checksum(items)], dtype=torch.int64, device=comm_device(process_group))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=process_group)
    sums = [int(t) for t in every]
    if len(set(sums)) > 1:
        odd = [r for r, v in enumerate(sums) if v != sums[0]]
        raise ValueError(
            f"process_group: the ranks disagree on the arguments (ranks {odd} differ from rank 0 in {what}); "
            "call the function with the same arguments on every rank"
        )


_RAISED = {"FileExistsError": FileExistsError, "IsADirectoryError": IsADirectoryError, "ValueError": ValueError}


def share_outcome(process_group, error: BaseException | None, payload: object = None) -> object:
    """Rank 0's outcome on every rank: its ``error`` (or None) and its ``payload`` (a picklable object).

    A synchronization point: every rank waits for rank 0. A rank with an ``error`` of its own raises
    it; when rank 0 has one, every other rank raises an error of the same type (FileExistsError,
    IsADirectoryError, ValueError, else OSError) and message. Without an error every rank returns
    rank 0's ``payload`` (for None: this process alone, its own).
    """
    if process_group is not None:
        box = [None if error is None else (type(error).__name__, str(error)), payload]
        dist.broadcast_object_list(box, src=dist.get_global_rank(process_group, 0), group=process_group)
        if error is None and box[0] is not None:
            kind, message = box[0]
            raise _RAISED.get(kind, OSError)(message)
        payload = box[1]
    if error is not None:
        raise error
    return payload


@contextmanager
def launched_group(timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> Iterator[object]:
    """The WORLD group of a launcher such as torchrun (``WORLD_SIZE`` > 1 in the environment), else None.

    When torch.distributed is not initialized yet, it is here (NCCL with GPUs, each rank on the GPU
    ``LOCAL_RANK``; gloo otherwise; the launcher's environment gives the rendezvous) and the group is
    destroyed when the block ends; a group the caller initialized is used and left as it is::

        with launched_group() as group:
            k = nat.theory.ntk(x, out="ntk.npy", process_group=group)
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


# -------------------------------------------------------------------------------- collectives
def _all_gather_uneven(t: Tensor, sizes: list[int], group) -> list[Tensor]:
    """All-gather tensors whose first axes have the given per-rank ``sizes``."""
    big = max(sizes)
    pad = t.new_zeros((big - t.shape[0], *t.shape[1:]))
    buf = torch.cat([t.contiguous(), pad], 0)
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf, group=group)
    return [p[:s] for p, s in zip(parts, sizes)]


def gather_rows(t: Tensor, group, sizes: list[int] | None = None) -> Tensor:
    """Concatenate every rank's rows of ``t`` in rank order (all ranks receive the result)."""
    check_group(group)
    if sizes is None:
        sizes = _gather_sizes(t.shape[0], t.device, group)
    return torch.cat(_all_gather_uneven(t, sizes, group), 0)


def all_reduce_sum(t: Tensor, group) -> Tensor:
    """The sum over the ranks of ``t`` (a contiguous copy; every rank receives the same values)."""
    out = t.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def all_reduce_in_place(t: Tensor, process_group) -> Tensor:
    """Sum a contiguous ``t`` over the ranks in place and return it (every rank receives the same
    values), through the backend's device (:func:`comm_device`) when ``t`` lives elsewhere: a
    kernel buffer in CPU memory under NCCL is copied to the GPU and back."""
    moved = t.to(comm_device(process_group))
    dist.all_reduce(moved, group=process_group)
    if moved is not t:
        t.copy_(moved)
    return t


def all_reduce_tensors(tensors: list[Tensor], group) -> list[Tensor]:
    """The sums over the ranks of several tensors of one dtype, by one all-reduce of their entries
    flattened into one buffer (the P update entries of a step travel together)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def mean_gradient(grads: list[Tensor], n_local: int, group) -> list[Tensor]:
    """The whole batch's mean gradient from each rank's mean over its own N_r samples: one all-reduce
    of the shards' sums N_r ∇L_r and sizes N_r, then ÷ N (what data-parallel SGD sends)."""
    flat = torch.cat([*(g.reshape(-1) * n_local for g in grads), grads[0].new_tensor([float(n_local)])])
    dist.all_reduce(flat, group=group)
    parts = flat[:-1].div_(flat[-1]).split([g.numel() for g in grads])
    return [v.view_as(g) for v, g in zip(parts, grads)]


def whole_batch_mean(value: float, n_local: int, group) -> float:
    """The mean over the whole batch of a per-sample average ``value`` over this rank's N_r samples."""
    if group is None:
        return value
    buf = torch.tensor([value * n_local, float(n_local)], dtype=torch.float64)
    all_reduce_in_place(buf, group)
    return float(buf[0] / buf[1])


def _gather_sizes(n: int, device, group) -> list[int]:
    _, world = rank_and_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [int(p) for p in parts]


# ---------------------------------------------------------------------------------- the batch
def _param_checksum(model) -> list[float]:
    total, weighted = 0.0, 0.0
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            v = p.detach().to(torch.float64)
            total += float(v.sum())
            weighted += float((v.abs() * (i + 1)).sum())
    return [total, weighted]


def agree(model, x, group, error: Exception | None = None) -> None:
    """All ranks check that their inputs and replicas agree, and raise together otherwise.

    Compares the shape of x beyond the sample axis, the parameter count and a checksum of the
    parameters (relative 1e-12). ``error`` is this rank's own failure on its shard, if any: then that
    rank re-raises it and the others raise an error naming the rank."""
    check_group(group)
    _rank, world = rank_and_size(group)
    p0 = next(model.parameters())
    shape = tuple(x.shape[1:]) if isinstance(x, Tensor) else ()
    desc = [float(len(shape)), *map(float, shape), *([0.0] * (8 - len(shape)))][:9]
    desc += [float(sum(p.numel() for p in model.parameters())), *_param_checksum(model), float(error is not None)]
    mine = torch.tensor(desc, dtype=torch.float64, device=p0.device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    failed = [r for r, d in enumerate(parts) if d[12] != 0]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"process_group: rank {failed[0]} could not compute the signals of its shard (see its error)")
    ref = parts[0]
    for r, d in enumerate(parts):
        if not torch.equal(d[:10], ref[:10]):
            if torch.equal(d[:9], ref[:9]):
                what = f"parameter count ({int(d[9])} vs {int(ref[9])})"
            else:
                what = f"input shape beyond the sample axis ({_shape(d)} vs {_shape(ref)})"
            raise ValueError(
                f"process_group: rank {r} has a different {what} than rank 0; every rank must hold the "
                "same model and shards of the same kind of data"
            )
        scale = ref[10:12].abs().clamp_min(1.0)
        if bool(((d[10:12] - ref[10:12]).abs() > 1e-12 * scale).any()):
            raise ValueError(
                f"process_group: the parameters on rank {r} differ from rank 0's; the replicas must be identical "
                "(broadcast them from rank 0 first, e.g. torch.distributed.broadcast on every parameter)"
            )


def _shape(desc: Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in desc[1 : 1 + int(desc[0])])


def gather_signals(local, model, group):
    """The whole batch's signals on every rank, and this rank's offset in it.

    ``local`` is this rank's :class:`~natural_tangents.signals.Signals`."""
    from .signals import Signals

    rank, _ = rank_and_size(group)
    sizes = _gather_sizes(local.n, local.f.device, group)
    cs = gather_rows(torch.tensor([[local.c]], device=local.f.device), group, [1] * len(sizes))
    if bool((cs != local.c).any()):
        raise ValueError(
            f"process_group: the ranks' models have different output counts C ({[int(c) for c in cs[:, 0]]}); "
            "every rank must hold the same model"
        )
    f = gather_rows(local.f, group, sizes)
    layers = []
    for layer in local.layers:
        tensors = [gather_rows(t, group, sizes) for t in layer.tensors()]
        layers.append(layer.with_tensors(tensors))
    return Signals(f=f, layers=tuple(layers), frozen_output=local.frozen_output), sum(sizes[:rank])


def gather_batch(model, x, group, read):
    """This rank's signals of its shard ``x`` (``read(model, x)``), the whole batch's on every rank,
    and this rank's offset in it. The ranks first agree (:func:`agree`): a rank whose shard cannot be
    read re-raises its error and the others name it, so that no collective is left hanging."""
    check_group(group)
    local, error = None, None
    try:
        local = read(model, x)
    except (ValueError, TypeError, NotImplementedError, RuntimeError, FloatingPointError) as err:
        error = err
    agree(model, x, group, error)
    full, offset = gather_signals(local, model, group)
    return local, full, offset
