"""Curvature kept across mini-batches: running averages of a Fisher's parameter-space blocks, and their
damped inverses refreshed on a schedule.

A Fisher whose blocks are small enough to hold in parameter space — K-FAC's Kronecker factors (KFC on
convolutions), the unit-wise Fisher's blocks, the block-diagonal Fisher's blocks of small layers —
can estimate them from many batches: F_t = β F_{t−1} + (1 − β) F̂_t with F̂_t the batch's (β = ``ema``;
β = 0 is the batch's own), refreshed every ``curvature_every`` steps, and inverted every
``inverse_every`` steps; between refreshes every gradient is preconditioned with the inverses kept.
The exact Fisher and the layer-wise Fishers that couple layers have no such form: their dual
N × N systems belong to one batch.

Per layer, :class:`LayerCurvature` is either ``"kronecker"`` (A (p × p) and B (M × M): the update of the
(M, p) matrix [W | b] is (B + ρ_B)^{-1} G (A + ρ_A)^{-1}) or ``"blocks"`` (F (U, p, p), one block per
unit: row u of G is multiplied by (F_u + ρ)^{-1}). Damping: ρ on every factor (the paper's), or for
K-FAC the π-corrected split ρ_A = π √ρ, ρ_B = √ρ / π with π² = (tr A / p) / (tr B / M)
(Martens and Grosse 2015), a different damping scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layers.affine import AffineSignals
from .layers.base import LayerSignals
from .linalg.psd import PSDInverse

__all__ = ["LayerCurvature", "ParamView", "RunningCurvature"]


@dataclass(frozen=True)
class LayerCurvature:
    """One layer's parameter-space curvature of a batch: ``kind`` "kronecker" with factors (A, B), or
    "blocks" with factors (F,) of shape (U, p, p)."""

    kind: str
    factors: tuple[Tensor, ...]


@dataclass(frozen=True)
class ParamView:
    """A layer's trainable parameters as one matrix: (M, p) [W | b] for an affine layer (a row per
    unit: output feature or channel), one row (1, P) for any other module."""

    params: tuple[Tensor, ...]
    rows: int
    affine: bool
    has_weight: bool = True
    has_bias: bool = False

    @staticmethod
    def of(layer: LayerSignals, curvature: LayerCurvature) -> ParamView:
        """The view a layer's curvature needs: the affine (M, p) matrix for Kronecker factors and for
        blocks over its M units, one flat row for one block over the whole layer."""
        kr = layer.kronecker
        units = curvature.factors[0].shape[0] if curvature.kind == "blocks" else None
        if isinstance(kr, AffineSignals) and units != 1:
            return ParamView(tuple(layer.params), kr.out_width, True, kr.has_weight, kr.has_bias)
        return ParamView(tuple(layer.params), 1, False)

    def matrix(self, tensors: list[Tensor]) -> Tensor:
        if not self.affine:
            return torch.cat([t.reshape(-1) for t in tensors])[None]
        return torch.cat([t.reshape(self.rows, -1) for t in tensors], 1)

    def split(self, mat: Tensor) -> list[Tensor]:
        out, start = [], 0
        for p in self.params:
            width = p.numel() // self.rows
            out.append(mat[:, start : start + width].reshape(p.shape))
            start += width
        return out


class RunningCurvature:
    """The curvature an optimizer keeps across mini-batches (module docstring).

    Args:
        ema: β in [0, 1): the weight of the old estimate in each refresh.
        damping: ρ > 0 (ρ = 0 takes pseudo-inverses).
        split: ``"paper"`` (ρ on every factor) or ``"pi"`` (K-FAC's π-corrected split).
        solve_dtype: the precision of the inverses and of the preconditioning products.
    """

    def __init__(self, ema: float, damping: float, split: str = "paper", solve_dtype: torch.dtype = torch.float64):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema: expected a decay β in [0, 1), got {ema}")
        self.ema, self.damping, self.split, self.solve_dtype = float(ema), float(damping), split, solve_dtype
        self.views: list[ParamView] = []
        self.stats: list[LayerCurvature] = []
        self.inverses: list[tuple[Tensor, ...]] = []
        self._cast: list[tuple[Tensor, ...]] | None = None

    @property
    def ready(self) -> bool:
        return bool(self.inverses)

    def update(self, blocks: list[LayerCurvature], layers: tuple[LayerSignals, ...]) -> None:
        """Fold one batch's curvature into the running estimate (the first batch's is taken as is)."""
        views = [ParamView.of(layer, block) for layer, block in zip(layers, blocks)]
        if self.stats and [v.params for v in views] != [v.params for v in self.views]:
            raise ValueError("model: its trainable parameters changed since the curvature was last refreshed")
        if not self.stats:
            self.views, self.stats = views, list(blocks)
            return
        b = self.ema
        self.stats = [
            LayerCurvature(new.kind, tuple(f.mul(b).add_(g, alpha=1 - b) for f, g in zip(old.factors, new.factors)))
            for old, new in zip(self.stats, blocks)
        ]

    def invert(self, damping: float | None = None) -> None:
        """The damped inverses of the running curvature (ρ = ``damping``, default the configured one)."""
        rho = self.damping if damping is None else damping
        out = []
        for layer in self.stats:
            factors = [f.to(self.solve_dtype) for f in layer.factors]
            if layer.kind == "kronecker":
                a, b = factors
                rho_a = rho_b = rho
                if self.split == "pi" and rho > 0:
                    ta = float(torch.diagonal(a).mean())
                    tb = float(torch.diagonal(b).mean())
                    pi = (ta / tb) ** 0.5 if ta > 0 and tb > 0 else 1.0
                    rho_a, rho_b = pi * rho**0.5, rho**0.5 / pi
                out.append((PSDInverse.of(a, rho_a).matrix(), PSDInverse.of(b, rho_b).matrix()))
            else:
                out.append((PSDInverse.of(factors[0], rho).matrix(),))
        self.inverses, self._cast = out, None

    def precondition(self, grads: dict[int, Tensor]) -> dict[int, Tensor]:
        """The updates (F + ρ)^{-1} g of the gradients ``grads`` (by parameter id), by parameter id, in
        the parameters' precision (the inverses, computed in ``solve_dtype``, are cast to it once)."""
        out = {}
        for view, inv in zip(self.views, self._applied):
            g = view.matrix([grads[id(p)] for p in view.params])
            g = g.to(inv[0].dtype) if g.dtype != inv[0].dtype else g
            u = torch.linalg.multi_dot([inv[1], g, inv[0]]) if len(inv) == 2 else (inv[0] @ g[:, :, None])[:, :, 0]
            out.update({id(p): t for p, t in zip(view.params, view.split(u))})
        return out

    @property
    def _applied(self) -> list[tuple[Tensor, ...]]:
        """The inverses in the parameters' precision (cast once per inversion)."""
        if self._cast is None:
            self._cast = [tuple(t.to(v.params[0].dtype) for t in inv) for v, inv in zip(self.views, self.inverses)]
        return self._cast

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {
            "kinds": [s.kind for s in self.stats],
            "stats": [list(s.factors) for s in self.stats],
            "inverses": [list(i) for i in self.inverses],
        }

    def load(self, state: dict, layers: list[ParamView]) -> None:
        self.views = layers
        self.stats = [LayerCurvature(k, tuple(f)) for k, f in zip(state["kinds"], state["stats"])]
        self.inverses, self._cast = [tuple(i) for i in state["inverses"]], None
