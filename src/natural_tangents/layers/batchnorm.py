"""The BatchNorm kind in training mode, with the batch statistics held constant for the curvature.

A BatchNorm in training mode normalizes each channel by the batch's mean μ and variance σ², so every
output depends on every sample: there is no per-sample Jacobian, and the exact Fisher of the coupled
batch is not a Gram of per-sample rows. The approximation every K-FAC library makes for such models
is to treat μ and σ as constants for the curvature: then

    y_n = γ ⊙ x̂_n + β,   x̂_n = (x_n − μ) / σ

is a per-sample map, whose Jacobian with respect to γ, β and the layers before it is what the
Fishers read (docs/user_models.md). The *gradient* stays the true one, with the coupling.

Both at once: while the Fisher's rows are read, :func:`constant_statistics` replaces a training-mode
BatchNorm's output by :class:`BatchNormRows` — the same values, computed from the same batch
statistics — whose backward pass is the true one in the user's (or the optimizer's) gradient pass
and the constant-statistics one in the rows' pass (:func:`rows_pass` marks it). The kind's signals
are the per-sample Jacobian of (γ, β): G_n = [Σ_s δ_{n,s} ⊙ x̂_{n,s}, Σ_s δ_{n,s}] over the spatial
positions s, in the generic kind's container.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .generic import GenericSignals

__all__ = [
    "BatchNormRows",
    "batchnorm_signals",
    "constant_statistics",
    "in_rows_pass",
    "is_training_batchnorm",
    "rows_pass",
]

_ROWS = [0]  # > 0 while the rows' backward pass runs (it runs inside the gradient pass or after it)


@contextmanager
def rows_pass() -> Iterator[None]:
    """Mark a backward pass as the rows' pass: training-mode BatchNorms hold their statistics constant."""
    _ROWS[0] += 1
    try:
        yield
    finally:
        _ROWS[0] -= 1


def in_rows_pass() -> bool:
    """Whether a rows' backward pass (:func:`rows_pass`) is running."""
    return _ROWS[0] > 0


def is_training_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training


def _axes(x: Tensor) -> list[int]:
    return [0, *range(2, x.ndim)]


def _normalized(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> tuple[Tensor, Tensor]:
    """x̂ and 1/σ with the batch's statistics (the biased variance, as BatchNorm normalizes with)."""
    axes = _axes(x)
    shape = [1, -1] + [1] * (x.ndim - 2)
    mean = x.mean(axes)
    rstd = (x.var(axes, unbiased=False) + module.eps).rsqrt()
    return (x - mean.reshape(shape)) * rstd.reshape(shape), rstd


class BatchNormRows(torch.autograd.Function):
    """y = γ ⊙ x̂ + β with the batch statistics; backward: the true one, or with μ and σ constant in
    a rows' pass (:func:`rows_pass`)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        axes = _axes(x)
        shape = [1, -1] + [1] * (x.ndim - 2)
        mean = x.mean(axes)
        rstd = (x.var(axes, unbiased=False) + eps).rsqrt()
        xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.has_bias = bias is not None
        y = xhat if weight is None else xhat * weight.reshape(shape)
        return y if bias is None else y + bias.reshape(shape)

    @staticmethod
    def backward(ctx, gy: Tensor):
        xhat, rstd, weight = ctx.saved_tensors
        axes = _axes(xhat)
        shape = [1, -1] + [1] * (xhat.ndim - 2)
        g = gy if weight is None else gy * weight.reshape(shape)
        if _ROWS[0]:  # the curvature's rows: μ and σ held constant
            gx = g * rstd.reshape(shape)
        else:  # the true gradient, through μ and σ
            gx = rstd.reshape(shape) * (g - g.mean(axes, keepdim=True) - xhat * (g * xhat).mean(axes, keepdim=True))
        gw = (gy * xhat).sum(axes) if weight is not None and ctx.needs_input_grad[1] else None
        gb = gy.sum(axes) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def _swap(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    x = args[0]
    return BatchNormRows.apply(x, module.weight, module.bias, module.eps)


@contextmanager
def constant_statistics(model: nn.Module) -> Iterator[None]:
    """While active, every training-mode BatchNorm of ``model`` outputs :class:`BatchNormRows` (the
    module's own forward still runs, so its running statistics are updated as usual)."""
    handles = [m.register_forward_hook(_swap) for m in model.modules() if is_training_batchnorm(m)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def batchnorm_signals(module: nn.Module, args: tuple, grad_out: Tensor, name: str) -> GenericSignals:
    """Per-sample Jacobian rows of a training-mode BatchNorm's own trainable parameters (γ, β), the
    statistics held constant: from its input (N, C, …) and the rows' output gradients (R, N, C, …)."""
    xhat, _ = _normalized(module, args[0])
    axes = list(range(3, grad_out.ndim))
    parts, params = [], []
    if module.weight is not None and module.weight.requires_grad:
        parts.append((grad_out * xhat).sum(axes) if axes else grad_out * xhat)
        params.append(module.weight)
    if module.bias is not None and module.bias.requires_grad:
        parts.append(grad_out.sum(axes) if axes else grad_out)
        params.append(module.bias)
    g = torch.cat(parts, -1).transpose(0, 1)  # (N, R, P)
    return GenericSignals(g=g.detach(), params=tuple(params), name=name)
