"""Layer-wise Fishers with any L × L pattern Σ, in dual form (docs/conventions.md; the paper's Appendix B).

    G = S^T (Σ ⊗ Λ) S / N + ρ I,   S = blockdiag(J_1, …, J_L)   (S.72)

The push-through identity turns the P × P inverse into one L·N·C × L·N·C system (S.73), written on
the rows Ĵ = Λ^{1/2} J (:mod:`.rows`; Θ_l below is Λ^{1/2} Θ_l Λ^{1/2} with an output metric):

    ((Σ ⊗ I) blockdiag(Θ_l) + ρ I) v = 1_L ⊗ r̃,   Δθ_l = Ĵ_l^T v_l / N

At ρ = 0 it decouples (S.74), (S.89): v_l = (Σ^{-1} 1)_l Θ_l^+ r̃, so that on the training set
Θ̄ = Σ_l (Σ^{-1} 1)_l Θ_l Θ_l^+ = (1^T Σ^{-1} 1) I (S.71). The system is solved by one of three
routes (:class:`LayerwiseRoute`): decoupled per layer (ρ = 0 or a diagonal Σ), block elimination
(tri-diagonal Σ), or the whole system. A singular Σ (the tri-diagonal one at
depth L = 3s + 2, (S.92)) has no ρ → 0 limit and raises; the exact Fisher Σ = 1 1^T goes through
:class:`~natural_tangents.fisher.Exact` instead (S.91).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..curvature import LayerCurvature
from ..linalg.psd import PSDInverse
from ..linalg.tridiagonal import TridiagonalSystem
from .base import Fisher
from .bound import DualBatch

__all__ = [
    "Layerwise",
    "LayerwiseBatch",
    "LayerwiseRoute",
    "BlockDiagonal",
    "BlockTriDiagonal",
    "tridiagonal_sigma",
    "check_invertible_sigma",
]


def tridiagonal_sigma(depth: int) -> Tensor:
    """Σ_{ll′} = 1 if |l − l′| ≤ 1 else 0, shape (L, L), float64 (the block tri-diagonal pattern)."""
    idx = torch.arange(depth)
    return ((idx[:, None] - idx[None, :]).abs() <= 1).to(torch.float64)


def _identity_sigma(depth: int) -> Tensor:
    return torch.eye(depth, dtype=torch.float64)


def check_invertible_sigma(sigma: Tensor) -> None:
    """Raise ValueError when the pattern Σ (L, L) is numerically singular (condition number above
    1e12): then the zero-damping limit of the layer-wise Fisher and the α = 1^T Σ^{-1} 1 of the theory
    do not exist. The one criterion both use."""
    depth = sigma.shape[0]
    if float(torch.linalg.cond(sigma)) > 1e12:
        raise ValueError(
            f"sigma: Σ is singular at depth L = {depth} (e.g. the block tri-diagonal pattern at "
            "L = 3s + 2, the paper's (S.92)), so the zero-damping limit and α = 1^T Σ^{-1} 1 do not exist; "
            "use damping > 0, another depth, or nat.fisher.Exact for Σ = 1 1^T"
        )


def _bandwidth(s: Tensor) -> int:
    """The largest |l − l′| with Σ_{ll′} ≠ 0."""
    nz = s.nonzero()
    return int((nz[:, 0] - nz[:, 1]).abs().max()) if len(nz) else 0


class LayerwiseRoute(Enum):
    """How the layer-wise dual system is solved."""

    #: ρ = 0 (S.74) or a diagonal Σ: one N·R × N·R system per layer
    DECOUPLED = "decoupled"
    #: ρ = 0 with a coupling Σ and a singular Θ_l: the limit on the layers' ranges (see ``projected``)
    PROJECTED = "projected"
    #: a tri-diagonal Σ: block elimination, O(L (N·R)³) (:mod:`natural_tangents.linalg.tridiagonal`)
    TRIDIAGONAL = "tridiagonal"
    #: any other Σ (or a singular pivot block): the whole (L·N·R)² system by LU
    DENSE = "dense"


class LayerwiseBatch(DualBatch):
    """A layer-wise Fisher bound to a batch: its route (a :class:`LayerwiseRoute`) and the route's
    factorizations, computed once for the update, Θ̄ and α̂."""

    @cached_property
    def sigma(self) -> Tensor:
        """Σ for this batch's depth, (L, L) float64, validated."""
        return self.fisher.sigma_matrix(self.depth)

    @cached_property
    def route(self) -> LayerwiseRoute:
        s = self.sigma
        diagonal = bool((s == torch.diag(torch.diagonal(s))).all())
        if self.fisher.damping == 0:
            singular = any(inv.chol is None for _, inv in self.layer_inverses)
            return LayerwiseRoute.PROJECTED if singular and not diagonal else LayerwiseRoute.DECOUPLED
        if diagonal:
            return LayerwiseRoute.DECOUPLED
        if _bandwidth(s) == 1 and self.tridiagonal is not None:
            return LayerwiseRoute.TRIDIAGONAL
        return LayerwiseRoute.DENSE

    @cached_property
    def layer_inverses(self) -> list[tuple[float, PSDInverse]]:
        """DECOUPLED: per layer, its weight c_l and (Σ_ll Θ_l + ρ)^{-1}; at ρ = 0, c_l = (Σ^{-1} 1)_l and Θ_l^+."""
        thetas, rho = self.layer_kernels, self.fisher.damping
        if rho == 0:
            c = self.fisher.sigma_weights(self.depth).tolist()
            return [(c[l], PSDInverse.of(thetas[l], 0.0, routes=self.routes)) for l in range(self.depth)]
        diag = torch.diagonal(self.sigma).tolist()
        scaled = [thetas[l] if diag[l] == 1.0 else diag[l] * thetas[l] for l in range(self.depth)]
        return [(1.0, PSDInverse.of(t, rho, routes=self.routes)) for t in scaled]

    @cached_property
    def projected(self) -> tuple[list[Tensor], Tensor, Tensor]:
        """PROJECTED: the ρ → 0⁺ limit when a layer's Θ_l is singular and Σ couples layers, where the
        decoupled (S.74) is not the limit. On the layers' ranges Θ_l = U_l diag(λ_l) U_l^T, the
        layer-wise Fisher is G = B M B^T / N in orthonormal coordinates B, with
        M = λ^{1/2} [Σ_{lm} U_l^T U_m] λ^{1/2} (symmetric, indefinite for an indefinite Σ), so the
        limit G^+ ∇L has dual vectors v = U λ^{-1/2} M^+ λ^{1/2} U^T (1 ⊗ r̃), which is (S.74) when
        every Θ_l is nonsingular. Returns the bases U_l, λ^{1/2} (concatenated) and M^+."""
        bases, roots = [], []
        for theta in self.layer_kernels:
            ev, vec = torch.linalg.eigh(0.5 * (theta + theta.mT))
            keep = ev > ev.shape[0] * torch.finfo(ev.dtype).eps * ev.abs().max()
            bases.append(vec[:, keep])
            roots.append(ev[keep].sqrt())
        self.routes["eigh"] += len(bases)
        sv = self.sigma.tolist()
        rows = [
            torch.cat([sv[l][m] * (bases[l].T @ bases[m]) for m in range(self.depth)], 1) for l in range(self.depth)
        ]
        root = torch.cat(roots)
        m = root[:, None] * torch.cat(rows, 0) * root[None, :]
        return bases, root, torch.linalg.pinv(0.5 * (m + m.T), hermitian=True)

    def _projected(self, rhs: list[Tensor]) -> list[Tensor]:
        """PROJECTED: v_l for right-hand sides rhs_l (N·R, R′)."""
        bases, root, pinv = self.projected
        z = (pinv @ (root[:, None] * torch.cat([u.T @ b for u, b in zip(bases, rhs)]))) / root[:, None]
        out, start = [], 0
        for u in bases:
            out.append(u @ z[start : start + u.shape[1]])
            start += u.shape[1]
        return out

    @cached_property
    def tridiagonal(self) -> TridiagonalSystem | None:
        """TRIDIAGONAL: the block elimination (None when it meets a singular pivot block)."""
        thetas = self.layer_kernels
        system = TridiagonalSystem(
            self.sigma.to(dtype=thetas.dtype, device=thetas.device),
            thetas,
            self.fisher.damping,
            symmetric=True,
            options=self.options,
            routes=self.routes,
        )
        return system if system.factored else None

    @cached_property
    def dense(self) -> tuple[Tensor, Tensor]:
        """DENSE: the LU factors of the whole system (Σ ⊗ I) blockdiag(Θ_l) + ρ I."""
        thetas = self.layer_kernels
        depth, nf = thetas.shape[0], thetas.shape[1]
        s = self.sigma.to(dtype=thetas.dtype, device=thetas.device)
        big = (s[:, None, :, None] * thetas.permute(1, 0, 2)[None]).reshape(depth * nf, depth * nf)
        big.diagonal().add_(self.fisher.damping)
        lu, piv = torch.linalg.lu_factor(big)
        self.routes["lu"] += 1
        return lu, piv

    def _dual_vectors(self, r: Tensor) -> list[Tensor]:
        return self._solve_blocks([r] * self.depth)

    def _solve_blocks(self, rhs: list[Tensor]) -> list[Tensor]:
        """v with ((Σ ⊗ I) blockdiag(Θ_l) + ρ I) v = rhs (L blocks (N·R,)); at ρ = 0 (S.74)."""
        if self.route is LayerwiseRoute.DECOUPLED:
            return [c * inv.solve(b[:, None])[:, 0] for (c, inv), b in zip(self.layer_inverses, rhs)]
        if self.route is LayerwiseRoute.PROJECTED:
            return [v[:, 0] for v in self._projected([b[:, None] for b in rhs])]
        if self.route is LayerwiseRoute.TRIDIAGONAL:
            v = self.tridiagonal.solve([b[:, None] for b in rhs])
            if v is not None:
                return [x[:, 0] for x in v]
        return list(self._dense_solve(torch.cat(rhs)[:, None])[:, 0].reshape(self.depth, -1))

    def _precondition(self, grads: list[list[Tensor]]) -> list[list[Tensor]]:
        """(S^T (Σ ⊗ I) S / N + ρ I)^{-1} g = (g − S^T v) / ρ, v = ((Σ ⊗ I) K + ρ I)^{-1} (Σ ⊗ I) S g / N."""
        z = self._row_products(grads)
        sigma = self.sigma.tolist()
        rhs = [sum(sigma[l][m] * z[m] for m in range(self.depth) if sigma[l][m] != 0.0) for l in range(self.depth)]
        return self._woodbury(grads, self._solve_blocks(rhs))

    def _dense_solve(self, rhs: Tensor) -> Tensor:
        return torch.linalg.lu_solve(*self.dense, rhs)

    def curvature_blocks(self) -> list[LayerCurvature]:
        """This batch's layer blocks Σ_ll J_l^T J_l / N in parameter space (for curvature kept across
        mini-batches): only for a diagonal Σ, and for layers of at most 4096 parameters."""
        s = self.sigma
        if not bool((s == torch.diag(torch.diagonal(s))).all()):
            raise ValueError(
                f"{self.fisher.label}: its Σ couples layers, so its parameter-space form is one P × P matrix; it stays "
                "per-batch (dual form): use curvature_every=1, inverse_every=1, ema=0, or nat.fisher.BlockDiagonal"
            )
        out = []
        for l, layer in enumerate(self.row_signals):
            if layer.num_params > 4096:
                raise ValueError(
                    f"{self.fisher.label}: {layer.name} has {layer.num_params} parameters, too many to hold its block "
                    "across mini-batches; it stays per-batch (dual form), or use nat.fisher.KFAC or nat.fisher.Unitwise"
                )
            j = layer.jacobian()
            out.append(LayerCurvature("blocks", ((j.T @ j * (float(s[l, l]) / self.n))[None],)))
        return out

    def _make_dual_matrices(self) -> list[Tensor]:
        """The X_l of Θ̄. At ρ = 0 always the paper's (S.71), X_l = (Σ^{-1} 1)_l Θ_l^+: with a singular Θ_l
        and a coupling Σ, J G^+ J^T / N has no ρ → 0⁺ limit (J^T reaches outside the range of G), while
        (S.71) gives the same function-space step on the training set as the update's limit."""
        if self.route in (LayerwiseRoute.DECOUPLED, LayerwiseRoute.PROJECTED):
            return [c * inv.matrix() for c, inv in self.layer_inverses]
        nf = self.layer_kernels.shape[1]
        eye = torch.eye(nf, dtype=self.layer_kernels.dtype, device=self.layer_kernels.device)
        if self.route is LayerwiseRoute.TRIDIAGONAL:
            v = self.tridiagonal.solve(eye)
            if v is not None:
                return v
        return list(self._dense_solve(eye.repeat(self.depth, 1)).reshape(self.depth, nf, nf))


