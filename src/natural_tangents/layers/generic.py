"""The generic kind: any other parameterized module (LayerNorm, Embedding, eval-mode BatchNorm,
recurrent layers, attention, a custom module with its own ``nn.Parameter``s, …), through per-sample
gradients (torch.func).

The module's per-sample Jacobian is formed explicitly, G (N, C, P_l), by vmapping the vector-Jacobian
product of the module on one sample over the samples and the C output gradients. This costs
N·C·P_l memory, which suits the small parameter counts of such modules (normalization scales,
biases, embeddings of a small vocabulary, small recurrent and attention layers). The kernel is
G G′^T, the update G^T v; for K-FAC the module keeps its exact block (it has no Kronecker
structure), and unit-wise treats it as one unit.

A module may take keyword arguments and return several tensors (``nn.LSTM`` returns
``(output, (h_n, c_n))``, ``nn.MultiheadAttention`` ``(output, weights)``): the vector-Jacobian
product then takes one cotangent per output tensor, and each input and output tensor has its own
batch axis (:mod:`~natural_tangents.layers.axes`), which the per-sample call keeps at size one.
Modules without a batching rule for ``vmap`` (the recurrent layers) are read one sample at a time,
each with one backward pass batched over the C output rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .axes import tensor_leaves, with_leaves
from .base import LayerSignals, Units, split_flat

__all__ = ["GenericSignals", "generic_signals"]


@dataclass(frozen=True)
class GenericSignals(LayerSignals):
    """Per-sample Jacobian ``g`` (N, C, P_l) of a module's own parameters ``params`` (in order)."""

    g: Tensor
    params: tuple[Tensor, ...]
    name: str = ""

    @property
    def n(self) -> int:
        return self.g.shape[0]

    @property
    def c(self) -> int:
        return self.g.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.g.dtype

    def jacobian(self, dtype: torch.dtype | None = None) -> Tensor:
        g = self.g if dtype is None else self.g.to(dtype)
        return g.reshape(self.n * self.c, -1)

    def gram(self, other: LayerSignals | None = None, dtype: torch.dtype | None = None) -> Tensor:
        o = self if other is None else other
        j1 = self.jacobian(dtype or self.dtype)
        return j1 @ (j1 if o is self else o.jacobian(dtype or self.dtype)).T

    def transpose(self, v: Tensor) -> list[Tensor]:
        flat = v.to(self.dtype).reshape(-1) @ self.jacobian()
        return split_flat(flat, self.params)

    def jvp(self, update: list[Tensor]) -> Tensor:
        flat = torch.cat([u.reshape(-1) for u in update]).to(self.dtype)
        return self.g @ flat

    def units(self, dtype: torch.dtype | None = None) -> Units:
        return Units(jac=self.jacobian(dtype)[None], to_params=lambda w: split_flat(w[0], self.params))

    def mix(self, m: Tensor) -> GenericSignals:
        """Output rows m_n G_n: m (N, R, C)."""
        return replace(self, g=torch.einsum("nrc,ncp->nrp", m.to(self.dtype), self.g))

    def to(self, dtype: torch.dtype) -> GenericSignals:
        return replace(self, g=self.g.to(dtype))

    @classmethod
    def cat(cls, parts: list[GenericSignals]) -> GenericSignals:
        return replace(parts[0], g=torch.cat([p.g for p in parts], 0))

    def tensors(self) -> list[Tensor]:
        return [self.g]

    def with_tensors(self, tensors: list[Tensor]) -> GenericSignals:
        return replace(self, g=tensors[0])


