"""Exact natural gradient in dual form (MATH.md §4; seed (S.51)–(S.53), (S.91)).

    Δθ = (J^T Λ J / N + ρ I)^{-1} J^T r / N = J^T (Θ + ρ Λ^{-1})^{-1} Λ^{-1} r / N,
    Θ̄(x′, x) = Θ(x′, x) (Θ + ρ Λ^{-1})^{-1} Λ^{-1}            (Λ = I for MSE: Θ(x′,x)(Θ + ρI)^{-1})

One N·C × N·C solve; at ρ = 0 the pseudo-inverse Θ^+ (Θ̄(x, x) = I: α = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..kernels import layer_kernels
from ..network import Factors
from .base import DualFisher, block_diag_metric, inverse_blocks, solve_psd

__all__ = ["Exact"]


@dataclass(frozen=True, kw_only=True)
class Exact(DualFisher):
    """The exact Fisher G = J^T Λ J / N + ρ I, inverted through the N·C × N·C kernel Θ (S.53)."""

    name: ClassVar[str] = "exact"
    label: ClassVar[str] = "Exact"

    def _dual(self, fx: Factors, lam: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        thetas = layer_kernels(fx, dtype=self.solve_dtype) / fx.n
        theta = thetas.sum(0)
        if lam is None:
            eye = torch.eye(theta.shape[0], dtype=theta.dtype, device=theta.device)
            x = solve_psd(theta, eye, self.damping)
        else:
            lam_inv = block_diag_metric(inverse_blocks(lam))
            x = solve_psd(theta, lam_inv, self.damping * lam_inv if self.damping > 0 else 0.0)
        return thetas, [x] * fx.depth
