"""The unit-wise Fisher's systems, all units of a layer at once: the fast route behind
:meth:`natural_tangents.fisher.unitwise.UnitwiseBatch.solve_units`.

Unit i of a layer with K = a a^T (N × N, shared by the units) and scales s_i (N,) solves

    (S_i² K / N + ρ) w_i = b_i,   w_i = S_i (S_i K S_i / N + ρ)^{-1} (b_i / s_i)

on its support S_i = {n : s_{i,n} > 0} (the samples where the unit is active), and at ρ = 0 the
pseudo-inverse limit w_i = N K_SS^{-1} (b_i / s_i²)_S while K_SS is invertible (|S_i| ≤ rank a);
for larger supports the weighted least-squares limit on a's column basis (:meth:`UnitSystems.solve`).
The reference is one Cholesky factorization per unit on its support, in the solve precision
(:func:`natural_tangents.fisher.unitwise.reference_solve`); this module computes the same solutions
faster:

* units are sorted by support size and solved in chunks of similar size (one (u, m, m) batch each,
  padded with identity rows that never couple), on worker threads, in pooled scratch buffers;
* systems of at least ``refine_min_size`` samples are factored in float32 and refined to a certified
  float64 backward error (:mod:`.refine`);
* at ρ = 0, supports of more than ``complement_fraction`` · N go through K^{-1} and their complement.

Sizes and thresholds are :class:`~natural_tangents.linalg.options.SolverOptions`; ``routes`` (a
Counter) records how many units each route solved.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from .lapack import Scratch, ScratchPool, cholesky, cholesky_solve, factored
from .options import SolverOptions
from .psd import not_positive_definite, pinv_psd
from .support import complement_solve, primal_solve, principal_submatrices, refined_solve
from .threads import ordered_map

__all__ = ["ColumnBasis", "UnitSystems", "partition"]


@dataclass(frozen=True)
class ColumnBasis:
    """A layer's input signal a (N, p) in its column space: a = U Λ^{1/2} V^T of rank r < N."""

    rank: int
    basis: Tensor  # U (N, r), orthonormal columns, in the solve dtype
    basis_low: Tensor | None  # U in float32 where the solve dtype is float64 (refined solves)
    eig: Tensor  # Λ (r,), the nonzero eigenvalues of a^T a (and of K = a a^T)


@dataclass(frozen=True)
class _Plan:
    """Chunks of units of similar support size, and what every chunk's job reads.

    Padding slot j of a system points at row n + j of K ⊕ I (and s = 1 there): identity rows and no
    coupling, so no masking of the gathered systems is needed."""

    n: int
    sizes: Tensor  # (M,) support sizes
    pos: Tensor  # (M, N) each unit's active samples first
    out_pos: Tensor  # (M, N) each unit's inactive samples first
    k_ext: Tensor  # K ⊕ I
    s_ext: Tensor  # s with ones appended
    chunks: list[Tensor]
    k_low: Tensor | None = None  # K ⊕ I in float32, for refined solves
    p_ext: Tensor | None = None  # K^{-1} ⊕ I, for the complement route


@dataclass(frozen=True)
class _Chunk:
    """One chunk's factored support systems: idx (u, m) each unit's active samples first (padded),
    valid (u, m) the real slots, chol the Cholesky factors (None where a pseudo-inverse stands in),
    and ``solve(b)`` applying the systems' inverses to b (u, m, R)."""

    units: Tensor
    idx: Tensor
    valid: Tensor
    chol: Tensor | None
    solve: object = field(repr=False)


