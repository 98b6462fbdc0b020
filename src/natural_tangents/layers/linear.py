"""The Linear kind: ``nn.Linear`` (and the layers of :class:`~natural_tangents.MLP`).

The forward signal is the layer's input with a column of ones for the bias (the paper's (S.64) in
the standard parameterization); the backward signal is ∂f/∂(layer output). An input with extra
axes (N, …, M_in), e.g. a sequence, puts the extra axes on the position axis T of
:class:`~natural_tangents.layers.affine.AffineSignals`: the weight is shared over them.
"""

from __future__ import annotations

from torch import Tensor, nn

from .affine import AffineSignals, affine_signals

__all__ = ["linear_signals"]


def linear_signals(module: nn.Linear, inp: Tensor, grad_out: Tensor, name: str) -> AffineSignals:
    """Signals of ``module`` from its input (N, …, M_in) and the output gradients (C, N, …, M_out)."""
    n = inp.shape[0]
    a = inp.reshape(n, -1, inp.shape[-1])
    d = grad_out.reshape(grad_out.shape[0], n, -1, grad_out.shape[-1])
    return affine_signals(module.weight, module.bias, a, d, name)
