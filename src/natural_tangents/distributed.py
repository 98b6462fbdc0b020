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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "agree",
    "all_reduce_sum",
    "all_reduce_tensors",
    "check_group",
    "gather_batch",
    "gather_rows",
    "gather_signals",
    "rank_and_size",
]


def check_group(process_group) -> None:
    """Raise unless torch.distributed is initialized (``process_group`` is a group or ``dist.group.WORLD``)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group: torch.distributed is not initialized; call torch.distributed.init_process_group "
            "(torchrun sets up the environment) or pass process_group=None for one process"
        )
    if process_group is None:
        raise ValueError("process_group: expected a process group (e.g. torch.distributed.group.WORLD)")


def rank_and_size(process_group) -> tuple[int, int]:
    return dist.get_rank(process_group), dist.get_world_size(process_group)


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


def all_reduce_tensors(tensors: list[Tensor], group) -> list[Tensor]:
    """The sums over the ranks of several tensors of one dtype, by one all-reduce of their entries
    flattened into one buffer (the P update entries of a step travel together)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _gather_sizes(n: int, device, group) -> list[int]:
    _, world = rank_and_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [int(p) for p in parts]


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
