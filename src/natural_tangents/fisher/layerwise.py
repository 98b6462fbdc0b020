"""Layer-wise Fishers with any L × L pattern Σ, in dual form (docs/conventions.md; the paper's Appendix B).

    G = S^T (Σ ⊗ Λ) S / N + ρ I,   S = blockdiag(J_1, …, J_L)   (S.72)

The push-through identity turns the P × P inverse into one L·N·C × L·N·C system (S.73):

    ((Σ ⊗ Λ) blockdiag(Θ_l) + ρ I) v = 1_L ⊗ r,   Δθ_l = J_l^T v_l / N

At ρ = 0 it decouples (S.74), (S.89): v_l = (Σ^{-1} 1)_l Θ_l^+ Λ^{-1} r, so that on the training set
Θ̄ = Σ_l (Σ^{-1} 1)_l Θ_l Θ_l^+ = (1^T Σ^{-1} 1) I (S.71). A singular Σ (the tri-diagonal one at
depth L = 3s + 2, (S.92)) has no ρ → 0 limit and raises; the exact Fisher Σ = 1 1^T goes through
:class:`~natural_tangents.fisher.Exact` instead (S.91).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from .base import BoundFisher, DualFisher, Whitening, inverse_psd, solve_psd
from .block_tridiagonal import block_tridiagonal_solve

__all__ = ["Layerwise", "BlockDiagonal", "BlockTriDiagonal", "tridiagonal_sigma", "check_invertible_sigma"]


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


@dataclass(frozen=True, kw_only=True)
class Layerwise(DualFisher):
    """Layer-wise Fisher with pattern Σ (the paper's (S.72)); the blocks are the model's parameterized
    layers (for a user model: the modules holding parameters, in ``model.parameters()`` order).

    Args:
        sigma: an (L, L) symmetric array, or a callable depth → (L, L) array.
        damping, loss, solve_dtype: see :class:`~natural_tangents.fisher.base.Fisher`.
    """

    sigma: Tensor | np.ndarray | Callable[[int], Tensor] | None = None

    name: ClassVar[str] = "layerwise"
    label: ClassVar[str] = "Layer-wise"

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

    def sigma_weights(self, depth: int) -> Tensor:
        """c = Σ^{-1} 1 (the per-layer weights of (S.71)); raises for a singular Σ."""
        s = self.sigma_matrix(depth)
        check_invertible_sigma(s)
        return torch.linalg.solve(s, torch.ones(depth, dtype=torch.float64))

    def _dual_vectors(self, bound: BoundFisher, r: Tensor) -> list[Tensor]:
        """v_l from one solve per layer (diagonal Σ, or ρ = 0), by block elimination (tri-diagonal Σ)
        or by the (L·N·C)² system. With an output metric Λ the system is solved for the whitened
        kernels Λ^{1/2} Θ_l Λ^{1/2} and right-hand side (Λ^{1/2})^+ r, then v_l = Λ^{1/2} ṽ_l
        (:class:`~natural_tangents.fisher.base.Whitening`): the same vectors for invertible Λ, and the
        ρ → 0⁺ limit for singular Θ_l or Λ."""
        if "dual" in bound.cache:
            return super()._dual_vectors(bound, r)
        thetas, lam, rf = bound.layer_kernels(), bound.metric, r.reshape(-1, 1)
        white = None if lam is None else Whitening.of(lam)
        if white is not None:
            thetas, rf = white.kernel(thetas), white.rhs(rf)
        vs = self._whitened_vectors(thetas, rf)
        return vs if white is None else [white.out(v[:, None])[:, 0] for v in vs]

    def _whitened_vectors(self, thetas: Tensor, rf: Tensor) -> list[Tensor]:
        depth, nf = thetas.shape[0], thetas.shape[1]
        if self.damping == 0:  # v_l = (Σ^{-1} 1)_l Θ_l^+ r (S.74)
            c = self.sigma_weights(depth)
            return [float(c[l]) * solve_psd(thetas[l], rf, 0.0)[:, 0] for l in range(depth)]
        s = self.sigma_matrix(depth)
        if bool((s == torch.diag(torch.diagonal(s))).all()):  # diagonal Σ: L decoupled N·C × N·C solves
            scaled = [thetas[l] if float(s[l, l]) == 1.0 else float(s[l, l]) * thetas[l] for l in range(depth)]
            return [solve_psd(t, rf, self.damping)[:, 0] for t in scaled]
        s = s.to(dtype=thetas.dtype, device=thetas.device)
        if _bandwidth(s) == 1:  # block tri-diagonal: O(L N³) elimination instead of the (L·N)³ system
            v = block_tridiagonal_solve(s, thetas, self.damping, rf, symmetric=True)
            if v is not None:
                return [x[:, 0] for x in v]
        big = (s[:, None, :, None] * thetas.permute(1, 0, 2)[None]).reshape(depth * nf, depth * nf)
        big.diagonal().add_(self.damping)
        return list(torch.linalg.solve(big, rf.repeat(depth, 1))[:, 0].reshape(depth, nf))

    def _dual(self, bound: BoundFisher) -> list[Tensor]:
        thetas, lam = bound.layer_kernels(), bound.metric
        white = None if lam is None else Whitening.of(lam)
        if white is not None:
            thetas = white.kernel(thetas)
        depth, nf = thetas.shape[0], thetas.shape[1]
        opts = {"dtype": thetas.dtype, "device": thetas.device}
        if self.damping == 0:
            c = self.sigma_weights(depth).to(**opts)
            xs = [inverse_psd(thetas[l], 0.0) * c[l] for l in range(depth)]
        else:
            s = self.sigma_matrix(depth).to(**opts)
            big = (s[:, None, :, None] * thetas.permute(1, 0, 2)[None]).reshape(depth * nf, depth * nf)
            big = big + self.damping * torch.eye(depth * nf, **opts)
            rhs = torch.eye(nf, **opts).repeat(depth, 1)
            xs = list(torch.linalg.solve(big, rhs).reshape(depth, nf, nf))
        return xs if white is None else [white.dual(x) for x in xs]


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
