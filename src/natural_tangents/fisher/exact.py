"""Exact natural gradient in dual form (docs/conventions.md; the paper's (S.51)–(S.53), (S.91)).

On the rows Ĵ = Λ^{1/2} J (:mod:`.rows`), with K = Ĵ Ĵ^T / N = Λ^{1/2} Θ Λ^{1/2}:

    Δθ = (Ĵ^T Ĵ / N + ρ I)^{-1} Ĵ^T r̃ / N = Ĵ^T (K + ρ I)^{-1} r̃ / N,
    Θ̄(x′, x) = J(x′) Ĵ^T (K + ρ I)^{-1} (Λ^{1/2})^+ / N      (Λ = I for MSE: Θ(x′, x) (Θ + ρ I)^{-1})

One N·C × N·C factorization (:attr:`ExactBatch.factor`) serves the update, Θ̄ and α̂; at ρ = 0 the
pseudo-inverse K^+ (Θ̄(x, x) = I on the range of Θ: α = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from torch import Tensor

from ..linalg.psd import PSDInverse
from .base import Fisher
from .bound import DualBatch

__all__ = ["Exact", "ExactBatch"]


class ExactBatch(DualBatch):
    """The exact Fisher bound to a batch: :attr:`factor` of K = Σ_l Θ_l (+ ρ I)."""

    @cached_property
    def factor(self) -> PSDInverse:
        """(K + ρ I)^{-1}, or K^+ at ρ = 0, factored once for the batch."""
        return PSDInverse.of(self.layer_kernels.sum(0), self.fisher.damping, overwrite=True, routes=self.routes)

    def _dual_vectors(self, r: Tensor) -> list[Tensor]:
        v = self.factor.solve(r[:, None])[:, 0]
        return [v] * self.depth

    def _make_dual_matrices(self) -> list[Tensor]:
        return [self.factor.matrix()] * self.depth

    def _precondition(self, grads: list[list[Tensor]]) -> list[list[Tensor]]:
        """(Ĵ^T Ĵ / N + ρ I)^{-1} g = (g − Ĵ^T v) / ρ with v = (K + ρ I)^{-1} Ĵ g / N."""
        v = self.factor.solve(sum(self._row_products(grads))[:, None])[:, 0]
        return self._woodbury(grads, [v] * self.depth)


@dataclass(frozen=True, kw_only=True)
class Exact(Fisher):
    """The exact Fisher G = J^T Λ J / N + ρ I, inverted through the N·C × N·C kernel Θ (S.53)."""

    name: ClassVar[str] = "exact"
    label: ClassVar[str] = "Exact"
    aliases: ClassVar[tuple[str, ...]] = ("exact",)
    batch_type: ClassVar[type] = ExactBatch
    amortizable: ClassVar[bool] = False
