"""The generic kind: any other parameterized module (LayerNorm, Embedding, eval-mode BatchNorm, a
custom module with its own ``nn.Parameter``s, …), through per-sample gradients (torch.func).

The module's per-sample Jacobian is formed explicitly, G (N, C, P_l), by vmapping the vector-Jacobian
product of the module on one sample over the samples and the C output gradients. This costs
N·C·P_l memory, which suits the small parameter counts of such modules (normalization scales,
biases, embeddings of a small vocabulary). The kernel is G G′^T, the update G^T v; for K-FAC the
module keeps its exact block (it has no Kronecker structure), and unit-wise treats it as one unit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

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


def generic_signals(module: nn.Module, args: tuple, grad_out: Tensor, name: str) -> GenericSignals:
    """Per-sample gradients of ``module``'s own parameters from its inputs ``args`` (tensors with the
    sample axis first; anything else is passed as it is) and the output gradients (C, N, …)."""
    own = {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}  # frozen: no coordinate
    params = tuple(own.values())
    detached = {k: p.detach() for k, p in own.items()}
    batched = [isinstance(a, Tensor) and a.ndim > 0 and a.shape[0] == grad_out.shape[1] for a in args]

    def one_sample(sample_args, d):  # d: (C, …) output gradients of this sample
        def f(p):
            full = [s.unsqueeze(0) if b else s for s, b in zip(sample_args, batched)]
            return functional_call(module, p, tuple(full)).squeeze(0)

        _, pull = vjp(f, detached)
        grads = vmap(pull)(d)[0]
        return torch.cat([grads[k].reshape(d.shape[0], -1) for k in own], 1)  # (C, P_l)

    in_dims = (tuple(0 if b else None for b in batched), 0)
    per_sample = grad_out.transpose(0, 1)  # (N, C, …)
    with torch.enable_grad():
        try:
            g = vmap(one_sample, in_dims=in_dims)(tuple(args), per_sample)  # (N, C, P_l)
        except RuntimeError:  # an op without a batching rule: one sample and one output at a time
            g = torch.stack(
                [_sample_loop(module, own, args, batched, n, per_sample[n]) for n in range(len(per_sample))]
            )
    return GenericSignals(g=g.detach(), params=params, name=name)


def _sample_loop(module: nn.Module, own: dict, args: tuple, batched: list[bool], n: int, d: Tensor) -> Tensor:
    """(C, P_l) gradients of sample ``n`` by plain autograd, one output at a time."""
    sample = tuple(a[n : n + 1] if b else a for a, b in zip(args, batched))
    live = {k: p.detach().requires_grad_(True) for k, p in own.items()}
    out = functional_call(module, live, sample).squeeze(0)
    rows = []
    for k in range(d.shape[0]):
        grads = torch.autograd.grad(out, list(live.values()), d[k], retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros_like(p).reshape(-1) if gr is None else gr.reshape(-1)
                    for gr, p in zip(grads, live.values())
                ]
            )
        )
    return torch.stack(rows)
