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

:func:`primal_solve` serves ρ = 0 supports larger than rank K, where K[S, S] is singular: the
weighted r × r normal equations on a basis of K's range, refined and certified the same way.

:func:`cg_solve` is the damped update's shared-K route: conjugate gradients for all units of a
layer at once, with the same certificate.

:func:`cholesky` factors the batches with LAPACK from SciPy, called without the GIL so that worker
threads factor concurrently; :func:`factored` refuses factors with rounding-level pivots.
:class:`ScratchPool` lends the batches reusable buffers for their (u, m, m) systems and factors.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .._parallel import SCIPY_BLAS_PER_THREAD

__all__ = [
    "Scratch",
    "ScratchPool",
    "cg_solve",
    "cholesky",
    "cholesky_solve",
    "complement_solve",
    "factored",
    "primal_solve",
    "principal_submatrices",
    "refined_solve",
]

_REFINE_STEPS = 6
_LAPACK_MAX = 2048  # SciPy's LAPACK factors the CPU systems up to this size (torch beyond)


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


def _buffer(work: Scratch | None, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``work``'s buffer ``key`` of ``shape`` (see :meth:`Scratch.get`), or a new tensor without one;
    either with ``like``'s dtype and device."""
    return work.get(key, shape, like) if work is not None else like.new_empty(shape)


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


def cholesky(
    a: Tensor, work: Scratch | None = None, key: str = "chol", *, overwrite: bool = False
) -> tuple[Tensor, Tensor]:
    """Cholesky factors L of a batch of symmetric matrices (..., m, m), and info (...,) (0: success).

    Only L's lower triangle is meaningful: the upper one may hold what was there before (the
    triangular solves never read it). On the CPU each matrix is factored by LAPACK's ``potrf``
    from SciPy, in place in ``work``'s buffer ``key`` (or in ``a`` itself with ``overwrite``),
    called through ctypes so that the worker threads factor concurrently (no GIL): for systems of
    a few hundred rows this runs at two to three times the rate of torch's batched factorization,
    which also copies every matrix into and out of LAPACK's layout. A row-major symmetric matrix is
    its own column-major transpose, so LAPACK works on the buffer as it is and leaves L^T in its
    upper triangle, returned as a transposed view. Elsewhere: ``torch.linalg.cholesky_ex``."""
    m = a.shape[-1]
    potrf = _POTRF.get(a.dtype) if a.device.type == "cpu" and 0 < m <= _LAPACK_MAX else None
    if potrf is None or a.requires_grad:
        return torch.linalg.cholesky_ex(a.mT)
    if overwrite and a.is_contiguous():
        buf = a
    else:
        buf = _buffer(work, key, tuple(a.shape), a)
        buf.copy_(a)
    size, status = ctypes.c_int(m), ctypes.c_int(0)
    base, stride = buf.data_ptr(), m * m * buf.element_size()
    info = []  # a Python list: a tensor item assignment per matrix costs more than a small factorization
    for i in range(buf.numel() // (m * m)):
        potrf(b"L", ctypes.byref(size), ctypes.c_void_p(base + i * stride), ctypes.byref(size), ctypes.byref(status))
        info.append(status.value)
    return buf.mT, torch.tensor(info, dtype=torch.int32).reshape(a.shape[:-2])


def _lapack_potrf() -> dict:
    """{dtype: potrf} from SciPy's Cython LAPACK as ctypes functions (which release the GIL while
    they run); empty where SciPy does not expose them (then torch factors)."""
    try:
        from scipy.linalg import cython_lapack

        capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
        capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
            ("PyCapsule_GetPointer", ctypes.pythonapi)
        )
        ref = ctypes.POINTER(ctypes.c_int)
        signature = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ref, ctypes.c_void_p, ref, ref)
        out = {}
        for dtype, name in ((torch.float32, "spotrf"), (torch.float64, "dpotrf")):
            capsule = cython_lapack.__pyx_capi__[name]
            out[dtype] = signature(capsule_pointer(capsule, capsule_name(capsule)))
        return out
    except Exception:  # any failure leaves the factorization to torch
        return {}


