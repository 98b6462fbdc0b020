"""Unit-wise Fisher in dual form (docs/conventions.md; the paper's Appendix C, (S.129)–(S.141)).

Unit i of layer l owns θ_{l,i} = row i of [W_l | b_l]; its Jacobian is J_{l,i} = E_i a with
E_i[(n, k), n] = δ_{l,i}^{(k)}(x_n), so its Fisher block J_{l,i}^T Λ J_{l,i} / N + ρI is inverted
through N × N systems, batched over the M_l units of a layer. Writing K = a a^T (N × N, shared by
all units of the layer), s_n² = δ_n^T Λ_n δ_n and b_n = δ_n · r_n (δ_n the C-vector of unit i at
sample n), the push-through identity gives

    Δθ_{l,i} = a^T w / N,   w = (S² K / N + ρ)^{-1} b = S (S K S / N + ρ)^{-1} (b / s)

(one symmetric positive-definite solve per unit). Rows of a sample on which the unit is inactive
(s_n = 0, as for ReLU) decouple, so each solve is restricted to the unit's support, |S| × |S| —
about N/2 for ReLU, an eighth of the work. At ρ = 0 the limit is the pseudo-inverse (S.135):
w_S = N K_SS^{-1} (b / s²)_S while K_SS is invertible (|S| ≤ rank a); for larger supports it is the
weighted least-squares step pinv(S a_S) (b / s)_S, solved in the primal on a's column basis
(:meth:`Unitwise._solve_primal`). For one output, S K S / N is the paper's
Θ_{l,i} = diag(δ_{l,i}) (σ_w² A_{l−1} + σ_b²) diag(δ_{l,i}) / N (S.131), and on the training set
Θ̄ = Σ_{l,i} Θ_{l,i} Θ_{l,i}^+ = Σ_{l,i} diag(1[δ_{l,i} ≠ 0]) (S.137): α = Σ_{l<L} γ_l M_l (+ C)
(again while |S| ≤ rank a; beyond, Θ_{l,i} Θ_{l,i}^+ is a projector of rank rank a).
Never a (M_{l−1} + 1)² block per unit, never J.

Layers with positions (convolutions: a unit is an output channel, its filter with its bias) and
generic modules (one unit: the whole module) go through their units' per-sample Jacobians J_u
(N·C × p): each unit's block J_u^T Λ J_u / N + ρ I is inverted as it is (p × p) when p ≤ N·C, and in
dual form (N·C × N·C) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from .._parallel import ordered_map
from ..layers.base import padded_mm
from ..signals import Signals
from .base import BoundFisher, Fisher, block_diag_metric, not_positive_definite, pinv_psd, solve_psd, solve_with_metric
from .support_systems import (
    Scratch,
    ScratchPool,
    cg_solve,
    cholesky,
    cholesky_solve,
    complement_solve,
    factored,
    primal_solve,
    principal_submatrices,
    refined_solve,
)

__all__ = ["Unitwise"]

_CHUNK_ELEMENTS = 2**23  # units per batched solve: chunk · N² ≤ this (64 MiB in float64)
_CG_ELEMENTS = 2**21  # conjugate gradients: units per pass · N ≤ this (16 MiB per array in float64)
_FULL_SUPPORT = 0.85  # supports this close to N are solved as whole N × N systems (no gathering)
_SIZE_SPREAD = 1.05  # a chunk's units differ in support size by at most ~5% (padding)
_REFINE_MIN_SIZE = 96  # update systems this large: float32 Cholesky, float64 refinement (support_systems)
_COMPLEMENT = 0.56  # at ρ = 0, supports of more than this fraction of N go through K^{-1} and their complement


@dataclass(frozen=True)
class _Range:
    """A layer's input signal a (N, p) in its column space: a = U Λ^{1/2} V^T of rank r < N."""

    rank: int
    basis: Tensor  # U (N, r), orthonormal columns, in the solve dtype
    basis_low: Tensor | None  # U in float32 where the solve dtype is float64 (refined solves)
    eig: Tensor  # Λ (r,), the nonzero eigenvalues of a^T a (and of K = a a^T)


