"""Batched positive-definite systems on index subsets of one shared N × N matrix: the unit-wise
Fisher's support systems (``fisher/unitwise.py``).

Unit i of a layer solves, on its support S_i (the slots of ``idx[i]``),

    A_i z_i = c_i,   A_i = diag(t_i) K[S_i, S_i] diag(t_i) + ρ I,

for one shared symmetric K (N × N) and a positive scale t_i per slot. Padding slots (beyond the
unit's support) are identity rows that never couple, so a batch of units of similar support size is
one (u, m, m) tensor.

:func:`principal_submatrices` gathers the K[S_i, S_i] through one flat index (a quarter of the time
of two-dimensional advanced indexing, which builds an index tensor per dimension).

:func:`refined_solve` is the mixed-precision route for one right-hand side per unit: the batched
Cholesky factorization in float32 (two to three times the rate of float64 for systems of a few
hundred rows on a CPU, where LAPACK's small factorizations run far below matrix-product speed),
then iterative refinement with float64 residuals A_i z_i computed through K itself — all units'
products in one (u, N) × (N, N) matrix product — until each unit's normwise backward error
‖c_i − A_i z_i‖ / (‖A_i‖ ‖z_i‖ + ‖c_i‖) is at most m·eps of float64, the bound a float64 Cholesky
solve guarantees (‖A_i‖ replaced by its largest diagonal entry, a lower bound, so the check errs
towards rejecting). Units that are not certified (float32 breakdown, condition number near
1 / eps of float32) are reported, for the caller to solve in float64.

:func:`complement_solve` serves supports of more than half of the samples at ρ = 0: through
P = K^{-1} each unit factors only the block of P outside its support (the inverse of a Schur
complement), min(|S|, N − |S|)³ work instead of |S|³, refined and certified the same way.

:class:`ScratchPool` lends the batches reusable buffers for their (u, m, m) systems and factors.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = [
    "Scratch",
    "ScratchPool",
    "cholesky",
    "cholesky_solve",
    "complement_solve",
    "principal_submatrices",
    "refined_solve",
]

_REFINE_STEPS = 6


class Scratch:
    """One set of reusable buffers, for one thread at a time (see :class:`ScratchPool`)."""

    def __init__(self) -> None:
        self._buffers: dict = {}

    def get(self, key: str, shape: tuple[int, ...], like: Tensor, *, column_major: bool = False) -> Tensor:
        """An uninitialized tensor of ``shape`` with ``like``'s dtype and device, in buffer ``key``
        (valid until the next ``get`` of the same key); ``column_major``: batched column-major
        strides (what LAPACK writes in place)."""
        numel = math.prod(shape)
        buf = self._buffers.get((key, like.dtype, like.device))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel + numel // 4, dtype=like.dtype, device=like.device)  # room to grow
            self._buffers[(key, like.dtype, like.device)] = buf
        if column_major:
            return buf[:numel].view(*shape[:-2], shape[-1], shape[-2]).mT
        return buf[:numel].view(shape)


class ScratchPool:
    """Scratch buffers shared by the batched systems of one step, one set per concurrent job.

    A fresh tensor of tens of MiB per batch costs more in page faults (the allocator hands such
    blocks back to the system on every free) than the gather or the factorization that fills it, and
    the faults of two threads serialize in the kernel; a reused buffer costs nothing. Jobs take a set
    with :meth:`take` (at most one per worker thread is in use at a time), so the buffers outlive the
    worker threads of one layer and serve the next layer's."""

    def __init__(self) -> None:
        self._free: list[Scratch] = []
        self._lock = threading.Lock()

    @contextmanager
    def take(self) -> Iterator[Scratch]:
        with self._lock:
            scratch = self._free.pop() if self._free else Scratch()
        try:
            yield scratch
        finally:
            with self._lock:
                self._free.append(scratch)


def principal_submatrices(k: Tensor, idx: Tensor, work: Scratch | None = None, key: str = "sub") -> Tensor:
    """k[idx_i][:, idx_i] for every row idx_i of idx (u, m): (u, m, m), in ``work``'s buffer ``key``
    (a new tensor without one)."""
    u, m = idx.shape
    size = k.shape[-1]
    index_dtype = torch.int32 if k.numel() < 2**31 else torch.int64
    rows = idx.to(index_dtype)
    flat = ((rows * size)[:, :, None] + rows[:, None, :]).view(-1)
    if work is None:
        return k.reshape(-1).index_select(0, flat).view(u, m, m)
    out = work.get(key, (u, m, m), k)
    torch.index_select(k.reshape(-1), 0, flat, out=out.view(-1))
    return out


def cholesky(a: Tensor, work: Scratch | None = None, key: str = "chol") -> tuple[Tensor, Tensor]:
    """torch.linalg.cholesky_ex of the batch of symmetric matrices ``a``, written into ``work``'s
    buffer ``key``. The factorization reads a^T (the same matrix) so that the copy into LAPACK's
    column-major layout is a plain one, not a transposition."""
    if work is None:
        return torch.linalg.cholesky_ex(a.mT)
    out = work.get(key, tuple(a.shape), a, column_major=True)
    info = torch.empty(a.shape[:-2], dtype=torch.int32, device=a.device)
    return torch.linalg.cholesky_ex(a.mT, out=(out, info))


def cholesky_solve(chol: Tensor, b: Tensor) -> Tensor:
    """(L L^T)^{-1} b by two triangular solves (no copy of the batch of factors)."""
    return torch.linalg.solve_triangular(chol.mT, torch.linalg.solve_triangular(chol, b, upper=False), upper=True)