def factored(chol: Tensor, info: Tensor) -> Tensor:
    """(batch,) bool: the factorization succeeded and no pivot is negligible, L_jj² > m·eps·max_k L_kk².

    A singular matrix (duplicate samples, a support larger than the rank) can factor in floating
    point with pivots at rounding level, and its "solution" is then noise of size 1/eps; since
    L_jj² ≥ λ_min, such a pivot shows that λ_min lies below the pseudo-inverse's cut-off."""
    d = torch.diagonal(chol, dim1=-2, dim2=-1).square()
    return (info == 0) & (d.amin(-1) > d.shape[-1] * torch.finfo(d.dtype).eps * d.amax(-1))


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
    chol, info = cholesky(sub, work, overwrite=True)
    del sub
    mask = valid.to(c.dtype)

    def approx(r: Tensor) -> Tensor:
        return cholesky_solve(chol, r.to(chol.dtype)[:, :, None])[:, :, 0].to(c.dtype) * mask

    apply, a_norm = _support_product(k, idx, valid, t, damping)
    return _refine(apply, approx, c, a_norm, info == 0 if damping else factored(chol, info), idx.shape[1])


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
    chol, info = cholesky(sub, work, overwrite=True)
    del sub
    p = p_ext[:n, :n]
    mask, out_mask = valid.to(c.dtype), out_valid.to(c.dtype)
    dense = torch.zeros(u, n, dtype=c.dtype, device=c.device)

    def approx(r: Tensor) -> Tensor:
        g = dense.zero_().scatter_(1, idx, r * mask) @ p
        y = cholesky_solve(chol, (torch.gather(g, 1, out_idx) * out_mask)[:, :, None])[:, :, 0]
        g.sub_(dense.zero_().scatter_(1, out_idx, y * out_mask) @ p)
        return torch.gather(g, 1, idx) * mask

    apply, a_norm = _support_product(k, idx, valid, None, 0.0)
    return _refine(apply, approx, c, a_norm, info == 0, idx.shape[1])


def primal_solve(
    x: Tensor,
    x_low: Tensor | None,
    idx: Tensor,
    scale: Tensor,
    g: Tensor,
    work: Scratch | None = None,
) -> tuple[Tensor, Tensor]:
    """Weighted normal equations on row subsets of one shared basis, G_i φ_i = g_i with

        G_i = Σ_{n ∈ S_i} t_{i,n}² x_n x_n^T   (r × r),

    for supports larger than r, where the dual systems of :func:`refined_solve` are singular.
    The Grams are batched products of the gathered, scaled rows (u, m, r), r²·|S_i| work per unit.

    Args:
        x: (N, r) the shared rows x_n (columns orthonormal keeps G_i as well conditioned as the
            data allow).
        x_low: x in float32: factor in float32 and refine with residuals in x's precision (one
            right-hand side) to the certified backward error of :func:`refined_solve`; None: one
            Cholesky factorization in x's precision.
        idx: (u, m) each unit's samples (support first; the rest carry t = 0).
        scale: (u, m) t_{i,n}, zero off the support.
        g: (u, r, R) right-hand sides (R = 1 to refine).
        work: scratch buffers for the (u, m, r) rows and the (u, r, r) Grams and factors.

    Returns:
        φ (u, r, R) and certified (u,) bool: factored (and, refined, within the backward-error
        bound); the others' φ is not to be used.
    """
    low = x if x_low is None else x_low
    u, m = idx.shape
    r = x.shape[1]
    rows = _buffer(work, "rows", (u, m, r), low)
    torch.index_select(low, 0, idx.reshape(-1), out=rows.view(u * m, r))
    rows.mul_(scale.to(low.dtype)[:, :, None])
    gram = _buffer(work, "gram", (u, r, r), low)
    torch.bmm(rows.mT, rows, out=gram)
    del rows
    chol, info = cholesky(gram, work, overwrite=True)
    ok = factored(chol, info)
    if x_low is None:
        return cholesky_solve(chol, g.to(chol.dtype)).to(g.dtype), ok
    weight = torch.zeros(u, x.shape[0], dtype=x.dtype, device=x.device).scatter_(1, idx, scale.to(x.dtype) ** 2)

    def apply(phi: Tensor) -> Tensor:  # G_i φ_i through x: two (u, N)-sized products for all units
        return ((phi @ x.T) * weight) @ x

    def approx(res: Tensor) -> Tensor:
        return cholesky_solve(chol, res.to(chol.dtype)[:, :, None])[:, :, 0].to(x.dtype)

    a_norm = (weight @ (x * x)).amax(1)  # the largest diagonal entry of G_i
    phi, ok = _refine(apply, approx, g[:, :, 0], a_norm, ok, r)
    return phi[:, :, None], ok


def _support_product(k: Tensor, idx: Tensor, valid: Tensor, t: Tensor | None, damping: float):
    """z ↦ A_i z_i for every unit (u, m), A_i = diag(t_i) K[S_i, S_i] diag(t_i) + ρ I, in K's
    precision: one (u, N) × (N, N) product for all units (zero on padding)."""
    mask = valid.to(k.dtype)
    dense = torch.zeros(idx.shape[0], k.shape[0], dtype=k.dtype, device=k.device)

    def apply(z: Tensor) -> Tensor:
        tz = z if t is None else z * t
        az = torch.gather(dense.zero_().scatter_(1, idx, tz * mask) @ k, 1, idx)
        if t is not None:
            az.mul_(t)
        if damping:
            az.add_(z, alpha=damping)
        return az * mask

    kd = torch.diagonal(k)[idx]
    a_diag = kd if t is None else kd * t * t
    return apply, (a_diag * mask).amax(1) + damping  # and the largest diagonal entries, ≤ ‖A_i‖