@dataclass(frozen=True, kw_only=True)
class Unitwise(Fisher):
    """Unit-wise Fisher: block diagonal over the units (l, i) (the paper's (S.129)).

    Args:
        rcond: at ρ = 0, the pseudo-inverse's relative cut-off: sample n counts as active for unit i
            when the diagonal entry s_n² K_nn / N of Θ_{l,i} exceeds ``rcond`` times the unit's largest
            one (exact zeros, as ReLU's, are always inactive).
        solver: how the update solves the units' systems of MLP-like layers. ``"direct"``: Cholesky
            per unit on its support. ``"cg"``: conjugate gradients on all units of a layer at once
            (one N × N × M_l product per iteration; needs damping > 0), each unit to relative
            residual ``tol``, so the update agrees with the direct one to about ``tol`` times the unit
            system's condition number. ``"auto"`` (default): conjugate gradients run to machine
            precision, and a unit's solution is kept only if its true residual certifies a normwise
            backward error ‖c − A z‖ / (‖A‖ ‖z‖ + ‖c‖) ≤ N·eps, the bound a Cholesky solve
            guarantees (‖A‖ taken as its largest diagonal entry, a lower bound, so the check is
            conservative); every other unit, and everything at damping 0, goes through Cholesky.
            Units not converged in ``maxiter`` iterations fall back to Cholesky. Θ̄ and α̂ always
            use the direct route.

    At finite width the ρ → 0 limit takes huge steps on units whose δ_{l,i}(x_n) is tiny but not zero
    (the step of u_{l,i}(x_n) is r_n / δ_{l,i}(x_n)), which leaves the linear regime; a small damping
    such as ρ = 1e-12 keeps Θ̄ close to α I and training in the regime of the theory.
    """

    rcond: float = 1e-12
    solver: str = "auto"
    tol: float = 1e-10
    maxiter: int = 100

    name: ClassVar[str] = "unitwise"
    label: ClassVar[str] = "Unit-wise"
    aliases: ClassVar[tuple[str, ...]] = ("unitwise", "unit_wise")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in ("auto", "direct", "cg"):
            raise ValueError(f"solver: expected 'auto', 'direct' (Cholesky) or 'cg', got {self.solver!r}")
        if self.solver == "cg" and self.damping == 0:
            raise ValueError(
                "solver: 'cg' needs damping > 0 (the zero-damping limit is a pseudo-inverse); use solver='direct'"
            )
        if not (0 < self.tol < 1):
            raise ValueError(f"tol: expected a relative residual in (0, 1), got {self.tol}")
        if int(self.maxiter) != self.maxiter or self.maxiter < 1:
            raise ValueError(f"maxiter: expected a positive integer, got {self.maxiter}")

    def _unit_scales(self, layer, lam: Tensor | None, units: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """s (M, N) with s_n² = δ_n^T Λ_n δ_n, and δ itself as (M, N, C) (of the units ``units``)."""
        d = layer.kron.d[:, :, 0, units].to(self.solve_dtype).permute(2, 1, 0)  # (M, N, C)
        if lam is None:
            s2 = (d * d).sum(-1)
        else:
            s2 = torch.einsum("mnk,nkj,mnj->mn", d, lam, d)
        return s2.clamp_min(0).sqrt(), d

    def _support(self, k: Tensor, s: Tensor) -> Tensor:
        """(M, N) bool: samples on which each unit is active (s_n > 0; at ρ = 0 also the diagonal
        entry s_n² K_nn / N of Θ_{l,i} above ``rcond`` times the unit's largest)."""
        if self.damping > 0:
            return s > 0
        diag = s * s * torch.diagonal(k)
        return diag > self.rcond * diag.amax(1, keepdim=True).clamp_min(torch.finfo(k.dtype).tiny)

    def _plan(self, k: Tensor, s: Tensor, width: int = 0, pool: ScratchPool | None = None) -> tuple[list[Tensor], dict]:
        """Chunks of units of similar support size (sorted), and what every chunk's job needs.

        Padding slot j of a system points at row n + j of K ⊕ I (and s = 1 there): identity rows and
        no coupling, so no masking of the gathered systems is needed. ``width`` is the number of
        right-hand sides to budget memory for."""
        n = k.shape[0]
        active = self._support(k, s)
        sizes = active.sum(1)
        order = torch.argsort(sizes)
        biggest = max(1, int(sizes.max()))
        step = max(1, _CHUNK_ELEMENTS // (biggest * (biggest + width)))
        ctx = {
            "n": n,
            "sizes": sizes,
            "pos": _partition(active, sizes),  # active samples first
            "out_pos": _partition(~active, n - sizes),  # inactive samples first
            "pool": pool if pool is not None else ScratchPool(),  # buffers for the batched systems
            "k_ext": torch.block_diag(k, torch.eye(biggest, dtype=k.dtype, device=k.device)),
            "s_ext": torch.cat([s, torch.ones(s.shape[0], biggest, dtype=s.dtype, device=s.device)], 1),
        }
        ordered = sizes[order].tolist()
        chunks, lo = [], 0
        for hi, size in enumerate(ordered):  # at most ``step`` units, of sizes within ~5% (little padding)
            if hi - lo >= step or size > _SIZE_SPREAD * ordered[lo] + 2:
                chunks.append(order[lo:hi])
                lo = hi
        chunks.append(order[lo:])
        return [c for c in chunks if len(c) and int(sizes[c].max()) > 0], ctx

    @staticmethod
    def _slots(units: Tensor, ctx: dict, m: int) -> tuple[Tensor, Tensor, Tensor]:
        """idx (u, m): each unit's active samples first, then inactive ones; valid (u, m): the active
        slots; sub_idx (u, m): the row of K ⊕ I for each slot (padding slots in the identity)."""
        n, sizes = ctx["n"], ctx["sizes"]
        idx = ctx["pos"][units, :m]
        slot = torch.arange(m, device=idx.device)[None, :]
        valid = slot < sizes[units][:, None]
        return idx, valid, torch.where(valid, idx, n + slot)

    def _factor(self, units: Tensor, ctx: dict, work: Scratch | None = None):
        """(units, idx, valid, chol, solve) of one chunk: idx (u, m) each unit's active samples first
        (padded); valid (u, m) marks the real ones; chol the Cholesky factors of the support systems —
        K_SS at ρ = 0, S K_SS S / N + ρ I else — with identity rows on the padding (None where the
        pseudo-inverse stands in); solve(b) the systems' inverse applied to b (u, m, R)."""
        n, sizes, k_ext = ctx["n"], ctx["sizes"], ctx["k_ext"]
        m = int(sizes[units].max())
        if self.damping > 0 and m >= _FULL_SUPPORT * n:
            # nearly full supports: the whole N × N systems, no gathering (an inactive sample's row is
            # ρ e_n, decoupled, and its right-hand side vanishes)
            si = ctx["s_ext"][units, :n]
            idx = torch.arange(n, device=k_ext.device).expand(len(units), n)
            sub = k_ext[None, :n, :n] * (si[:, :, None] * si[:, None, :] / n)
            sub.diagonal(dim1=1, dim2=2).add_(self.damping)
            return self._cholesky(units, idx, si > 0, sub, work, si)
        idx, valid, sub_idx = self._slots(units, ctx, m)
        sub = principal_submatrices(k_ext, sub_idx, work, "sub64")  # (u, m, m)
        si = torch.gather(ctx["s_ext"][units], 1, sub_idx)
        if self.damping > 0:
            sub.mul_(si[:, :, None] * si[:, None, :]).div_(n)
            sub.diagonal(dim1=1, dim2=2).add_(self.damping)
        return self._cholesky(units, idx, valid, sub, work, si)

    def _cholesky(self, units: Tensor, idx: Tensor, valid: Tensor, sub: Tensor, work: Scratch | None, si: Tensor):
        chol, info = cholesky(sub, work, "chol64")
        if bool((info == 0).all() if self.damping > 0 else factored(chol, info).all()):
            return units, idx, valid, chol, partial(cholesky_solve, chol)
        if self.damping == 0:
            # singular K_SS: the limit is S (S K_SS S)^+ S, not K_SS^+ (they differ unless s is constant)
            inv = pinv_psd(sub * (si[:, :, None] * si[:, None, :]))
            return units, idx, valid, None, lambda b: si[:, :, None] * (inv @ (si[:, :, None] * b))
        raise not_positive_definite(sub)

    def _solve_units(
        self, k: Tensor, s: Tensor, rhs: Tensor, pool: ScratchPool | None = None, rng: _Range | None = None
    ) -> Tensor:
        """:meth:`_solve_dual`, except at ρ = 0 for the units whose support is larger than rank a
        (``rng``, from :meth:`_layer_range`), where K_SS is singular: :meth:`_solve_primal`."""
        if rng is None or self.damping > 0:
            return self._solve_dual(k, s, rhs, pool)
        active = self._support(k, s)
        over = active.sum(1) > rng.rank
        if not bool(over.any()):
            return self._solve_dual(k, s, rhs, pool)
        out = torch.zeros(rhs.shape, dtype=rhs.dtype, device=rhs.device)
        if not bool(over.all()):
            out[~over] = self._solve_dual(k, s[~over], rhs[~over], pool)
        out[over] = self._solve_primal(s[over], rhs[over], active[over], rng, pool)
        return out

    def _solve_primal(self, s: Tensor, rhs: Tensor, active: Tensor, rng: _Range, pool: ScratchPool | None) -> Tensor:
        """The ρ = 0 limit for units active on more samples than rank a = r, in the primal.

        With a = U Λ^{1/2} V^T (U (N, r) orthonormal) and D = diag(s) on the support S, the
        limit of the unit's step is pinv(D a_S) (rhs / s)_S = V Λ^{-1/2} G^{-1} U_S^T rhs_S with the
        r × r Gram G = U_S^T D² U_S, nonsingular for |S| ≥ r in general position. It is returned as
        the dual vector w = N U Λ^{-1} G^{-1} U_S^T rhs_S (a^T w / N is the step). Grams that are
        singular (or, refined, not certified) are pseudo-inverted by eigh. rhs (u, N, R)."""
        n, r = rhs.shape[1], rng.rank
        sizes = active.sum(1)
        pos = _partition(active, sizes)
        scale = torch.where(active, s, 0.0)
        g = rng.basis.T @ (rhs * active[:, :, None])  # (u, r, R)
        low = rng.basis_low if rhs.shape[2] == 1 else None
        order = torch.argsort(sizes)
        step = max(1, _CHUNK_ELEMENTS // (r * (int(sizes.max()) + r)))
        pool = pool if pool is not None else ScratchPool()

        def job(units: Tensor) -> tuple[Tensor, Tensor]:
            idx = pos[units, : int(sizes[units].max())]
            t = torch.gather(scale[units], 1, idx)
            with pool.take() as work:
                phi, ok = primal_solve(rng.basis, low, idx, t, g[units], work)
            if not bool(ok.all()):
                rows = rng.basis[idx[~ok]] * t[~ok][:, :, None]
                phi[~ok] = pinv_psd(rows.mT @ rows) @ g[units[~ok]]
            return units, phi

        phi = torch.empty_like(g)
        for units, part in ordered_map(job, order.split(step)):
            phi[units] = part
        return (rng.basis * (n / rng.eig)) @ phi

    def _solve_dual(self, k: Tensor, s: Tensor, rhs: Tensor, pool: ScratchPool | None = None) -> Tensor:
        """For each unit i: (S_i² K / N + ρ)^{-1} rhs_i = S_i (S_i K S_i / N + ρ)^{-1} S_i^+ rhs_i, for
        rhs (M, N, R) vanishing where s_i = 0. At ρ = 0, the pseudo-inverse limit (S.135):
        N K_SS^{-1} (rhs / s²)_S on the support S of unit i, 0 elsewhere.

        One right-hand side per unit (the update) in float64: systems of at least
        ``_REFINE_MIN_SIZE`` samples are factored in float32 and refined to a certified float64
        backward error, and at ρ = 0 supports of more than ``_COMPLEMENT`` · N go through K^{-1} and
        the samples outside them (:mod:`.support_systems`); units not certified, and every other
        case, by float64 Cholesky on the support."""
        n, r = k.shape[0], rhs.shape[2]
        out = torch.zeros(rhs.shape, dtype=rhs.dtype, device=rhs.device)
        chunks, ctx = self._plan(k, s, r, pool)

        refine = r == 1 and k.dtype == torch.float64
        if refine:
            ctx["k_low"] = ctx["k_ext"].float()
        sizes = ctx["sizes"]
        large = sizes[sizes > _COMPLEMENT * n]
        if refine and self.damping == 0 and len(large):  # P = K^{-1} for the supports of more than N/2
            chol, info = torch.linalg.cholesky_ex(k)
            if bool(factored(chol, info)):
                eye = torch.eye(n - int(large.min()), dtype=k.dtype, device=k.device)
                ctx["p_ext"] = torch.block_diag(torch.cholesky_inverse(chol), eye)

        def gathered(units: Tensor, idx: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
            """The units' scales (1 on padding) and right-hand sides (0 on padding) in slot order,
            (u, m, 1) and (u, m, R)."""
            si = torch.where(valid[:, :, None], torch.gather(s[units], 1, idx)[:, :, None], 1.0)
            b = torch.gather(rhs[units], 1, idx[:, :, None].expand(-1, -1, r)) * valid[:, :, None]
            return si, b

        def direct(units: Tensor, work: Scratch):
            units, idx, valid, _, solve = self._factor(units, ctx, work)
            si, b = gathered(units, idx, valid)
            w = solve(b * (n / si**2)) if self.damping == 0 else solve(b / si) * si
            return units, idx, w * valid[:, :, None]

        def job(units: Tensor) -> list:
            with ctx["pool"].take() as work:
                return solve_chunk(units, work)

        def solve_chunk(units: Tensor, work: Scratch) -> list:
            m, low = int(sizes[units].max()), int(sizes[units].min())
            complement = refine and self.damping == 0 and "p_ext" in ctx and low > _COMPLEMENT * n
            if not complement and (not refine or m < _REFINE_MIN_SIZE):
                return [direct(units, work)]
            idx, valid, sub_idx = self._slots(units, ctx, m)
            si, b = (x[:, :, 0] for x in gathered(units, idx, valid))
            if complement:
                out_idx = ctx["out_pos"][units, : n - low]
                out_valid = torch.arange(n - low, device=k.device)[None, :] < (n - sizes[units])[:, None]
                z, ok = complement_solve(k, ctx["p_ext"], idx, valid, out_idx, out_valid, b * (n / si**2), work)
            elif self.damping == 0:
                z, ok = refined_solve(k, ctx["k_low"], idx, sub_idx, valid, None, 0.0, b * (n / si**2), work)
            else:
                z, ok = refined_solve(k, ctx["k_low"], idx, sub_idx, valid, si / n**0.5, self.damping, b / si, work)
                z = z * si
            done = [(units[ok], idx[ok], z[ok][:, :, None])]
            return done if bool(ok.all()) else [*done, direct(units[~ok], work)]

        rows = out.view(-1, r)  # (M·N, R): one flat row index per (unit, sample), a plain copy
        for solved in ordered_map(job, chunks):
            for units, idx, w in solved:  # padding slots hold inactive samples, where w = 0
                rows.index_copy_(0, (units[:, None] * n + idx).view(-1), w.reshape(-1, r))
        return out

    # ------------------------------------------------------------------ rank-one units (MLP layers)
    @staticmethod
    def _rank_one(layer) -> bool:
        return layer.kron is not None and layer.kron.positions == 1

    def _layer_k(self, bound: BoundFisher, l: int) -> Tensor:
        """K = a a^T (N, N) of layer l, shared by its units (computed once per batch)."""
        key = ("unit_k", l)
        if key not in bound.cache:
            a = bound.signals.layers[l].kron.a[:, 0].to(self.solve_dtype)
            bound.cache[key] = a @ a.T
        return bound.cache[key]

    def _layer_range(self, bound: BoundFisher, l: int) -> _Range | None:
        """At ρ = 0, when layer l's input signal a (N, p) has rank r < N (always when p < N), so that
        supports can exceed it: the orthonormal basis of a's column space, from the eigendecomposition
        of a^T a (p < N) or of K = a a^T, with the pseudo-inverse's cut-off N·eps·λ_max. None when
        K is nonsingular or ρ > 0."""
        if self.damping > 0:
            return None
        key = ("unit_range", l)
        if key not in bound.cache:
            a = bound.signals.layers[l].kron.a[:, 0].to(self.solve_dtype)
            n, p = a.shape
            rng = None
            if p < n or not bool(factored(*torch.linalg.cholesky_ex(self._layer_k(bound, l)))):
                ev, vec = torch.linalg.eigh(a.T @ a if p < n else self._layer_k(bound, l))
                keep = ev > n * torch.finfo(a.dtype).eps * ev[-1].clamp_min(torch.finfo(a.dtype).tiny)
                basis = a @ (vec[:, keep] / ev[keep].sqrt()) if p < n else vec[:, keep]
                low = basis.float() if basis.dtype == torch.float64 else None
                rng = _Range(rank=int(keep.sum()), basis=basis, basis_low=low, eig=ev[keep])
            bound.cache[key] = rng
        return bound.cache[key]

    def _rank_one_update(self, bound: BoundFisher, l: int, r: Tensor) -> list[Tensor]:
        layer = bound.signals.layers[l]
        a, n, m = layer.kron.a[:, 0], bound.n, layer.kron.out_width
        k = self._layer_k(bound, l)
        iterative = self.solver == "cg" or (self.solver == "auto" and self.damping > 0)
        pool = bound.cache.setdefault("unit_scratch", ScratchPool())  # shared by the layers of a step
        step = max(1, _CG_ELEMENTS // n) if iterative else m  # units per pass: bounded (U, N) arrays
        w = torch.empty(m, n, dtype=a.dtype, device=a.device)
        for lo in range(0, m, step):
            units = slice(lo, lo + step)
            s, d = self._unit_scales(layer, bound.metric, units)
            b = torch.einsum("mnk,nk->mn", d, r)  # δ_n · r_n
            if iterative:
                w[units] = cg_solve(
                    k, s, b, self.damping, tol=self.tol, maxiter=self.maxiter, certify=self.solver == "auto",
                    fallback=lambda s_left, b_left: self._solve_units(k, s_left, b_left[:, :, None])[:, :, 0],
                )  # fmt: skip
            else:
                w[units] = self._solve_units(k, s, b[:, :, None], pool, self._layer_range(bound, l))[:, :, 0]
        return layer.kron.to_params(padded_mm(w.div_(n), a))

    def _rank_one_coefficient(self, bound: BoundFisher, l: int, test: Signals) -> Tensor:
        n, c, nt = bound.n, bound.c, test.n
        layer, tl = bound.signals.layers[l], test.layers[l]
        k = self._layer_k(bound, l)
        k_cross = tl.kron.a[:, 0].to(self.solve_dtype) @ layer.kron.a[:, 0].to(self.solve_dtype).T / n  # (N′, N)
        s, d = self._unit_scales(layer, bound.metric)
        dt = tl.kron.d[:, :, 0].to(self.solve_dtype).permute(2, 1, 0)  # (M, N′, C)
        step = max(1, _CHUNK_ELEMENTS // (n * max(n, nt)))
        eye = torch.eye(n, dtype=k.dtype, device=k.device)
        total = torch.zeros(nt * c, n * c, dtype=self.solve_dtype, device=k.device)
        for lo in range(0, s.shape[0], step):
            sl = slice(lo, lo + step)
            m = s[sl].shape[0]
            # (S²K/N + ρ)^{-1} restricted to the columns it meets (δ vanishes elsewhere), (m, N, N)
            rhs = eye.expand(m, n, n) * (s[sl] > 0)[:, :, None]
            r_i = self._solve_units(k, s[sl], rhs, None, self._layer_range(bound, l))
            t_i = k_cross @ r_i  # (m, N′, N)
            total += torch.einsum("ipk,ipn,inj->pknj", dt[sl], t_i, d[sl]).reshape(nt * c, n * c)
        return total

    def _rank_one_trace(self, bound: BoundFisher, l: int) -> float:
        """Σ_i tr(Θ_{l,i} (Θ_{l,i} + ρ)^{-1}) without forming Θ̄: |S_i| − ρ ||L_i^{-1}||_F² per unit
        for the Cholesky factor L_i of its support system; at ρ = 0 the rank, min(|S_i|, rank a) for
        data in general position (|S_i| is (S.137))."""
        s, _ = self._unit_scales(bound.signals.layers[l], bound.metric)
        k = self._layer_k(bound, l)
        if self.damping == 0:  # rank Θ_{l,i} = min(|S_i|, rank a) for data in general position
            rng = self._layer_range(bound, l)
            sizes = self._support(k, s).sum(1)
            return float(sizes.sum() if rng is None else sizes.clamp_max(rng.rank).sum())
        chunks, ctx = self._plan(k, s)

        def job(units: Tensor) -> float:
            _, _, valid, chol, _ = self._factor(units, ctx)
            eye = torch.eye(chol.shape[-1], dtype=k.dtype, device=k.device).expand_as(chol)
            inv = torch.linalg.solve_triangular(chol, eye, upper=False) * valid[:, :, None]
            return float(valid.sum() - self.damping * (inv**2).sum())

        return sum(ordered_map(job, chunks))

    # ------------------------------------------------------------------ units by their Jacobians
    def _jacobian_units(self, bound: BoundFisher, l: int):
        """(route, J_u (U, N·C, p), inverse): (J_u^T Λ J_u / N + ρ)^{-1} (U, p, p) for "primal",
        (Λ J_u J_u^T / N + ρ)^{-1} (U, N·C, N·C) for "dual" (pseudo-inverses at ρ = 0)."""
        key = ("unit_jac", l)
        if key not in bound.cache:
            units = bound.signals.layers[l].units(self.solve_dtype)
            jac, n, lam = units.jac, bound.n, bound.metric
            if jac.shape[2] <= jac.shape[1]:
                lj = jac if lam is None else block_diag_metric(lam) @ jac
                f = jac.mT @ lj / n
                if self.damping > 0:
                    eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device).expand_as(f)
                    inv = solve_psd(f, eye, self.damping)
                else:
                    inv = pinv_psd(f)
                bound.cache[key] = ("primal", units, inv)
            else:
                k = jac @ jac.mT / n
                bound.cache[key] = ("dual", units, torch.stack([solve_with_metric(ku, lam, self.damping) for ku in k]))
        return bound.cache[key]

    def _jacobian_update(self, bound: BoundFisher, l: int, r: Tensor) -> list[Tensor]:
        route, units, inv = self._jacobian_units(bound, l)
        rf = r.reshape(-1)
        if route == "primal":
            w = (inv @ (units.jac.mT @ rf)[:, :, None])[:, :, 0] / bound.n
        else:
            w = (units.jac.mT @ (inv @ rf)[:, :, None])[:, :, 0] / bound.n
        return [t.to(bound.signals.f.dtype) for t in units.to_params(w)]

    def _jacobian_coefficient(self, bound: BoundFisher, l: int, test: Signals) -> Tensor:
        route, units, inv = self._jacobian_units(bound, l)
        jt = units.jac if test is bound.signals else test.layers[l].units(self.solve_dtype).jac
        if route == "primal":
            return (jt @ inv @ units.jac.mT).sum(0) / bound.n
        return ((jt @ units.jac.mT / bound.n) @ inv).sum(0)

    # ------------------------------------------------------------------ interface
    def _layer_updates(self, bound: BoundFisher, r: Tensor) -> list[list[Tensor]]:
        return [
            self._rank_one_update(bound, l, r) if self._rank_one(layer) else self._jacobian_update(bound, l, r)
            for l, layer in enumerate(bound.signals.layers)
        ]

    def _coefficient(self, bound: BoundFisher, test: Signals) -> Tensor:
        total = 0.0
        for l, layer in enumerate(bound.signals.layers):
            if self._rank_one(layer):
                total = total + self._rank_one_coefficient(bound, l, test)
            else:
                total = total + self._jacobian_coefficient(bound, l, test)
        return total

    def _alpha_hat(self, bound: BoundFisher) -> float:
        """tr(Θ̄ Λ) / (N·C), layer by layer; MLP layers without forming Θ̄ (see :meth:`_rank_one_trace`)."""
        total, lam = 0.0, bound.metric
        for l, layer in enumerate(bound.signals.layers):
            if self._rank_one(layer):
                total += self._rank_one_trace(bound, l)
            else:
                t = self._jacobian_coefficient(bound, l, bound.signals)
                total += float(torch.diagonal(t if lam is None else t @ block_diag_metric(lam)).sum())
        return total / (bound.n * bound.c)


def _partition(first: Tensor, count: Tensor) -> Tensor:
    """(M, N) row-wise orders putting the samples where ``first`` holds first, each part in
    increasing order (a stable partition; ``count`` = first.sum(1)), without sorting."""
    ones = first.to(torch.int32)
    rank = torch.where(first, ones.cumsum(1) - 1, count[:, None].to(torch.int32) + (1 - ones).cumsum(1) - 1)
    samples = torch.arange(first.shape[1], device=first.device).expand_as(rank)
    return torch.empty_like(samples).scatter_(1, rank.long(), samples)