def generic_signals(
    module: nn.Module,
    args: tuple,
    grad_out: Tensor | tuple[Tensor, ...],
    name: str,
    *,
    kwargs: dict | None = None,
    params: dict[str, Tensor] | None = None,
    axes: tuple[list[int | None], list[int | None]] | None = None,
) -> GenericSignals:
    """Per-sample gradients of ``module``'s parameters from one recorded call.

    Args:
        module: the module.
        args: its positional inputs, as it received them; ``kwargs`` its keyword inputs.
        grad_out: the output gradients ``(C, *out.shape)`` of a module returning one tensor, or a tuple of
            them, one per tensor of its output (in :func:`~natural_tangents.layers.axes.tensor_leaves`
            order).
        name: the module's path in the model.
        params: the parameters to differentiate, by their names relative to ``module`` (a sub-module's
            dotted, as ``named_parameters`` writes them); default: the module's own trainable ones.
        axes: the batch axis of each input tensor and of each output tensor
            (:func:`~natural_tangents.layers.axes.call_axes`); an output tensor with None is left out
            (its output gradient must be zero). Default: axis 0 for the inputs whose first axis has
            the N samples and for every output, N = ``grad_out.shape[1]``.

    Returns the per-sample Jacobian G (N, C, P_l) with the columns of ``params`` in order.
    """
    if params is None:  # frozen parameters are no coordinates
        params = {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}
    grads = (grad_out,) if isinstance(grad_out, Tensor) else tuple(grad_out)
    kwargs = dict(kwargs or {})
    if isinstance(module, nn.MultiheadAttention) and len(args) <= 4 and kwargs.get("need_weights") is False:
        # the explicit softmax path (same values) has vmap batching rules; the fused kernel does not.
        # The extra output (the weights) comes after the attention output, so the leaves' order holds.
        kwargs["need_weights"] = True
    inputs = (tuple(args), kwargs)
    leaves = tensor_leaves(inputs)
    if axes is None:
        n = grads[0].shape[1]
        in_axes, out_axes = [0 if t.ndim > 0 and t.shape[0] == n else None for t in leaves], [0] * len(grads)
    else:
        in_axes, out_axes = list(axes[0]), list(axes[1])
    batched = [i for i, a in enumerate(in_axes) if a is not None]
    keep = [i for i, a in enumerate(out_axes) if a is not None]
    r = grads[0].shape[0]
    if keep:
        n = grads[keep[0]].shape[out_axes[keep[0]] + 1]
    elif batched:
        n = leaves[batched[0]].shape[in_axes[batched[0]]]
    else:
        raise ValueError(f"{name}: neither an input nor an output of this module has a batch axis")
    detached = {k: p.detach() for k, p in params.items()}
    total = sum(p.numel() for p in detached.values())
    if not keep:  # no output reaches f: a zero Jacobian
        g = grads[0].new_zeros(n, r, total)
        return GenericSignals(g=g, params=tuple(params.values()), name=name)

    def run(p: dict, sample: list[Tensor]) -> tuple[Tensor, ...]:
        """The kept outputs of the module on one sample (its batch axes of size one, squeezed)."""
        vals = list(leaves)
        for i, s in zip(batched, sample):
            vals[i] = s
        a, kw = with_leaves(inputs, iter(vals))
        out = tensor_leaves(functional_call(module, p, a, kw))
        return tuple(out[i].squeeze(out_axes[i]) for i in keep)

    def one_sample(sample: tuple, cots: tuple) -> Tensor:  # cots: (C, …) per kept output
        full = [s.unsqueeze(in_axes[i]) for i, s in zip(batched, sample)]
        _, pull = vjp(lambda p: run(p, full), detached)
        per_param = vmap(pull)(cots)[0]
        return torch.cat([per_param[k].reshape(r, -1) for k in detached], 1)  # (C, P_l)

    in_dims = (tuple(in_axes[i] for i in batched), tuple(out_axes[i] + 1 for i in keep))
    samples, cots = tuple(leaves[i] for i in batched), tuple(grads[i] for i in keep)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap's slow fallback
        try:
            g = vmap(one_sample, in_dims=in_dims)(samples, cots)  # (N, C, P_l)
        except RuntimeError:  # an op without a batching rule (recurrent layers): one sample at a time
            g = torch.stack(
                [
                    _one_sample_by_autograd(
                        run,
                        detached,
                        [leaves[i].narrow(in_axes[i], s, 1) for i in batched],
                        [grads[i].select(out_axes[i] + 1, s) for i in keep],
                    )
                    for s in range(n)
                ]
            )
    return GenericSignals(g=g.detach(), params=tuple(params.values()), name=name)


def _one_sample_by_autograd(run, detached: dict, sample: list[Tensor], cots: list[Tensor]) -> Tensor:
    """(C, P_l) gradients of one sample by plain autograd: one forward pass, one backward pass
    batched over the C rows (one per row where an op has no batching rule)."""
    live = {k: p.clone().requires_grad_(True) for k, p in detached.items()}
    outs = run(live, sample)
    pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
    r = cots[0].shape[0]
    if not pairs:
        return torch.zeros(r, sum(p.numel() for p in live.values()), dtype=cots[0].dtype, device=cots[0].device)
    outs, cots = [o for o, _ in pairs], [c for _, c in pairs]
    params = list(live.values())
    try:
        grads = torch.autograd.grad(outs, params, cots, is_grads_batched=True, allow_unused=True, retain_graph=True)
    except RuntimeError:
        per_row = [
            torch.autograd.grad(outs, params, [c[k] for c in cots], retain_graph=True, allow_unused=True)
            for k in range(r)
        ]
        grads = [
            None if all(g is None for g in col) else torch.stack([torch.zeros_like(p) if g is None else g for g in col])
            for col, p in zip(zip(*per_row), params)
        ]
    return torch.cat([(p.new_zeros(r, p.numel()) if g is None else g.reshape(r, -1)) for g, p in zip(grads, params)], 1)
