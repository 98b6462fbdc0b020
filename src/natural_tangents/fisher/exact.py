"""Exact natural gradient in dual form (docs/conventions.md; the paper's (S.51)–(S.53), (S.91)).

    Δθ = (J^T Λ J / N + ρ I)^{-1} J^T r / N = J^T (Θ + ρ Λ^{-1})^{-1} Λ^{-1} r / N,
    Θ̄(x′, x) = Θ(x′, x) (Θ + ρ Λ^{-1})^{-1} Λ^{-1}            (Λ = I for MSE: Θ(x′,x)(Θ + ρI)^{-1})

One N·C × N·C solve; at ρ = 0 the pseudo-inverse Θ^+ (Θ̄(x, x) = I: α = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .base import BoundFisher, DualFisher, solve_with_metric

__all__ = ["Exact"]


@dataclass(frozen=True, kw_only=True)
class Exact(DualFisher):
    """The exact Fisher G = J^T Λ J / N + ρ I, inverted through the N·C × N·C kernel Θ (S.53)."""

    name: ClassVar[str] = "exact"
    label: ClassVar[str] = "Exact"

    aliases: ClassVar[tuple[str, ...]] = ("exact",)

    def _dual(self, bound: BoundFisher) -> list[Tensor]:
        thetas = bound.layer_kernels()
        x = solve_with_metric(thetas.sum(0), bound.metric, self.damping)
        return [x] * len(thetas)

    def _dual_vectors(self, bound: BoundFisher, r: Tensor) -> list[Tensor]:
        if "dual" in bound.cache:
            return super()._dual_vectors(bound, r)
        thetas = bound.layer_kernels()
        v = solve_with_metric(thetas.sum(0), bound.metric, self.damping, r.reshape(-1, 1))[:, 0]
        return [v] * len(thetas)
