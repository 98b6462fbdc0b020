"""Batched Cholesky factorizations of many small systems, with LAPACK from SciPy, and the scratch
buffers they are factored in.

:func:`cholesky` factors a batch of symmetric matrices with LAPACK's ``potrf`` from SciPy, called
through ctypes without the GIL so that worker threads (:mod:`.threads`) factor concurrently; for
systems of a few hundred rows this runs at two to three times the rate of torch's batched
factorization. Elsewhere (no SciPy LAPACK, a GPU, autograd) it is ``torch.linalg.cholesky_ex``.
:func:`factored` refuses factors with rounding-level pivots. :class:`ScratchPool` lends the batches
reusable buffers.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .threads import SCIPY_BLAS_PER_THREAD

__all__ = ["Scratch", "ScratchPool", "buffer", "cholesky", "cholesky_solve", "factored", "has_lapack"]

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


def buffer(work: Scratch | None, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
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
        buf = buffer(work, key, tuple(a.shape), a)
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


# SciPy's LAPACK only where the worker threads can run it single-threaded: concurrent calls that
# each start OpenBLAS's own threads run slower than torch
_POTRF = _lapack_potrf() if SCIPY_BLAS_PER_THREAD else {}


def has_lapack() -> bool:
    """Whether :func:`cholesky` factors CPU batches with SciPy's LAPACK (else torch's)."""
    return bool(_POTRF)
