"""The signals of a batch: the outputs f and, per parameterized layer, what its kind offers
(:mod:`natural_tangents.layers`). Every kernel and every Fisher of the library is built from them in
O(N² · layers) memory; the N·C × P Jacobian is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .layers.affine import AffineSignals
from .layers.base import LayerSignals

__all__ = ["Signals", "public_shape"]


def public_shape(k: Tensor, n1: int, n2: int, c: int) -> Tensor:
    """A flat sample-major kernel (…, N1·C, N2·C) in the public shape: (…, N1, N2) for C = 1,
    (…, N1, N2, C, C) for C > 1 (entry [n, m, k, j] pairs output k of sample n with output j of m)."""
    lead = k.shape[:-2]
    if c == 1:
        return k.reshape(*lead, n1, n2)
    return k.reshape(*lead, n1, c, n2, c).movedim(-3, -2)


@dataclass(frozen=True)
class Signals:
    """Signals of a batch of N inputs.

    Attributes:
        f: the model's outputs, (N, C).
        layers: one :class:`~natural_tangents.layers.base.LayerSignals` per module holding trainable
            parameters, in ``model.parameters()`` order; their parameters concatenated are the
            model's trainable parameters.
        frozen_output: True when the model's output layer (its last parameterized module) is frozen,
            so that no layer here is the output layer (K-FAC's output-factor convention needs to know).

    For an MLP (every layer an affine layer with one position), ``forward[l]`` is the forward signal
    a_{l−1} (N, M_{l−1} [+1]) with the bias column appended, and ``backward[l]`` the backward signal
    δ_l (C, N, M_l): the Jacobian of output k of sample n with respect to [W_l | b_l] is
    ``outer(backward[l][k, n], forward[l][n])`` (the paper's (S.64)).
    """

    f: Tensor
    layers: tuple[LayerSignals, ...]
    frozen_output: bool = False

    @property
    def n(self) -> int:
        return self.f.shape[0]

    @property
    def c(self) -> int:
        return self.f.shape[1]

    @property
    def output_layer(self) -> int | None:
        """The index in ``layers`` of the model's output layer (the last one), or None when it is frozen."""
        return None if self.frozen_output or not self.layers else len(self.layers) - 1

    @property
    def depth(self) -> int:
        """The number of parameterized layers (L for an MLP)."""
        return len(self.layers)

    def _affine(self) -> tuple[AffineSignals, ...]:
        if not all(isinstance(s, AffineSignals) and s.rank_one for s in self.layers):
            raise TypeError("forward/backward signals exist only when every layer is a Linear layer (an MLP)")
        return self.layers  # type: ignore[return-value]

    @property
    def forward(self) -> tuple[Tensor, ...]:
        """Per layer, the forward signal a_{l−1} (N, M_{l−1} [+1]) (MLPs only)."""
        return tuple(s.a[:, 0] for s in self._affine())

    @property
    def backward(self) -> tuple[Tensor, ...]:
        """Per layer, the backward signal δ_l (C, N, M_l) (MLPs only)."""
        return tuple(s.d[:, :, 0] for s in self._affine())

    @property
    def widths(self) -> tuple[int, ...]:
        """Output widths (M_1, …, M_L) of the layers (MLPs only)."""
        return tuple(s.out_width for s in self._affine())

    def to(self, dtype: torch.dtype) -> Signals:
        """The same signals cast to ``dtype`` (e.g. float64 for kernels and diagnostics)."""
        return replace(self, f=self.f.to(dtype), layers=tuple(s.to(dtype) for s in self.layers))

    def grams(self, other: Signals | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Per-layer J_l(x) J_l(x′)^T, (L, N·C, N′·C) sample-major, *no* 1/N (S.68); the paper's
        Θ_l = J_l J_l^T / N of a batch is :attr:`~natural_tangents.fisher.bound.BoundFisher.layer_kernels`."""
        o = self if other is None else other
        return torch.stack([s.gram(t if o is not self else None, dtype) for s, t in zip(self.layers, o.layers)])

    def rows(self, rows: slice) -> Signals:
        """The signals of the samples ``rows`` (a slice of the batch)."""
        layers = tuple(s.with_tensors([t[rows] for t in s.tensors()]) for s in self.layers)
        return replace(self, f=self.f[rows], layers=layers)

    @staticmethod
    def cat(parts: list[Signals]) -> Signals:
        """The signals of the concatenated batch (parts in order)."""
        layers = tuple(type(ls[0]).cat(list(ls)) for ls in zip(*(p.layers for p in parts)))
        return replace(parts[0], f=torch.cat([p.f for p in parts], 0), layers=layers)