def _refine(apply, approx, c: Tensor, a_norm: Tensor, factored: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Iterative refinement of ``approx`` (an approximate inverse of every A_i, applied to (u, m))
    with residuals c − ``apply``(z) in c's precision, until each unit's normwise backward error
    ‖c_i − A_i z_i‖ / (‖A_i‖ ‖z_i‖ + ‖c_i‖) is at most size·eps (``a_norm`` ≤ ‖A_i‖)."""
    c_norm = c.norm(dim=1)
    bound = size * torch.finfo(c.dtype).eps
    z = approx(c)
    for step in range(_REFINE_STEPS + 1):
        res = c - apply(z)
        res_norm = res.norm(dim=1)
        eta = torch.where(res_norm == 0, 0.0, res_norm / (a_norm * z.norm(dim=1) + c_norm))
        certified = factored & (eta <= bound)
        if step == _REFINE_STEPS or bool((certified | ~factored).all()):
            break
        z = torch.where(certified[:, None], z, z + approx(res))
    return z, certified


def cg_solve(
    k: Tensor,
    s: Tensor,
    b: Tensor,
    damping: float,
    *,
    tol: float,
    maxiter: int,
    certify: bool,
    fallback: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """The unit-wise update's systems by conjugate gradients, all units of a layer at once.

    Unit i solves A_i z_i = c_i with A_i = S_i K S_i / N + ρ and c_i = b_i / s_i (0 where
    s_i = 0), and w_i = s_i z_i, as the direct route; every iteration applies all the layer's
    systems with one (U, N) × (N, N) product, Jacobi-preconditioned (diagonal s_n² K_nn / N + ρ).
    Without ``certify`` a unit stops at residual ≤ ``tol`` ‖c_i‖; with it, it stops at a tenth of
    the backward-error bound N·eps (‖A_i‖ ‖z_i‖ + ‖c_i‖), and is kept only if its true residual,
    recomputed at the end, meets the bound. The units left (not converged in ``maxiter``
    iterations, or not certified) go to ``fallback(s, b)``. s, b: (M, N). Returns w (M, N)."""
    n, rho = k.shape[0], damping
    bound = n * torch.finfo(k.dtype).eps
    kn = k / n

    def apply(scale: Tensor, v: Tensor) -> Tensor:  # A_i v_i for every row
        return torch.mm(scale * v, kn).mul_(scale).add_(v, alpha=rho)

    def diagonal(scale: Tensor) -> Tensor:  # the diagonals of the A_i, (rows, N)
        return (scale * scale).mul_(torch.diagonal(kn)).add_(rho)

    def rhs(rows: Tensor) -> Tensor:
        su = s[rows]
        return torch.where(su > 0, b[rows] / torch.where(su > 0, su, 1.0), 0.0)

    z = torch.zeros_like(b)
    rows = torch.nonzero((b != 0).any(1) & (s > 0).any(1))[:, 0]  # units still iterating
    su, res = s[rows], rhs(rows)
    dinv = diagonal(su).reciprocal_()
    c_norm = res.norm(dim=1)
    a_norm = 1.0 / dinv.amin(1)  # the largest diagonal entry of A_i, ≤ ‖A_i‖
    p = dinv * res
    rz, x = (res * p).sum(1), torch.zeros_like(res)
    converged = []
    for _ in range(maxiter):
        if len(rows) == 0:
            break
        q = apply(su, p)
        alpha = (rz / (p * q).sum(1))[:, None]
        x.addcmul_(p, alpha)
        res.addcmul_(q, alpha, value=-1.0)
        del q
        if certify:
            done = res.norm(dim=1) <= 0.1 * bound * (a_norm * x.norm(dim=1) + c_norm)
        else:
            done = res.norm(dim=1) <= tol * c_norm
        if bool(done.any()):
            z[rows[done]] = x[done]
            converged.append(rows[done])
            keep = ~done
            kept = (t[keep] for t in (rows, su, res, x, p, rz, dinv, c_norm, a_norm))
            rows, su, res, x, p, rz, dinv, c_norm, a_norm = kept
        y = dinv * res
        rz_new = (res * y).sum(1)
        p = p.mul_((rz_new / rz)[:, None]).add_(y)
        rz = rz_new
        del y
    left = [rows]
    if certify and converged:  # the true residuals of the accepted units
        acc = torch.cat(converged)
        su, c, za = s[acc], rhs(acc), z[acc]
        a_acc = diagonal(su).amax(1)
        eta = (c - apply(su, za)).norm(dim=1) / (a_acc * za.norm(dim=1) + c.norm(dim=1))
        left.append(acc[~(eta <= bound)])
    w = z.mul_(s)
    rows = torch.cat(left)
    if len(rows):  # not converged or not certified: the direct route
        w[rows] = fallback(s[rows], b[rows])
    return w


# SciPy's LAPACK only where the worker threads can run it single-threaded: concurrent calls that
# each start OpenBLAS's own threads run slower than torch
_POTRF = _lapack_potrf() if SCIPY_BLAS_PER_THREAD else {}
