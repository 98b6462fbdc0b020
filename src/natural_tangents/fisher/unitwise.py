"""Unit-wise Fisher in dual form (docs/conventions.md; the paper's Appendix C, (S.129)–(S.141)).

Unit i of layer l owns θ_{l,i} = row i of [W_l | b_l]; its Jacobian is J_{l,i} = E_i a with
E_i[(n, k), n] = δ_{l,i}^{(k)}(x_n), so its Fisher block J_{l,i}^T Λ J_{l,i} / N + ρI is inverted
through N × N systems, batched over the M_l units of a layer. On the rows Ĵ = Λ^{1/2} J (:mod:`.rows`,
δ̃_n = Λ_n^{1/2} δ_n) and writing K = a a^T (N × N, shared by all units of the layer),
s_n² = |δ̃_n|² = δ_n^T Λ_n δ_n and b_n = δ̃_n · r̃_n = δ_n · r_n (δ_n the C-vector of unit i at
sample n), the push-through identity gives

    Δθ_{l,i} = a^T w / N,   w = (S² K / N + ρ)^{-1} b = S (S K S / N + ρ)^{-1} (b / s)

(one symmetric positive-definite solve per unit). Rows of a sample on which the unit is inactive
(s_n = 0, as for ReLU) decouple, so each solve is restricted to the unit's support, |S| × |S| —
about N/2 for ReLU, an eighth of the work. At ρ = 0 the limit is the pseudo-inverse (S.135):
w_S = N K_SS^{-1} (b / s²)_S while K_SS is invertible (|S| ≤ rank a); for larger supports it is the
weighted least-squares step pinv(S a_S) (b / s)_S, solved in the primal on a's column basis. For one
output, S K S / N is the paper's Θ_{l,i} = diag(δ_{l,i}) (σ_w² A_{l−1} + σ_b²) diag(δ_{l,i}) / N
(S.131), and on the training set Θ̄ = Σ_{l,i} Θ_{l,i} Θ_{l,i}^+ = Σ_{l,i} diag(1[δ_{l,i} ≠ 0]) (S.137):
α = Σ_{l<L} γ_l M_l / C (+ 1) (again while |S| ≤ rank a; beyond, Θ_{l,i} Θ_{l,i}^+ is a projector of rank rank a).
Never a (M_{l−1} + 1)² block per unit, never J.

The reference route is :func:`reference_solve`: per unit, one Cholesky factorization of its support
system in the solve precision (``solver="reference"``). The default routes compute the same
solutions faster: the batched support systems of :mod:`natural_tangents.linalg.unit_systems`
(``"direct"``) and, with damping, conjugate gradients whose every solution is certified to the
direct route's backward error (``"auto"``).

Layers with positions (convolutions: a unit is an output channel, its filter with its bias) and
generic modules (one unit: the whole module) go through their units' per-sample Jacobians J_u
(N·C × p): each unit's block J_u^T Λ J_u / N + ρ I is inverted as it is (p × p) when p ≤ N·C, and in
dual form (N·C × N·C) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from ..curvature import LayerCurvature
from ..layers.base import LayerSignals, Units, padded_mm
from ..linalg.lapack import ScratchPool, factored
from ..linalg.psd import PSDInverse, pinv_psd
from ..linalg.support import cg_solve
from ..linalg.unit_systems import ColumnBasis, UnitSystems
from .base import Fisher
from .bound import BoundFisher

__all__ = ["Unitwise", "UnitwiseBatch", "UnitRoute", "JacobianUnits", "reference_solve"]


def reference_solve(k: Tensor, s: Tensor, rhs: Tensor, damping: float, support: Tensor) -> Tensor:
    """The reference route for the units' systems of one layer: for each unit i, on its support S_i,

        w_i = S_i (S_i K_SS S_i / N + ρ)^{-1} (rhs_i / s_i)      (ρ > 0)
        w_i = S_i (S_i K_SS S_i)^+ S_i · N rhs_i                 (ρ = 0, the pseudo-inverse limit)

    one dense factorization per unit in K's precision, 0 off the support. k (N, N), s (M, N),
    rhs (M, N, R), support (M, N) bool. Slow and plain: what the fast routes are tested against."""
    n = k.shape[0]
    out = torch.zeros_like(rhs)
    for i in range(s.shape[0]):
        idx = torch.nonzero(support[i])[:, 0]
        if len(idx) == 0:
            continue
        si = s[i, idx]
        sub = k[idx][:, idx] * si[:, None] * si[None, :]
        if damping > 0:
            out[i, idx] = si[:, None] * PSDInverse.of(sub / n, damping).solve(rhs[i, idx] / si[:, None])
        else:
            out[i, idx] = n * si[:, None] * (pinv_psd(sub) @ (si[:, None] * rhs[i, idx]))
    return out


class UnitRoute(Enum):
    """How a layer's units are solved."""

    #: one-position affine layers (MLP-like): batched N × N systems on each unit's support, shared K
    RANK_ONE = "rank_one"
    #: other layers: each unit's block from its per-sample Jacobian, as it is (p × p, p ≤ N·R) …
    PRIMAL = "primal"
    #: … or in dual form (N·R × N·R)
    DUAL = "dual"


