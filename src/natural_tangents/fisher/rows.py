"""The rows of a Fisher: G = Ĵ^T Ĵ / N + ρ I with Ĵ_n = m_n J_n for per-sample matrices m_n (R × C).

Every Fisher of the library is computed from the rows Ĵ and never from the output metric directly:
the expectation over the model's outputs (the paper's Fisher, G = J^T Λ J / N) has m_n = Λ_n^{1/2},
so a loss with an output metric is the Λ = I problem of the whitened Jacobian Λ^{1/2} J — its
kernels are Λ^{1/2} Θ Λ^{1/2}, symmetric, and its zero-damping limit is the pseudo-inverse of those.
The gradient J^T r / N reads in the rows as Ĵ^T r̃ / N with r̃_n = p_n r_n, p_n = (Λ_n^{1/2})^+: every
residual of the loss lies in the range of Λ (r_n ⊥ 1 for the softmax, whose Λ_n 1 = 0 without
output damping), so no inverse of Λ is ever needed (docs/conventions.md).

    (Λ Θ + ρ)^{-1} r = Λ^{1/2} (Λ^{1/2} Θ Λ^{1/2} + ρ)^{-1} (Λ^{1/2})^+ r     (every ρ > 0)

and its ρ → 0⁺ limit is Λ^{1/2} (Λ^{1/2} Θ Λ^{1/2})^+ (Λ^{1/2})^+ r, which equals Θ^+ Λ^{-1} r only
when Θ is nonsingular. For MSE, Λ = I and Ĵ = J (``mixing`` is None: no copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers.base import LayerSignals

__all__ = ["Rows"]


@dataclass(frozen=True)
class Rows:
    """Per-sample row maps of a batch: ``mixing`` m (N, R, C) with Ĵ_n = m_n J_n, and ``coords``
    p (N, R, C) with J_n^T r_n = Ĵ_n^T p_n r_n for every residual r_n of the loss; None for both
    means the identity (R = C)."""

    mixing: Tensor | None = None
    coords: Tensor | None = None

    @staticmethod
    def expectation(lam: Tensor | None) -> Rows:
        """The rows of the expectation over the outputs, m_n = Λ_n^{1/2}, p_n = (Λ_n^{1/2})^+ (by an
        eigendecomposition of each C × C block, eigenvalues below C·eps·λ_max taken as zero)."""
        if lam is None:
            return Rows()
        ev, vec = torch.linalg.eigh(0.5 * (lam + lam.mT))
        keep = ev > ev.shape[-1] * torch.finfo(ev.dtype).eps * ev.abs().amax(-1, keepdim=True)
        root = torch.where(keep, ev.clamp_min(0).sqrt(), 0.0)
        inv = torch.where(keep, 1.0 / torch.where(keep, root, 1.0), 0.0)
        return Rows((vec * root.unsqueeze(-2)) @ vec.mT, (vec * inv.unsqueeze(-2)) @ vec.mT)

    @property
    def identity(self) -> bool:
        return self.mixing is None

    def rows(self, layers: tuple[LayerSignals, ...], start: int = 0) -> tuple[LayerSignals, ...]:
        """Ĵ of the layers (the samples ``start``, ``start`` + 1, … of the batch)."""
        if self.mixing is None:
            return layers
        m = self.mixing[start : start + layers[0].n] if layers else self.mixing
        return tuple(layer.mix(m) for layer in layers)

    def rhs(self, r: Tensor) -> Tensor:
        """r̃_n = p_n r_n, (N, R) for residuals r (N, C)."""
        return r if self.coords is None else torch.einsum("nrc,nc->nr", self.coords.to(r.dtype), r)

    def columns(self, t: Tensor) -> Tensor:
        """t · blockdiag(p): the columns of J(x′) (G + ρ)^{-1} Ĵ^T / N (…, N·R) mapped to those of
        J(x′) (G + ρ)^{-1} J^T / N (…, N·C), on the range of Λ."""
        if self.coords is None:
            return t
        n, r, c = self.coords.shape
        return torch.einsum("...nr,nrc->...nc", t.reshape(*t.shape[:-1], n, r), self.coords.to(t.dtype)).reshape(
            *t.shape[:-1], n * c
        )
