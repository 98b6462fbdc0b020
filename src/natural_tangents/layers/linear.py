"""The Linear kind: ``nn.Linear`` (and the layers of :class:`~natural_tangents.MLP`).

The forward signal is the layer's input with a column of ones for the bias (the paper's (S.64) in
the standard parameterization); the backward signal is ∂f/∂(layer output). An input with extra
axes (N, …, M_in), e.g. a sequence, puts the extra axes on the position axis T of
:class:`~natural_tangents.layers.affine.AffineSignals`: the weight is shared over them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .affine import AffineSignals
from .base import padded_empty

__all__ = ["linear_signals"]


def with_bias_column(h: Tensor, value: float, scale: float = 1.0) -> Tensor:
    """[scale · h | value]: a constant column appended to the last axis of ``h``, written once into
    rows with an aligned stride."""
    out = padded_empty((*h.shape[:-1], h.shape[-1] + 1), like=h)
    torch.mul(h, scale, out=out[..., :-1])
    out[..., -1] = value
    return out


def linear_signals(module: nn.Linear, inp: Tensor, grad_out: Tensor, name: str) -> AffineSignals:
    """Signals of ``module`` from its input (N, …, M_in) and the output gradients (C, N, …, M_out)."""
    n = inp.shape[0]
    a = inp.reshape(n, -1, inp.shape[-1])
    has_bias = module.bias is not None
    if has_bias:
        a = with_bias_column(a, 1.0)
    d = grad_out.reshape(grad_out.shape[0], n, -1, grad_out.shape[-1])
    params = (module.weight, module.bias) if has_bias else (module.weight,)
    return AffineSignals(a=a, d=d, has_bias=has_bias, params=params, name=name)