@dataclass(frozen=True)
class JacobianUnits:
    """The units of a layer without rank-one structure: their Jacobians (``units.jac`` (U, N·R, p))
    and inverses, (J_u^T J_u / N + ρ)^{-1} (U, p, p) for PRIMAL or (J_u J_u^T / N + ρ)^{-1}
    (U, N·R, N·R) for DUAL (pseudo-inverses at ρ = 0)."""

    route: UnitRoute
    units: Units
    inverse: Tensor


class UnitwiseBatch(BoundFisher):
    """The unit-wise Fisher bound to a batch: per layer its route, shared kernel K and (at ρ = 0) column
    basis, computed once for the update, Θ̄ and α̂."""

    @cached_property
    def routes_by_layer(self) -> list[UnitRoute]:
        out = []
        for layer in self.row_signals:
            if layer.rank_one:
                out.append(UnitRoute.RANK_ONE)
            else:
                jac_shape = layer.units().jac.shape if layer.kronecker is None else None
                p = jac_shape[2] if jac_shape is not None else layer.kronecker.in_width
                out.append(UnitRoute.PRIMAL if p <= self.n * self.r else UnitRoute.DUAL)
        return out

    @cached_property
    def scratch(self) -> ScratchPool:
        """Buffers for the batched systems, shared by the layers of a step."""
        return ScratchPool()

    @cached_property
    def layer_grams(self) -> dict[int, Tensor]:
        """K = a a^T (N, N) of each RANK_ONE layer, in the solve dtype (shared by its units)."""
        out = {}
        for l, route in enumerate(self.routes_by_layer):
            if route is UnitRoute.RANK_ONE:
                a = self.row_signals[l].kronecker.a[:, 0].to(self.solve_dtype)
                out[l] = a @ a.T
        return out

    @cached_property
    def column_bases(self) -> dict[int, ColumnBasis | None]:
        """At ρ = 0, for each RANK_ONE layer whose input signal a (N, p) has rank r < N (always when
        p < N), so that supports can exceed it: the orthonormal basis of a's column space, from the
        eigendecomposition of a^T a (p < N) or of K = a a^T, with the pseudo-inverse's cut-off
        N·eps·λ_max. None when K is nonsingular or ρ > 0."""
        out: dict[int, ColumnBasis | None] = {}
        for l, k in self.layer_grams.items():
            out[l] = None
            if self.fisher.damping > 0:
                continue
            a = self.row_signals[l].kronecker.a[:, 0].to(self.solve_dtype)
            n, p = a.shape
            if p < n or not bool(factored(*torch.linalg.cholesky_ex(k))):
                ev, vec = torch.linalg.eigh(a.T @ a if p < n else k)
                keep = ev > n * torch.finfo(a.dtype).eps * ev[-1].clamp_min(torch.finfo(a.dtype).tiny)
                basis = a @ (vec[:, keep] / ev[keep].sqrt()) if p < n else vec[:, keep]
                low = basis.float() if basis.dtype == torch.float64 else None
                out[l] = ColumnBasis(rank=int(keep.sum()), basis=basis, basis_low=low, eig=ev[keep])
        return out

    def systems(self, l: int) -> UnitSystems:
        """The fast solver of layer ``l``'s support systems."""
        f = self.fisher
        return UnitSystems(
            self.layer_grams[l], f.damping, f.rcond, self.options, self.scratch, self.column_bases[l], self.routes
        )

    def unit_scales(self, l: int, units: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """s (M, N) with s_n² = |δ̃_n|² = δ_n^T Λ_n δ_n, and δ̃ itself as (M, N, R) (of the units ``units``)."""
        d = self.row_signals[l].kronecker.d[:, :, 0, units].to(self.solve_dtype).permute(2, 1, 0)  # (M, N, R)
        return (d * d).sum(-1).sqrt(), d

    def solve_units(self, l: int, s: Tensor, rhs: Tensor) -> Tensor:
        """(S_i² K / N + ρ)^{-1} rhs_i for every unit of layer ``l`` (rhs (M, N, R), 0 off the support):
        the reference route for ``solver="reference"``, the batched support systems otherwise."""
        systems = self.systems(l)
        if self.fisher.solver == "reference":
            self.routes["reference"] += len(s)
            return reference_solve(self.layer_grams[l], s, rhs, self.fisher.damping, systems.support(s))
        return systems.solve(s, rhs)

    # ------------------------------------------------------------------ RANK_ONE layers
    def _unit_passes(self, l: int) -> list[slice]:
        """The units of layer ``l`` in passes of bounded (U, N) arrays for the iterative route."""
        fisher, m = self.fisher, self.row_signals[l].kronecker.out_width
        iterative = fisher.solver == "cg" or (fisher.solver == "auto" and fisher.damping > 0)
        step = max(1, self.options.cg_elements // self.n) if iterative else m
        return [slice(lo, lo + step) for lo in range(0, m, step)]

    def _rank_one_update(self, l: int, r: Tensor) -> list[Tensor]:
        layer, n = self.row_signals[l], self.n
        a = layer.kronecker.a[:, 0]
        w = torch.empty(layer.kronecker.out_width, n, dtype=a.dtype, device=a.device)
        for units in self._unit_passes(l):
            s, d = self.unit_scales(l, units)
            w[units] = self._rank_one_solve(l, units, s, torch.einsum("mnk,nk->mn", d, r))  # b = δ̃_n · r̃_n
        return layer.kronecker.to_params(padded_mm(w.div_(n), a))

    def _rank_one_precondition(self, l: int, g: list[Tensor]) -> list[Tensor]:
        """(F_i + ρ)^{-1} g_i for every unit, F_i = a^T S_i² a / N: by Woodbury's identity
        (g_i − a^T w_i / N) / ρ with w_i = (S_i² K / N + ρ)^{-1} (s_i² ⊙ a g_i)."""
        kr, n, rho = self.row_signals[l].kronecker, self.n, self.fisher.damping
        a = kr.a[:, 0].to(self.solve_dtype)
        mat = kr.from_params(g).to(self.solve_dtype)  # (M, p): row i is g_i
        w = torch.empty(kr.out_width, n, dtype=self.solve_dtype, device=a.device)
        for units in self._unit_passes(l):
            s, _ = self.unit_scales(l, units)
            w[units] = self._rank_one_solve(l, units, s, s * s * (mat[units] @ a.T))
        return kr.to_params(((mat - w @ a / n) / rho).to(kr.dtype))

    def _rank_one_solve(self, l: int, units: slice, s: Tensor, b: Tensor) -> Tensor:
        """w = (S² K / N + ρ)^{-1} b for the units ``units`` of layer ``l`` (b (u, N), 0 off the support),
        by the route of ``solver``."""
        fisher, k = self.fisher, self.layer_grams[l]
        if fisher.solver == "cg" or (fisher.solver == "auto" and fisher.damping > 0):
            return cg_solve(
                k, s, b, fisher.damping, tol=fisher.tol, maxiter=fisher.maxiter, certify=fisher.solver == "auto",
                fallback=lambda s_left, b_left: self._fallback(l, s_left, b_left), options=self.options,
            )  # fmt: skip
        return self.solve_units(l, s, b[:, :, None])[:, :, 0]

    def _fallback(self, l: int, s: Tensor, b: Tensor) -> Tensor:
        """The units that conjugate gradients did not certify, by the direct route."""
        self.routes["cg fallback"] += len(s)
        return self.solve_units(l, s, b[:, :, None])[:, :, 0]

    def _rank_one_coefficient(self, l: int, test: LayerSignals) -> Tensor:
        n, layer = self.n, self.row_signals[l]
        nt, ct, r = test.n, test.c, layer.c
        k = self.layer_grams[l]
        sd = self.solve_dtype
        k_cross = test.kronecker.a[:, 0].to(sd) @ layer.kronecker.a[:, 0].to(sd).T / n  # (N′, N)
        s, d = self.unit_scales(l)
        dt = test.kronecker.d[:, :, 0].to(sd).permute(2, 1, 0)  # (M, N′, C′)
        step = max(1, self.options.chunk_elements // (n * max(n, nt)))
        eye = torch.eye(n, dtype=k.dtype, device=k.device)
        total = torch.zeros(nt * ct, n * r, dtype=sd, device=k.device)
        for lo in range(0, s.shape[0], step):
            sl = slice(lo, lo + step)
            m = s[sl].shape[0]
            # (S²K/N + ρ)^{-1} restricted to the columns it meets (δ vanishes elsewhere), (m, N, N)
            rhs = eye.expand(m, n, n) * (s[sl] > 0)[:, :, None]
            r_i = self.solve_units(l, s[sl], rhs)
            t_i = k_cross @ r_i  # (m, N′, N)
            total += torch.einsum("ipk,ipn,inj->pknj", dt[sl], t_i, d[sl]).reshape(nt * ct, n * r)
        return total

    # ------------------------------------------------------------------ units by their Jacobians
    @cached_property
    def jacobian_units(self) -> dict[int, JacobianUnits]:
        """PRIMAL and DUAL layers: their units' Jacobians and block inverses."""
        out = {}
        for l, route in enumerate(self.routes_by_layer):
            if route is UnitRoute.RANK_ONE:
                continue
            layer, sd = self.row_signals[l], self.solve_dtype
            net = layer.units()  # the Grams in the network's precision (as K-FAC's), factored in solve_dtype
            jac, n, rho = net.jac, self.n, self.fisher.damping
            if route is UnitRoute.PRIMAL:
                inv = PSDInverse.of((jac.mT @ jac).to(sd) / n, rho, overwrite=True, routes=self.routes).matrix()
            else:
                grams = (jac @ jac.mT).to(sd) / n
                inv = torch.stack([PSDInverse.of(k, rho, overwrite=True, routes=self.routes).matrix() for k in grams])
            units = net if jac.dtype == sd else Units(jac=jac.to(sd), to_params=net.to_params)
            out[l] = JacobianUnits(route, units, inv)
        return out

    def _jacobian_update(self, l: int, r: Tensor) -> list[Tensor]:
        ju = self.jacobian_units[l]
        rf = r.reshape(-1)
        if ju.route is UnitRoute.PRIMAL:
            w = (ju.inverse @ (ju.units.jac.mT @ rf)[:, :, None])[:, :, 0] / self.n
        else:
            w = (ju.units.jac.mT @ (ju.inverse @ rf)[:, :, None])[:, :, 0] / self.n
        return [t.to(self.signals.f.dtype) for t in ju.units.to_params(w)]

    def _jacobian_coefficient(self, l: int, test: LayerSignals) -> Tensor:
        ju = self.jacobian_units[l]
        jt = ju.units.jac if test is self.row_signals[l] else test.units(self.solve_dtype).jac
        if ju.route is UnitRoute.PRIMAL:
            return (jt @ ju.inverse @ ju.units.jac.mT).sum(0) / self.n
        return ((jt @ ju.units.jac.mT / self.n) @ ju.inverse).sum(0)

    def _jacobian_precondition(self, l: int, g: list[Tensor]) -> list[Tensor]:
        ju, rho = self.jacobian_units[l], self.fisher.damping
        layer = self.row_signals[l]
        if layer.kronecker is not None:
            gu = layer.kronecker.from_params(g).to(self.solve_dtype)  # (U, p): a unit per output channel
        else:
            gu = torch.cat([t.reshape(-1) for t in g]).to(self.solve_dtype)[None]  # the module is one unit
        if ju.route is UnitRoute.PRIMAL:
            w = (ju.inverse @ gu[:, :, None])[:, :, 0]
        else:  # (g_u − J_u^T (K_u + ρ)^{-1} J_u g_u / N) / ρ
            z = (ju.units.jac @ gu[:, :, None]) / self.n
            w = (gu - (ju.units.jac.mT @ (ju.inverse @ z))[:, :, 0]) / rho
        return [t.to(self.signals.f.dtype) for t in ju.units.to_params(w)]

    def curvature_blocks(self) -> list[LayerCurvature]:
        """This batch's unit blocks in parameter space, per layer (for curvature kept across
        mini-batches): F_i = Σ_n s_{i,n}² a_n a_n^T / N for one-position layers, J_u^T J_u / N for the
        units of other layers, (U, p, p) each."""
        n, out = self.n, []
        for l, route in enumerate(self.routes_by_layer):
            layer = self.row_signals[l]
            if route is UnitRoute.RANK_ONE:
                kr = layer.kronecker
                a, d = kr.a[:, 0], kr.d[:, :, 0]  # (N, p), (R, N, M)
                s2 = (d * d).sum(0)  # (N, M)
                outer = (a[:, :, None] * a[:, None, :]).reshape(n, -1)  # (N, p²)
                out.append(LayerCurvature("blocks", ((s2.T @ outer / n).reshape(-1, a.shape[1], a.shape[1]),)))
            else:
                jac = layer.units().jac
                out.append(LayerCurvature("blocks", (jac.mT @ jac / n,)))
        return out

    # ------------------------------------------------------------------ interface
    def _precondition(self, grads: list[list[Tensor]]) -> list[list[Tensor]]:
        return [
            self._rank_one_precondition(l, g) if route is UnitRoute.RANK_ONE else self._jacobian_precondition(l, g)
            for l, (route, g) in enumerate(zip(self.routes_by_layer, grads))
        ]

    def _updates(self, r: Tensor) -> list[list[Tensor]]:
        return [
            self._rank_one_update(l, r) if route is UnitRoute.RANK_ONE else self._jacobian_update(l, r)
            for l, route in enumerate(self.routes_by_layer)
        ]

    def _coefficient(self, test: tuple[LayerSignals, ...]) -> Tensor:
        total = 0.0
        for l, route in enumerate(self.routes_by_layer):
            if route is UnitRoute.RANK_ONE:
                total = total + self._rank_one_coefficient(l, test[l])
            else:
                total = total + self._jacobian_coefficient(l, test[l])
        return total

    def _trace(self) -> float:
        """tr(Θ̄ Λ), layer by layer; RANK_ONE layers without forming Θ̄ (:meth:`UnitSystems.trace`)."""
        total = 0.0
        for l, route in enumerate(self.routes_by_layer):
            if route is UnitRoute.RANK_ONE:
                total += self.systems(l).trace(self.unit_scales(l)[0])
            else:
                total += float(torch.diagonal(self._jacobian_coefficient(l, self.row_signals[l])).sum())
        return total


@dataclass(frozen=True, kw_only=True)
class Unitwise(Fisher):
    """Unit-wise Fisher: block diagonal over the units (l, i) (the paper's (S.129)).

    Args:
        rcond: at ρ = 0, the pseudo-inverse's relative cut-off: sample n counts as active for unit i
            when the diagonal entry s_n² K_nn / N of Θ_{l,i} exceeds ``rcond`` times the unit's largest
            one (exact zeros, as ReLU's, are always inactive).
        solver: how the update solves the units' systems of MLP-like layers. ``"reference"``: one
            plain Cholesky factorization per unit on its support (:func:`reference_solve`; slow).
            ``"direct"``: the same systems batched by support size, refined from float32 where large
            (:mod:`natural_tangents.linalg.unit_systems`). ``"cg"``: conjugate gradients on all units of a layer at once
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
    batch_type: ClassVar[type] = UnitwiseBatch

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in ("auto", "direct", "cg", "reference"):
            raise ValueError(f"solver: expected 'auto', 'direct' (Cholesky), 'cg' or 'reference', got {self.solver!r}")
        if self.solver == "cg" and self.damping == 0:
            raise ValueError(
                "solver: 'cg' needs damping > 0 (the zero-damping limit is a pseudo-inverse); use solver='direct'"
            )
        if not (0 < self.tol < 1):
            raise ValueError(f"tol: expected a relative residual in (0, 1), got {self.tol}")
        if int(self.maxiter) != self.maxiter or self.maxiter < 1:
            raise ValueError(f"maxiter: expected a positive integer, got {self.maxiter}")
