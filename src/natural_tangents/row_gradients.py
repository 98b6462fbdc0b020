"""The backward passes that read a batch: Σ_c m_{n,r,c} ∂f_{n,c}/∂t for the tensors t a forward pass
recorded (the layers' outputs) and each row r of cotangents m, stacked over the rows.

One backward pass batched over the rows (``is_grads_batched``), or a loop of plain passes where that
is faster (convolution feature maps, whose batched backward rules fall back to slow paths) or
impossible (an op without a batching rule). Training-mode BatchNorms hold their statistics
constant during these passes (:func:`~natural_tangents.layers.batchnorm.rows_pass`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layers.batchnorm import rows_pass

__all__ = ["cotangent_rows", "row_gradients", "output_gradients"]


def cotangent_rows(f: Tensor, cotangents: Tensor | None) -> Tensor:
    """The rows' cotangents at f, (R, N, C): the identity (R = C) for None, else m (N, R, C) permuted."""
    n, c = f.shape
    if cotangents is None:
        return torch.eye(c, dtype=f.dtype, device=f.device)[:, None, :].expand(c, n, c)
    return cotangents.to(f.dtype).permute(1, 0, 2)


def row_gradients(
    f: Tensor, tensors: list[Tensor], rows: Tensor, retain_graph: bool, maps: frozenset[int] = frozenset()
) -> list[Tensor | None]:
    """Σ_c rows[r, n, c] ∂f_{n,c}/∂t for each tensor t, stacked over the R rows (None where f does not
    depend on t): one backward pass batched over the rows (a plain one for one row), in which
    training-mode BatchNorms hold their statistics constant (:func:`~natural_tangents.layers.batchnorm.rows_pass`).
    ``maps``: ids of feature maps (N, C_out, …) whose row gradients a loop writes channels-last, the
    layout the convolution kind reads (no transposing copy)."""
    if not tensors:
        return []
    with rows_pass():
        if len(rows) == 1:
            one = torch.autograd.grad(f, tensors, rows[0], allow_unused=True, retain_graph=retain_graph)
            return [None if g is None else g[None] for g in one]
        if len(rows) <= 32 and any(t.ndim > 3 for t in tensors):
            # feature maps (convolutions): plain passes in a loop run faster than the batched (vmap) one,
            # whose convolution and pooling backward rules fall back to slow paths (1.5× on a LeNet)
            return _row_loop(f, tensors, rows, retain_graph, maps)
        try:
            return list(
                torch.autograd.grad(
                    f, tensors, grad_outputs=rows, is_grads_batched=True, allow_unused=True, retain_graph=retain_graph
                )
            )
        except RuntimeError:  # an op without a batching rule: one backward pass per row
            return _row_loop(f, tensors, rows, retain_graph, maps)


def _row_loop(
    f: Tensor, tensors: list[Tensor], rows: Tensor, retain_graph: bool, maps: frozenset[int]
) -> list[Tensor | None]:
    """:func:`row_gradients` by one plain backward pass per row, written into one buffer per tensor
    (channels-last for the feature maps in ``maps``)."""
    r = len(rows)
    out: list[Tensor | None] = [None] * len(tensors)
    for k in range(r):
        last = k == r - 1
        grads = torch.autograd.grad(f, tensors, rows[k], retain_graph=retain_graph or not last, allow_unused=True)
        for i, g in enumerate(grads):
            if g is None:
                if out[i] is not None:
                    out[i][k].zero_()
                continue
            if out[i] is None:
                if id(tensors[i]) in maps and g.ndim >= 3:
                    out[i] = g.new_empty((r, g.shape[0], *g.shape[2:], g.shape[1])).movedim(-1, 2)
                else:
                    out[i] = g.new_empty((r, *g.shape))
                out[i][:k].zero_()
            out[i][k] = g
    return out


def output_gradients(
    f: Tensor, outputs: list[Tensor], cotangents: Tensor | None = None, *, retain_graph: bool = False
) -> list[Tensor]:
    """Σ_c m_{n,r,c} ∂f_{n,c}/∂out for every recorded output and every row r, stacked over the rows:
    each of shape ``(R, *out.shape)``. ``cotangents`` m (N, R, C); None is the identity (R = C: ∂f_k/∂out).
    One backward pass batched over the R rows (``retain_graph`` keeps the graph, as a backward pass
    run inside another one must)."""
    rows = cotangent_rows(f, cotangents)
    grads = row_gradients(f, outputs, rows, retain_graph)
    return [
        torch.zeros(len(rows), *o.shape, dtype=o.dtype, device=o.device) if g is None else g
        for g, o in zip(grads, outputs)
    ]
