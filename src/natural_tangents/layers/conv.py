"""The convolution kind: ``nn.Conv1d`` and ``nn.Conv2d`` (any stride, padding, dilation; one group,
zero padding).

A convolution is an affine layer shared over the output positions t (see
:mod:`~natural_tangents.layers.affine`): the forward signal a_{n,t} is the input patch that output
position t sees (C_in·k [+1 for the bias], in the order of ``weight.reshape(C_out, -1)``), and the
backward signal δ_{n,t} = ∂f/∂(output at t) (C_out). The per-sample Jacobian of output k is
G_n^{(k)} = Σ_t δ_{n,t}^{(k)} a_{n,t}^T, so the kernel, the update J^T v (one weighted backward
pass), the K-FAC factors (KFC, Grosse & Martens 2016) and the unit-wise systems (a unit is an
output channel, its filter with its bias) all come from (a, δ).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .affine import AffineSignals, affine_signals

__all__ = ["conv_signals", "is_supported_conv"]


def is_supported_conv(module: nn.Module) -> bool:
    """Conv1d/Conv2d with the stock forward, one group and zero padding (others go generic)."""
    kinds = (nn.Conv1d, nn.Conv2d)
    return (
        isinstance(module, kinds)
        and type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def patches(module: nn.Conv1d | nn.Conv2d, inp: Tensor) -> Tensor:
    """(N, T, C_in·k) input patches of every output position, matching ``weight.reshape(C_out, -1)``."""
    if isinstance(module, nn.Conv1d):
        x = inp.unsqueeze(2)  # (N, C_in, 1, L): a 1 × k convolution
        k, s, p, d = (1, *module.kernel_size), (1, *module.stride), (0, *module.padding), (1, *module.dilation)
    else:
        x, k, s, p, d = inp, module.kernel_size, module.stride, module.padding, module.dilation
    cols = F.unfold(x, kernel_size=k, dilation=d, padding=p, stride=s)  # (N, C_in·k, T)
    return cols.transpose(1, 2)


def conv_signals(module: nn.Conv1d | nn.Conv2d, inp: Tensor, grad_out: Tensor, name: str) -> AffineSignals:
    """Signals of a convolution from its input (N, C_in, …) and the output gradients (C, N, C_out, …)."""
    c, n, c_out = grad_out.shape[:3]
    d = grad_out.reshape(c, n, c_out, -1).transpose(2, 3)  # (C, N, T, C_out)
    return affine_signals(module.weight, module.bias, patches(module, inp), d, name)
