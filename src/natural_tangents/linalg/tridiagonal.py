"""Block tri-diagonal systems: the dual system of a layer-wise Fisher whose pattern Σ couples only
neighbouring layers (the paper's tri-diagonal Fisher, Lemma 4.3), solved in O(L K³) instead of the
(L K)³ of the whole system.

The system, for blocks ``left`` (L, K, K) and right-hand sides rhs_l (K, R):

    Σ_{l′} Σ_{ll′} left_{l′} v_{l′} + ρ v_l = rhs_l        (every layer l)

:func:`factor` does the O(K³) work once and returns a solve for any right-hand sides, O(L K² R).
:class:`TridiagonalSystem` holds the factorizations of one system for any number of solves, with
mixed precision for large blocks: the factorization in float32 (half the time of float64 on a CPU,
the O(K³) work being most of a step at large N), refined to a certified float64 backward error by
:func:`~natural_tangents.linalg.refine.refine` (‖A‖ bounded below by its largest column norm); a
system that is not certified is factored again in float64.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor

from .options import SolverOptions
from .refine import refine

__all__ = ["TridiagonalSystem", "factor"]


def factor(s: Tensor, left: Tensor, damping: float, *, symmetric: bool = False) -> Callable | None:
    """Factor the system for a tri-diagonal Σ (L, L) and blocks ``left`` (L, K, K) (``symmetric``:
    each block symmetric PSD, as Θ_l is without an output metric). Returns ``solve(rhs)`` mapping L
    right-hand sides (K, R) to the L blocks of v, or None when a pivot block is numerically singular
    (the caller then solves the whole L·K system).

    The two end layers e are eliminated first: with R_e = (Σ_ee left_e + ρ)^{-1}, their Schur
    products need no K³ product of their own, left_e R_e = (I − ρ R_e) / Σ_ee. The interior layers are
    then eliminated in order (block LU, partial pivoting inside the blocks). About 4.7 K³ flops for
    L = 3 and 4.7 K³ per further layer, against (2/3) (L K)³ for the whole system."""
    depth = left.shape[0]
    sv = s.tolist()
    ends = [e for e in ([0, depth - 1] if depth > 2 else [0]) if sv[e][e] != 0.0 and depth > 1]
    inv = {}
    for e in ends:
        d_e = left[e] * sv[e][e]
        d_e.diagonal().add_(damping)
        if symmetric and sv[e][e] > 0:  # positive definite: Cholesky inverse, half the flops of LU
            chol, info = torch.linalg.cholesky_ex(d_e)
            if int(info) != 0:
                return None
            inv[e] = torch.cholesky_inverse(chol)
        else:
            inv[e], info = torch.linalg.inv_ex(d_e)
            if int(info) != 0:
                return None
    inner = [l for l in range(depth) if l not in inv]
    diag, corrections = [], []  # corrections[i]: (e, Σ_le / Σ_ee) of the eliminated neighbours of inner[i]
    for l in inner:
        shift, mix, terms = sv[l][l], None, []  # mix: Σ_e c_e R_e over the eliminated neighbours e of l
        for e in inv:
            if abs(e - l) == 1 and sv[l][e] != 0.0:
                c = sv[l][e] * sv[e][l] / sv[e][e]
                shift -= c
                mix = c * inv[e] if mix is None else mix.add_(inv[e], alpha=c)
                terms.append((e, sv[l][e] / sv[e][e]))
        d = left[l] * shift
        d.diagonal().add_(damping)
        if mix is not None:
            d.addmm_(mix, left[l], alpha=damping)
            del mix
        diag.append(d)
        corrections.append(terms)
    upper = [sv[l][l + 1] * left[l + 1] if sv[l][l + 1] != 0.0 else None for l in inner[:-1]]
    lower = [sv[l + 1][l] * left[l] if sv[l + 1][l] != 0.0 else None for l in inner[:-1]]
    thomas = _thomas_factor(diag, upper, lower)
    if thomas is None:
        return None

    def solve(rhs: list[Tensor]) -> list[Tensor]:
        rhs_in = []
        for l, terms in zip(inner, corrections):
            b = rhs[l]
            for e, coef in terms:
                b = b - coef * (rhs[e] - damping * (inv[e] @ rhs[e]))
            rhs_in.append(b)
        v = dict(zip(inner, _thomas_solve(thomas, lower, rhs_in)))
        for e, r_e in inv.items():
            b = rhs[e]
            for l in (e - 1, e + 1):
                if 0 <= l < depth and sv[e][l] != 0.0:
                    b = b - sv[e][l] * (left[l] @ v[l])
            v[e] = r_e @ b
        return [v[l] for l in range(depth)]

    return solve


def _thomas_factor(diag: list, upper: list, lower: list) -> tuple[list, list] | None:
    """Block LU of a block tri-diagonal matrix (explicit K × K blocks; None for a zero block): the LU
    factors of the pivot blocks and the couplings D_l^{-1} U_l."""
    factors, couple = [], []
    for l, d in enumerate(diag):
        if l > 0 and lower[l - 1] is not None and couple[l - 1] is not None:
            d = d - lower[l - 1] @ couple[l - 1]
        lu, piv, info = torch.linalg.lu_factor_ex(d)
        if int(info) != 0 or not bool(torch.isfinite(lu).all()):
            return None
        factors.append((lu, piv))
        if l + 1 < len(diag):
            couple.append(torch.linalg.lu_solve(lu, piv, upper[l]) if upper[l] is not None else None)
    return factors, couple


def _thomas_solve(thomas: tuple[list, list], lower: list, rhs: list[Tensor]) -> list[Tensor]:
    factors, couple = thomas
    ys = []
    for l, y in enumerate(rhs):
        if l > 0 and lower[l - 1] is not None:
            y = y - lower[l - 1] @ torch.linalg.lu_solve(*factors[l - 1], ys[l - 1])
        ys.append(y)
    v: list = [None] * len(rhs)
    for l in reversed(range(len(rhs))):
        x = torch.linalg.lu_solve(*factors[l], ys[l])
        if l + 1 < len(rhs) and couple[l] is not None:
            x = x - couple[l] @ v[l + 1]
        v[l] = x
    return v


class TridiagonalSystem:
    """The system Σ_{l′} Σ_{ll′} left_{l′} v_{l′} + ρ v_l = rhs_l for a tri-diagonal Σ (L, L) and
    blocks ``left`` (L, K, K), factored once for any number of solves (``symmetric``: each block
    symmetric PSD). float64 blocks of at least ``options.tridiagonal_refine_min_rows`` rows are
    factored in float32 and refined; the float64 factorization is made only when needed.
    ``routes`` (a Counter) records "tridiagonal refined" or "tridiagonal" per solve."""

    def __init__(
        self,
        s: Tensor,
        left: Tensor,
        damping: float,
        *,
        symmetric: bool,
        options: SolverOptions,
        routes: Counter | None = None,
    ) -> None:
        self.s, self.left, self.damping, self.symmetric = s, left, damping, symmetric
        self.options, self.routes = options, routes if routes is not None else Counter()
        refine_here = left.dtype == torch.float64 and left.shape[1] >= options.tridiagonal_refine_min_rows
        self._low = factor(s.float(), left.float(), damping, symmetric=symmetric) if refine_here else None
        self._full: Callable | None = None
        self._full_tried = False
        if self._low is None:
            self._factor_full()

    @property
    def factored(self) -> bool:
        """Whether the elimination went through (no numerically singular pivot block)."""
        return self._low is not None or self._full is not None

    def _factor_full(self) -> None:
        if not self._full_tried:
            self._full = factor(self.s, self.left, self.damping, symmetric=self.symmetric)
            self._full_tried = True

    def solve(self, rhs: Tensor | list[Tensor]) -> list[Tensor] | None:
        """v as L blocks (K, R) for ``rhs`` (one (K, R) for every layer, or a list of L); None when
        a pivot block is numerically singular (the caller then solves the whole L·K system)."""
        depth = self.left.shape[0]
        rhs = [rhs] * depth if isinstance(rhs, Tensor) else list(rhs)
        if self._low is not None:
            v = self._refined(rhs)
            if v is not None:
                self.routes["tridiagonal refined"] += 1
                return v
        self._factor_full()
        if self._full is None:
            return None
        v = self._full(rhs)
        if not all(bool(torch.isfinite(x).all()) for x in v):
            return None
        self.routes["tridiagonal"] += 1
        return v

    def _refined(self, rhs: list[Tensor]) -> list[Tensor] | None:
        """The float32 solve refined with float64 residuals, once every right-hand side's backward
        error is certified (≤ L·K·eps); else None."""
        s, left, damping = self.s, self.left, self.damping
        depth, k = left.shape[0], left.shape[1]
        sv = s.tolist()
        width = rhs[0].shape[1]

        def blocks(z: Tensor) -> list[Tensor]:  # (R, L·K) → L blocks (K, R)
            return list(z.T.reshape(depth, k, width))

        def packed(v: list[Tensor]) -> Tensor:
            return torch.cat(v, 0).T

        def apply(z: Tensor) -> Tensor:
            v = blocks(z)
            u = [left[m] @ v[m] for m in range(depth)]
            out = []
            for l in range(depth):
                acc = damping * v[l]
                for m in range(max(0, l - 1), min(depth, l + 2)):
                    if sv[l][m] != 0.0:
                        acc = acc + sv[l][m] * u[m]
                out.append(acc)
            return packed(out)

        def approx(r: Tensor) -> Tensor:
            return packed([x.double() for x in self._low([b.float() for b in blocks(r)])])

        # ‖A‖₂ ≥ the largest column norm: column j of block column m holds Σ_lm left_m[:, j] in block l
        # and ρ on the diagonal
        col = torch.stack(
            [
                sum(sv[l][m] ** 2 for l in range(depth)) * (left[m] ** 2).sum(0)
                + 2 * damping * sv[m][m] * torch.diagonal(left[m])
                + damping**2
                for m in range(depth)
            ]
        )
        a_norm = float(col.clamp_min(0).amax().sqrt())
        c = packed(rhs)
        ok = torch.ones(width, dtype=torch.bool, device=c.device)
        z, certified = refine(apply, approx, c, a_norm, ok, depth * k, self.options)
        return blocks(z) if bool(certified.all()) else None