def refined_solve(
    k: Tensor,
    k_low: Tensor,
    idx: Tensor,
    sub_idx: Tensor,
    valid: Tensor,
    t: Tensor | None,
    damping: float,
    c: Tensor,
    work: Scratch | None = None,
) -> tuple[Tensor, Tensor]:
    """The support systems A_i z_i = c_i, factored in ``k_low``'s precision and refined in ``k``'s.

    Args:
        k: K (N, N), float64.
        k_low: K ⊕ I in float32, (N + p, N + p) with p ≥ the padding of any unit.
        idx: (u, m) sample of each slot; padding slots hold distinct samples outside the support
            (where z = 0).
        sub_idx: (u, m) row of ``k_low`` for each slot (padding slots point into the identity).
        valid: (u, m) bool, the support slots.
        t: (u, m) scale of each slot (None: 1), positive on the support.
        damping: ρ ≥ 0.
        c: (u, m) float64 right-hand sides, zero on padding.
        work: scratch buffers for the (u, m, m) systems and factors.

    Returns:
        z (u, m) float64, zero on padding, and certified (u,) bool: the units whose backward error
        meets the float64 bound; the others' z is not to be used.
    """
    sub = principal_submatrices(k_low, sub_idx, work)
    if t is not None:
        tl = t.to(sub.dtype) * valid + (~valid)
        sub.mul_(tl[:, :, None] * tl[:, None, :])
    if damping:
        sub.diagonal(dim1=1, dim2=2).add_(damping)
    chol, info = cholesky(sub, work)
    del sub
    mask = valid.to(c.dtype)

    def approx(r: Tensor) -> Tensor:
        return cholesky_solve(chol, r.to(chol.dtype)[:, :, None])[:, :, 0].to(c.dtype) * mask

    return _refine(k, idx, valid, t, damping, c, approx, info == 0)


def complement_solve(
    k: Tensor,
    p_ext: Tensor,
    idx: Tensor,
    valid: Tensor,
    out_idx: Tensor,
    out_valid: Tensor,
    c: Tensor,
    work: Scratch | None = None,
) -> tuple[Tensor, Tensor]:
    """K[S_i, S_i]^{-1} c_i for supports S_i larger than half of the N samples, through P = K^{-1}
    (N × N, shared): with S̄_i the samples outside the support,

        K[S, S]^{-1} = P[S, S] − P[S, S̄] P[S̄, S̄]^{-1} P[S̄, S]

    (the inverse of a Schur complement), so each unit factors only its |S̄_i| × |S̄_i| block of P, and
    the products with P are two (u, N) × (N, N) matrix products for all units. The result is refined
    with float64 residuals and certified as in :func:`refined_solve`.

    Args:
        k: K (N, N), float64, positive definite.
        p_ext: P ⊕ I, (N + q, N + q), float64.
        idx, valid: (u, m) support slots, as in :func:`refined_solve`.
        out_idx: (u, q) samples outside each support first; ``out_valid`` (u, q) marks them (slots
            beyond point into ``p_ext``'s identity for the factorization and carry zeros).
        c: (u, m) right-hand sides, zero on padding.
        work: scratch buffers for the (u, q, q) blocks and factors.
    """
    n = k.shape[0]
    u, q = out_idx.shape
    slot = torch.arange(q, device=out_idx.device)[None, :]
    sub = principal_submatrices(p_ext, torch.where(out_valid, out_idx, n + slot), work)
    chol, info = cholesky(sub, work)
    del sub
    p = p_ext[:n, :n]
    mask, out_mask = valid.to(c.dtype), out_valid.to(c.dtype)
    dense = torch.zeros(u, n, dtype=c.dtype, device=c.device)

    def approx(r: Tensor) -> Tensor:
        g = dense.zero_().scatter_(1, idx, r * mask) @ p
        y = cholesky_solve(chol, (torch.gather(g, 1, out_idx) * out_mask)[:, :, None])[:, :, 0]
        g.sub_(dense.zero_().scatter_(1, out_idx, y * out_mask) @ p)
        return torch.gather(g, 1, idx) * mask

    return _refine(k, idx, valid, None, 0.0, c, approx, info == 0)


def _refine(k, idx, valid, t, damping, c, approx, factored) -> tuple[Tensor, Tensor]:
    """Iterative refinement of ``approx`` (an approximate inverse of every A_i, applied to (u, m))
    with float64 residuals through K, until each unit's backward error is certified."""
    u, m = idx.shape
    mask = valid.to(c.dtype)
    kd = torch.diagonal(k)[idx]
    a_diag = kd if t is None else kd * t * t
    a_norm = (a_diag * mask).amax(1) + damping  # the largest diagonal entry, ≤ ‖A_i‖
    c_norm = c.norm(dim=1)
    bound = m * torch.finfo(c.dtype).eps
    dense = torch.zeros(u, k.shape[0], dtype=c.dtype, device=c.device)
    z = approx(c)
    for step in range(_REFINE_STEPS + 1):
        tz = z if t is None else z * t
        dense.zero_().scatter_(1, idx, tz * mask)
        az = torch.gather(dense @ k, 1, idx)
        if t is not None:
            az.mul_(t)
        if damping:
            az.add_(z, alpha=damping)
        res = (c - az) * mask
        res_norm = res.norm(dim=1)
        eta = torch.where(res_norm == 0, 0.0, res_norm / (a_norm * z.norm(dim=1) + c_norm))
        certified = factored & (eta <= bound)
        if step == _REFINE_STEPS or bool((certified | ~factored).all()):
            break
        z = torch.where(certified[:, None], z, z + approx(res))
    return z, certified
