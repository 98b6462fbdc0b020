"""Symmetric positive semi-definite systems: damped inverses, the zero-damping pseudo-inverse, and
:class:`PSDInverse`, the one object every Fisher factors its systems into.

``damping = 0`` means the limit ρ → 0⁺, which is the Moore–Penrose pseudo-inverse (the paper's
(S.90), (S.135)): by Cholesky when the matrix is provably far from singular (then A^{-1} = A^+), by
an eigendecomposition with the cut-off n·eps·λ_max otherwise.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PSDInverse",
    "cholesky_if_nonsingular",
    "cholesky_pd",
    "damped_cholesky",
    "inverse_psd",
    "not_positive_definite",
    "pinv_psd",
    "solve_psd",
]


def pinv_psd(a: Tensor) -> Tensor:
    """Moore–Penrose pseudo-inverse of a symmetric PSD matrix (or batch), by eigh with the usual
    cut-off n·eps·λ_max. This is the ρ → 0⁺ limit of (A + ρI)^{-1} restricted to the range of A."""
    a = 0.5 * (a + a.mT)
    ev, vec = torch.linalg.eigh(a)
    cut = ev.shape[-1] * torch.finfo(a.dtype).eps * ev.abs().amax(-1, keepdim=True)
    inv = torch.where(ev > cut, 1.0 / ev, torch.zeros_like(ev))
    return (vec * inv.unsqueeze(-2)) @ vec.mT


def not_positive_definite(m: Tensor | None = None, chol: Tensor | None = None) -> ArithmeticError | ValueError:
    """The error for a damped system ``m`` that failed to factor: FloatingPointError when it (or its
    attempted factor ``chol``) holds NaN or inf entries (kernels of a diverged model overflow), else
    ValueError naming the fix."""
    if any(t is not None and not bool(torch.isfinite(t).all()) for t in (m, chol)):
        return FloatingPointError(
            "damping: the system to solve has NaN or inf entries (the model's outputs or derivatives overflowed, "
            "as in a diverged run); lower the learning rate or raise the damping, and restart from finite parameters"
        )
    double = m is not None and m.dtype == torch.float64
    fix = "increase damping" if double else "increase damping or use solve_dtype=torch.float64"
    return ValueError(f"damping: the damped system is not positive definite in this precision; {fix}")


def cholesky_pd(m: Tensor) -> Tensor:
    """The Cholesky factor of a positive definite matrix (or batch), else :func:`not_positive_definite`."""
    chol, info = torch.linalg.cholesky_ex(m)
    if not bool((info == 0).all()):
        raise not_positive_definite(m, chol)
    return chol


def cholesky_if_nonsingular(a: Tensor) -> Tensor | None:
    """The Cholesky factor of A when A^{-1} equals the pseudo-inverse A^+ (a single matrix whose
    eigenvalues all lie far above pinv_psd's cut-off n·eps·λ_max); None otherwise.

    λ_max ≤ ||A||_1, and 1/λ_min ≤ ||A^{-1}||_1 is estimated by Hager's method (a few solves with
    the factor, as LAPACK's condition estimators); the factor is kept when the estimated condition
    number is 10⁴ times below 1/(n·eps). About N³/3 flops against about 9 N³ for the
    eigendecomposition."""
    if a.ndim != 2:
        return None
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return None
    n = a.shape[0]
    x = torch.full((n, 1), 1.0 / n, dtype=a.dtype, device=a.device)
    inv_norm = 0.0
    for _ in range(5):
        y = torch.cholesky_solve(x, chol)
        inv_norm = float(y.abs().sum())
        z = torch.cholesky_solve(torch.sign(y), chol)
        j = int(z.abs().argmax())
        if float(z[j].abs()) <= float((z * x).sum()):
            break
        x = torch.zeros_like(x)
        x[j] = 1.0
    cond = float(a.abs().sum(0).max()) * inv_norm
    if not (math.isfinite(cond) and cond * 1e4 * n * torch.finfo(a.dtype).eps < 1.0):
        return None
    return chol


def damped_cholesky(k: Tensor, damping: float) -> Tensor | None:
    """Cholesky factor of K + ρ I for a symmetric PSD K, of which only the lower triangle is read
    (K is changed in place); at ρ = 0 the factor of K when K is far from singular
    (:func:`cholesky_if_nonsingular`, which reads K whole), else None."""
    if damping == 0:
        return cholesky_if_nonsingular(k)
    k.diagonal(dim1=-2, dim2=-1).add_(damping)
    return cholesky_pd(k)


def inverse_psd(a: Tensor, damping: float) -> Tensor:
    """(A + ρ I)^{-1} for a symmetric PSD A (Cholesky and its inverse, about N³ flops); at ρ = 0 the
    pseudo-inverse A^+ (the zero-damping limit; by Cholesky when A is far from singular)."""
    chol = damped_cholesky(0.5 * (a + a.mT) if damping > 0 else a, damping)
    return pinv_psd(a) if chol is None else torch.cholesky_inverse(chol)


def solve_psd(a: Tensor, b: Tensor, shift: Tensor | float = 0.0) -> Tensor:
    """(A + shift)^{-1} B for symmetric PSD A (or a batch) and a PD shift (a number ρ > 0 or a
    matrix); with a zero shift, A^+ B (the zero-damping limit)."""
    if isinstance(shift, Tensor):
        m = a + shift
        chol = cholesky_pd(0.5 * (m + m.mT))
    else:  # Cholesky reads one triangle: no symmetrizing copy
        chol = damped_cholesky(a.clone(), shift) if shift > 0 else damped_cholesky(a, 0.0)
    return pinv_psd(a) @ b if chol is None else torch.cholesky_solve(b, chol)


@dataclass(frozen=True)
class PSDInverse:
    """(A + ρ I)^{-1} for a symmetric PSD A (n × n, or a batch), and at ρ = 0 the pseudo-inverse A^+,
    as a Cholesky factor ``chol`` or, for a singular A at ρ = 0, an eigendecomposition (``vec`` and
    the inverted eigenvalues ``inv_eig``, zero below the cut-off). One factorization serves any
    number of :meth:`solve` calls and the explicit :meth:`matrix`.

    Build with :meth:`of`; ``routes`` (a Counter) records which factorization ran.
    """

    chol: Tensor | None = None
    vec: Tensor | None = None
    inv_eig: Tensor | None = None

    @classmethod
    def of(cls, a: Tensor, damping: float, *, overwrite: bool = False, routes: Counter | None = None) -> PSDInverse:
        """Factor A + ρ I; only A's lower triangle is read for ρ > 0 (``overwrite``: A may be changed)."""
        if damping > 0:
            chol = damped_cholesky(a if overwrite else a.clone(), damping)
            _count(routes, "cholesky")
            return cls(chol=chol)
        chol = cholesky_if_nonsingular(a)
        if chol is not None:
            _count(routes, "cholesky")
            return cls(chol=chol)
        _count(routes, "eigh")
        sym = 0.5 * (a + a.mT)
        ev, vec = torch.linalg.eigh(sym)
        cut = ev.shape[-1] * torch.finfo(a.dtype).eps * ev.abs().amax(-1, keepdim=True)
        return cls(vec=vec, inv_eig=torch.where(ev > cut, 1.0 / ev, torch.zeros_like(ev)))

    @property
    def dtype(self) -> torch.dtype:
        return (self.chol if self.chol is not None else self.vec).dtype

    def solve(self, b: Tensor) -> Tensor:
        """(A + ρ I)^{-1} b (A^+ b at ρ = 0) for b (…, n, R), in the factor's precision."""
        b = b.to(self.dtype)
        if self.chol is not None:
            return torch.cholesky_solve(b, self.chol)
        return self.vec @ (self.inv_eig.unsqueeze(-1) * (self.vec.mT @ b))

    def matrix(self) -> Tensor:
        """(A + ρ I)^{-1} (or A^+) as an explicit matrix."""
        if self.chol is not None:
            return torch.cholesky_inverse(self.chol)
        return (self.vec * self.inv_eig.unsqueeze(-2)) @ self.vec.mT


def _count(routes: Counter | None, key: str) -> None:
    if routes is not None:
        routes[key] += 1
