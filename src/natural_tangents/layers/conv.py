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
    """(N, T, C_in·k) input patches of every output position, matching ``weight.reshape(C_out, -1)``.

    Strided views of the (zero-padded) input, copied once: several times faster than ``F.unfold``
    (im2col) on a CPU."""
    spatial = inp.ndim - 2
    pad = list(module.padding)
    if any(pad):
        inp = F.pad(inp, [q for p in reversed(pad) for q in (p, p)])
    u = inp
    for axis, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        u = u.unfold(2 + axis, d * (k - 1) + 1, s)  # a window axis appended per spatial axis
    if any(d != 1 for d in module.dilation):
        u = u[(Ellipsis, *(slice(None, None, d) for d in module.dilation))]
    n = inp.shape[0]
    out_axes = list(range(2, 2 + spatial))  # positions, then channel, then the window
    window = list(range(2 + spatial, 2 + 2 * spatial))
    u = u.permute(0, *out_axes, 1, *window)
    positions = 1
    for size in u.shape[1 : 1 + spatial]:
        positions *= size
    return u.reshape(n, positions, -1)


def conv_signals(module: nn.Conv1d | nn.Conv2d, inp: Tensor, grad_out: Tensor, name: str) -> AffineSignals:
    """Signals of a convolution from its input (N, C_in, …) and the output gradients (C, N, C_out, …)."""
    c, n, c_out = grad_out.shape[:3]
    d = grad_out.reshape(c, n, c_out, -1).transpose(2, 3).contiguous()  # (C, N, T, C_out), copied once
    return affine_signals(module.weight, module.bias, patches(module, inp), d, name)