class UnitSystems:
    """The support systems of one layer's units (see the module docstring).

    Args:
        k: K = a a^T (N, N) in the solve dtype.
        damping: ρ ≥ 0.
        rcond: at ρ = 0, the pseudo-inverse's relative cut-off on a unit's diagonal s_n² K_nn / N.
        options: sizes and routes.
        pool: scratch buffers shared by the layers of a step.
        basis: at ρ = 0 when rank a < N, a's column basis (:class:`ColumnBasis`).
        routes: a Counter of units per route.
    """

    def __init__(
        self,
        k: Tensor,
        damping: float,
        rcond: float,
        options: SolverOptions,
        pool: ScratchPool | None = None,
        basis: ColumnBasis | None = None,
        routes: Counter | None = None,
    ) -> None:
        self.k, self.damping, self.rcond, self.options = k, damping, rcond, options
        self.pool = pool if pool is not None else ScratchPool()
        self.basis = basis if damping == 0 else None
        self.routes = routes if routes is not None else Counter()

    # ------------------------------------------------------------------ supports
    def support(self, s: Tensor) -> Tensor:
        """(M, N) bool: samples on which each unit is active (s_n > 0; at ρ = 0 also the diagonal
        entry s_n² K_nn / N of Θ_{l,i} above ``rcond`` times the unit's largest)."""
        if self.damping > 0:
            return s > 0
        diag = s * s * torch.diagonal(self.k)
        return diag > self.rcond * diag.amax(1, keepdim=True).clamp_min(torch.finfo(self.k.dtype).tiny)

    def _plan(self, s: Tensor, width: int = 0) -> _Plan:
        """Chunks of units of similar support size (sorted); ``width``: right-hand sides to budget for."""
        k, o = self.k, self.options
        n = k.shape[0]
        active = self.support(s)
        sizes = active.sum(1)
        order = torch.argsort(sizes)
        biggest = max(1, int(sizes.max()))
        step = max(1, o.chunk_elements // (biggest * (biggest + width)))
        ordered = sizes[order].tolist()
        chunks, lo = [], 0
        for hi, size in enumerate(ordered):  # at most ``step`` units, of sizes within the spread (little padding)
            if hi - lo >= step or size > o.size_spread * ordered[lo] + 2:
                chunks.append(order[lo:hi])
                lo = hi
        chunks.append(order[lo:])
        return _Plan(
            n=n,
            sizes=sizes,
            pos=partition(active, sizes),
            out_pos=partition(~active, n - sizes),
            k_ext=torch.block_diag(k, torch.eye(biggest, dtype=k.dtype, device=k.device)),
            s_ext=torch.cat([s, torch.ones(s.shape[0], biggest, dtype=s.dtype, device=s.device)], 1),
            chunks=[c for c in chunks if len(c) and int(sizes[c].max()) > 0],
        )

    @staticmethod
    def _slots(units: Tensor, plan: _Plan, m: int) -> tuple[Tensor, Tensor, Tensor]:
        """idx (u, m): each unit's active samples first, then inactive ones; valid (u, m): the active
        slots; sub_idx (u, m): the row of K ⊕ I for each slot (padding slots in the identity)."""
        idx = plan.pos[units, :m]
        slot = torch.arange(m, device=idx.device)[None, :]
        valid = slot < plan.sizes[units][:, None]
        return idx, valid, torch.where(valid, idx, plan.n + slot)

    # ------------------------------------------------------------------ the direct route
    def _factor(self, units: Tensor, plan: _Plan, work: Scratch | None = None) -> _Chunk:
        """One chunk's support systems factored: K_SS at ρ = 0, S K_SS S / N + ρ I else."""
        n, k_ext = plan.n, plan.k_ext
        m = int(plan.sizes[units].max())
        if self.damping > 0 and m >= self.options.full_support * n:
            # nearly full supports: the whole N × N systems, no gathering (an inactive sample's row is
            # ρ e_n, decoupled, and its right-hand side vanishes)
            si = plan.s_ext[units, :n]
            idx = torch.arange(n, device=k_ext.device).expand(len(units), n)
            sub = k_ext[None, :n, :n] * (si[:, :, None] * si[:, None, :] / n)
            sub.diagonal(dim1=1, dim2=2).add_(self.damping)
            return self._cholesky(units, idx, si > 0, sub, work, si)
        idx, valid, sub_idx = self._slots(units, plan, m)
        sub = principal_submatrices(k_ext, sub_idx, work, "sub64")  # (u, m, m)
        si = torch.gather(plan.s_ext[units], 1, sub_idx)
        if self.damping > 0:
            sub.mul_(si[:, :, None] * si[:, None, :]).div_(n)
            sub.diagonal(dim1=1, dim2=2).add_(self.damping)
        return self._cholesky(units, idx, valid, sub, work, si)

    def _cholesky(self, units, idx, valid, sub: Tensor, work: Scratch | None, si: Tensor) -> _Chunk:
        chol, info = cholesky(sub, work, "chol64")
        if bool((info == 0).all() if self.damping > 0 else factored(chol, info).all()):
            return _Chunk(units, idx, valid, chol, partial(cholesky_solve, chol))
        if self.damping == 0:
            # singular K_SS: the limit is S (S K_SS S)^+ S, not K_SS^+ (they differ unless s is constant)
            inv = pinv_psd(sub * (si[:, :, None] * si[:, None, :]))
            return _Chunk(units, idx, valid, None, lambda b: si[:, :, None] * (inv @ (si[:, :, None] * b)))
        raise not_positive_definite(sub)

    # ------------------------------------------------------------------ solves
    def solve(self, s: Tensor, rhs: Tensor) -> Tensor:
        """For each unit i: (S_i² K / N + ρ)^{-1} rhs_i, for rhs (M, N, R) vanishing where s_i = 0; at
        ρ = 0 the pseudo-inverse limit, through the column basis for supports larger than rank a."""
        if self.basis is None:
            return self._solve_dual(s, rhs)
        over = self.support(s).sum(1) > self.basis.rank
        if not bool(over.any()):
            return self._solve_dual(s, rhs)
        out = torch.zeros(rhs.shape, dtype=rhs.dtype, device=rhs.device)
        if not bool(over.all()):
            out[~over] = self._solve_dual(s[~over], rhs[~over])
        out[over] = self._solve_primal(s[over], rhs[over])
        return out

    def _solve_primal(self, s: Tensor, rhs: Tensor) -> Tensor:
        """The ρ = 0 limit for units active on more samples than rank a = r, in the primal.

        With a = U Λ^{1/2} V^T (U (N, r) orthonormal) and D = diag(s) on the support S, the
        limit of the unit's step is pinv(D a_S) (rhs / s)_S = V Λ^{-1/2} G^{-1} U_S^T rhs_S with the
        r × r Gram G = U_S^T D² U_S, nonsingular for |S| ≥ r in general position. It is returned as
        the dual vector w = N U Λ^{-1} G^{-1} U_S^T rhs_S (a^T w / N is the step). Grams that are
        singular (or, refined, not certified) are pseudo-inverted by eigh. rhs (u, N, R)."""
        rng = self.basis
        n, r = rhs.shape[1], rng.rank
        active = self.support(s)
        sizes = active.sum(1)
        pos = partition(active, sizes)
        scale = torch.where(active, s, 0.0)
        g = rng.basis.T @ (rhs * active[:, :, None])  # (u, r, R)
        low = rng.basis_low if rhs.shape[2] == 1 else None
        order = torch.argsort(sizes)
        step = max(1, self.options.chunk_elements // (r * (int(sizes.max()) + r)))

        def job(units: Tensor) -> tuple[Tensor, Tensor]:
            idx = pos[units, : int(sizes[units].max())]
            t = torch.gather(scale[units], 1, idx)
            with self.pool.take() as work:
                phi, ok = primal_solve(rng.basis, low, idx, t, g[units], work, self.options)
            if not bool(ok.all()):
                rows = rng.basis[idx[~ok]] * t[~ok][:, :, None]
                phi[~ok] = pinv_psd(rows.mT @ rows) @ g[units[~ok]]
                self.routes["primal pinv"] += int((~ok).sum())
            return units, phi

        phi = torch.empty_like(g)
        for units, part in ordered_map(job, order.split(step)):
            phi[units] = part
        self.routes["primal"] += len(s)
        return (rng.basis * (n / rng.eig)) @ phi

    def _solve_dual(self, s: Tensor, rhs: Tensor) -> Tensor:
        """For each unit i: S_i (S_i K S_i / N + ρ)^{-1} S_i^+ rhs_i; at ρ = 0, N K_SS^{-1} (rhs / s²)_S
        on the support S of unit i, 0 elsewhere. One right-hand side per unit in float64: systems of
        at least ``refine_min_size`` samples refined from float32, at ρ = 0 supports above
        ``complement_fraction`` · N through K^{-1} and their complement; the rest, and units not
        certified, by float64 Cholesky on the support."""
        k, o = self.k, self.options
        n, r = k.shape[0], rhs.shape[2]
        out = torch.zeros(rhs.shape, dtype=rhs.dtype, device=rhs.device)
        plan = self._plan(s, r)
        refine = r == 1 and k.dtype == torch.float64
        k_low, p_ext = None, None
        if refine:
            k_low = plan.k_ext.float()
        large = plan.sizes[plan.sizes > o.complement_fraction * n]
        if refine and self.damping == 0 and len(large):  # P = K^{-1} for the supports of more than half of N
            chol, info = torch.linalg.cholesky_ex(k)
            if bool(factored(chol, info)):
                eye = torch.eye(n - int(large.min()), dtype=k.dtype, device=k.device)
                p_ext = torch.block_diag(torch.cholesky_inverse(chol), eye)
        sizes = plan.sizes

        def gathered(units: Tensor, idx: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
            """The units' scales (1 on padding) and right-hand sides (0 on padding) in slot order,
            (u, m, 1) and (u, m, R)."""
            si = torch.where(valid[:, :, None], torch.gather(s[units], 1, idx)[:, :, None], 1.0)
            b = torch.gather(rhs[units], 1, idx[:, :, None].expand(-1, -1, r)) * valid[:, :, None]
            return si, b

        def direct(units: Tensor, work: Scratch) -> tuple[str, Tensor, Tensor, Tensor]:
            chunk = self._factor(units, plan, work)
            si, b = gathered(chunk.units, chunk.idx, chunk.valid)
            w = chunk.solve(b * (n / si**2)) if self.damping == 0 else chunk.solve(b / si) * si
            return "direct", chunk.units, chunk.idx, w * chunk.valid[:, :, None]

        def job(units: Tensor) -> list:
            with self.pool.take() as work:
                return solve_chunk(units, work)

        def solve_chunk(units: Tensor, work: Scratch) -> list:
            m, smallest = int(sizes[units].max()), int(sizes[units].min())
            complement = refine and self.damping == 0 and p_ext is not None and smallest > o.complement_fraction * n
            if not complement and (not refine or m < o.refine_min_size):
                return [direct(units, work)]
            idx, valid, sub_idx = self._slots(units, plan, m)
            si, b = (x[:, :, 0] for x in gathered(units, idx, valid))
            if complement:
                out_idx = plan.out_pos[units, : n - smallest]
                out_valid = torch.arange(n - smallest, device=k.device)[None, :] < (n - sizes[units])[:, None]
                args = (k, p_ext, idx, valid, out_idx, out_valid, b * (n / si**2), work, o)
                z, ok = complement_solve(*args)
                name = "complement"
            elif self.damping == 0:
                z, ok = refined_solve(k, k_low, idx, sub_idx, valid, None, 0.0, b * (n / si**2), work, o)
                name = "refined"
            else:
                z, ok = refined_solve(k, k_low, idx, sub_idx, valid, si / n**0.5, self.damping, b / si, work, o)
                z = z * si
                name = "refined"
            done = [(name, units[ok], idx[ok], z[ok][:, :, None])]
            return done if bool(ok.all()) else [*done, direct(units[~ok], work)]

        rows = out.view(-1, r)  # (M·N, R): one flat row index per (unit, sample), a plain copy
        for solved in ordered_map(job, plan.chunks):
            for name, units, idx, w in solved:  # padding slots hold inactive samples, where w = 0
                self.routes[name] += len(units)
                rows.index_copy_(0, (units[:, None] * n + idx).view(-1), w.reshape(-1, r))
        return out

    def trace(self, s: Tensor) -> float:
        """Σ_i tr(Θ_{l,i} (Θ_{l,i} + ρ)^{-1}): |S_i| − ρ ||L_i^{-1}||_F² per unit for the Cholesky
        factor L_i of its support system; at ρ = 0 the rank, min(|S_i|, rank a) for data in general
        position (|S_i| is (S.137))."""
        if self.damping == 0:
            sizes = self.support(s).sum(1)
            return float(sizes.sum() if self.basis is None else sizes.clamp_max(self.basis.rank).sum())
        plan = self._plan(s)

        def job(units: Tensor) -> float:
            chunk = self._factor(units, plan)
            eye = torch.eye(chunk.chol.shape[-1], dtype=self.k.dtype, device=self.k.device).expand_as(chunk.chol)
            inv = torch.linalg.solve_triangular(chunk.chol, eye, upper=False) * chunk.valid[:, :, None]
            return float(chunk.valid.sum() - self.damping * (inv**2).sum())

        return sum(ordered_map(job, plan.chunks))


def partition(first: Tensor, count: Tensor) -> Tensor:
    """(M, N) row-wise orders putting the samples where ``first`` holds first, each part in
    increasing order (a stable partition; ``count`` = first.sum(1)), without sorting."""
    ones = first.to(torch.int32)
    rank = torch.where(first, ones.cumsum(1) - 1, count[:, None].to(torch.int32) + (1 - ones).cumsum(1) - 1)
    samples = torch.arange(first.shape[1], device=first.device).expand_as(rank)
    return torch.empty_like(samples).scatter_(1, rank.long(), samples)