@dataclass(frozen=True, kw_only=True)
class Layerwise(Fisher):
    """Layer-wise Fisher with pattern Σ (the paper's (S.72)); the blocks are the model's parameterized
    layers (for a user model: the modules holding parameters, in ``model.parameters()`` order).

    Args:
        sigma: an (L, L) symmetric array, or a callable depth → (L, L) array.
        damping, loss, solve_dtype: see :class:`~natural_tangents.fisher.base.Fisher`.
    """

    sigma: Tensor | np.ndarray | Callable[[int], Tensor] | None = None

    name: ClassVar[str] = "layerwise"
    label: ClassVar[str] = "Layer-wise"
    batch_type: ClassVar[type] = LayerwiseBatch

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sigma is None:
            raise ValueError("sigma: Layerwise needs an (L, L) pattern Σ or a callable depth -> Σ")

    def sigma_matrix(self, depth: int) -> Tensor:
        """Σ for a network of ``depth`` layers, (L, L) float64; validated."""
        s = self.sigma(depth) if callable(self.sigma) else self.sigma
        s = torch.as_tensor(np.asarray(s, dtype=np.float64) if not isinstance(s, Tensor) else s)
        s = s.to(torch.float64)
        if s.shape != (depth, depth):
            raise ValueError(f"sigma: expected an ({depth}, {depth}) matrix for this depth, got {tuple(s.shape)}")
        if not bool(torch.isfinite(s).all()) or not torch.allclose(s, s.T):
            raise ValueError("sigma: Σ must be a finite symmetric matrix (the Fisher is symmetric)")
        return s

    def check_amortizable(self, depth: int) -> None:
        s = self.sigma_matrix(depth)
        if not bool((s == torch.diag(torch.diagonal(s))).all()):
            raise ValueError(
                f"{self.label}: its Σ couples layers, so its parameter-space form is one P × P matrix; it stays "
                "per-batch (dual form): use curvature_every=1, inverse_every=1, ema=0, or nat.fisher.BlockDiagonal"
            )

    def sigma_weights(self, depth: int) -> Tensor:
        """c = Σ^{-1} 1 (the per-layer weights of (S.71)); raises for a singular Σ."""
        s = self.sigma_matrix(depth)
        check_invertible_sigma(s)
        return torch.linalg.solve(s, torch.ones(depth, dtype=torch.float64))


@dataclass(frozen=True, kw_only=True)
class BlockDiagonal(Layerwise):
    """Block-diagonal Fisher, Σ = I: α = L (the paper's Theorem 4.1)."""

    sigma: Callable[[int], Tensor] | None = field(default=None, repr=False, compare=False)
    name: ClassVar[str] = "block_diagonal"
    label: ClassVar[str] = "Block diagonal"
    aliases: ClassVar[tuple[str, ...]] = ("blockdiagonal", "bd")

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", _identity_sigma)
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class BlockTriDiagonal(Layerwise):
    """Block tri-diagonal Fisher, Σ_{ll′} = 1 if |l − l′| ≤ 1 (the paper's Lemma 4.3): α = s for L = 3s,
    s + 1 for L = 3s + 1; Σ is singular for L = 3s + 2."""

    sigma: Callable[[int], Tensor] | None = field(default=None, repr=False, compare=False)
    name: ClassVar[str] = "block_tridiagonal"
    label: ClassVar[str] = "Block tri-diagonal"
    aliases: ClassVar[tuple[str, ...]] = ("blocktridiagonal", "tridiagonal")

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", tridiagonal_sigma)
        super().__post_init__()
