"""Affine layers — a weight acting on input vectors, optionally at several positions — share one
set of signals: the Kronecker view of the paper's (S.64)–(S.68), extended to weight sharing over
positions (convolutions, or a Linear applied to sequences).

For sample n, position t and output k, the layer computes u_{n,t} = W a_{n,t} (with a bias column
appended to a when the layer has one), so the per-sample Jacobian of output k is

    ∂f_k(x_n)/∂[W | b] = G_n^{(k)} = Σ_t δ_{n,t}^{(k)} a_{n,t}^T          (M × p)

with the *forward signal* a (N, T, p) and the *backward signal* δ (C, N, T, M). With one position
(T = 1, the MLP) G is rank one and every kernel is a Hadamard product of two Grams (S.68):
J_l(x) J_l(x′)^T = (a a′^T) ⊙ (δ δ′^T). With T > 1 the kernel is
Σ_{t,s} (δ_{n,t}·δ′_{m,s})(a_{n,t}·a′_{m,s}), computed from the per-sample Jacobians G (memory
N·C·M·p, the cheap route for small filters) or from position sums (memory N·N′·T²·C², the cheap
route for few positions), whichever is smaller.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import Tensor

from .base import LayerSignals, Units, mirror_lower, outer_gram, padded_empty, padded_mm

__all__ = ["AffineSignals", "affine_signals", "with_bias_column"]


def with_bias_column(h: Tensor, value: float, scale: float = 1.0) -> Tensor:
    """[scale · h | value]: a constant column appended to the last axis of ``h``, written once into
    rows with an aligned stride."""
    out = padded_empty((*h.shape[:-1], h.shape[-1] + 1), like=h)
    torch.mul(h, scale, out=out[..., :-1])
    out[..., -1] = value
    return out


@dataclass(frozen=True)
class AffineSignals(LayerSignals):
    """Signals of an affine layer for a batch.

    Attributes:
        a: forward signal (N, T, p): the layer's input at each position, scaled as the layer scales
            it (σ_w/√M in the NTK parameterization, 1 in the standard one), with the bias column
            (σ_b, or 1) appended as the last entry of p when ``has_bias``.
        d: backward signal (C, N, T, M): δ[k, n, t] = ∂f_k(x_n)/∂u_{n,t}.
        has_bias: whether the last column of ``a`` belongs to a bias parameter.
        params: the trainable parameters among (weight, bias), in that order; the weight reshapes
            to (M, p − has_bias).
        name: the module's path in the model.
        has_weight: whether the weight is a parameter of the Fisher (False when it is frozen and
            only the bias trains: then ``a`` is the bias column alone, p = 1).
    """

    a: Tensor
    d: Tensor
    has_bias: bool
    params: tuple[Tensor, ...]
    name: str = ""
    has_weight: bool = True

    # ---------------------------------------------------------------- shape
    @property
    def n(self) -> int:
        return self.a.shape[0]

    @property
    def c(self) -> int:
        return self.d.shape[0]

    @property
    def positions(self) -> int:
        return self.a.shape[1]

    @property
    def in_width(self) -> int:
        """p: the forward signal's width (input features, plus one for the bias)."""
        return self.a.shape[2]

    @property
    def out_width(self) -> int:
        """M: the number of output units (features or channels)."""
        return self.d.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def kronecker(self) -> AffineSignals:
        return self

    @property
    def rank_one(self) -> bool:
        return self.positions == 1

    @cached_property
    def a2(self) -> Tensor:
        """The forward signal as (N·T, p) rows (sample-major, then position); computed once (a copy
        when the rows are stored with an aligned stride)."""
        return self.a.reshape(-1, self.a.shape[2])

    def flat_delta(self, dtype: torch.dtype | None = None) -> Tensor:
        """δ as an (N·C, M) matrix, rows sample-major (n, k); only for T = 1."""
        d = self.d[:, :, 0, :] if dtype is None else self.d[:, :, 0, :].to(dtype)
        return d.permute(1, 0, 2).reshape(self.n * self.c, self.out_width)

    # ---------------------------------------------------------------- interface
    def gram(self, other: LayerSignals | None = None, dtype: torch.dtype | None = None) -> Tensor:
        o = self if other is None else other
        dtype = dtype or self.dtype
        n1, n2, c1, c2 = self.n, o.n, self.c, o.c
        if self.positions == 1 and o.positions == 1:
            same = o is self  # then both Grams as lower triangles, the product mirrored once
            a = outer_gram(self.a[:, 0].to(dtype), None if same else o.a[:, 0].to(dtype), mirror=False)  # (N1, N2)
            d1 = self.flat_delta(dtype)  # (N1·C1, M)
            b = outer_gram(d1, None if same else o.flat_delta(dtype), mirror=False)  # (N1·C1, N2·C2)
            if c1 == 1 and c2 == 1:
                out = b.mul_(a)
            else:
                out = (b.reshape(n1, c1, n2, c2) * a[:, None, :, None]).reshape(n1 * c1, n2 * c2)
            return mirror_lower(out) if same else out
        t1, t2 = self.positions, o.positions
        if (n1 + n2) * self.out_width * self.in_width <= n1 * n2 * t1 * t2 * max(c1, c2):  # per-sample Jacobians
            g1 = self._per_sample(dtype).reshape(n1 * c1, -1)
            g2 = g1 if o is self else o._per_sample(dtype).reshape(n2 * c2, -1)
            return g1 @ g2.T
        aa = torch.einsum("ntp,msp->nmts", self.a.to(dtype), o.a.to(dtype))  # (N1, N2, T1, T2)
        dd = torch.einsum("kntq,jmsq->nkmjts", self.d.to(dtype), o.d.to(dtype))
        return (dd * aa[:, None, :, None]).sum((-2, -1)).reshape(n1 * c1, n2 * c2)

    def matrix_update(self, v: Tensor) -> Tensor:
        """Σ_{n,k} v[n, k] G_n^{(k)} (M, p) for v (N, C), in the model's dtype (J_l^T v as a matrix)."""
        w = torch.einsum("nk,kntm->ntm", v.to(self.dtype), self.d)  # (N, T, M)
        return padded_mm(w.reshape(-1, self.out_width).T, self.a2)

    def to_params(self, mat: Tensor) -> list[Tensor]:
        """An (…, M, p) [W | b] matrix → the module's trainable parameter tensors (views where possible)."""
        out = []
        if self.has_weight:
            w = self.params[0]
            out.append((mat[..., :-1] if self.has_bias else mat).reshape(*mat.shape[:-2], *w.shape))
        if self.has_bias:
            out.append(mat[..., -1])
        return out

    def transpose(self, v: Tensor) -> list[Tensor]:
        return self.to_params(self.matrix_update(v))

    def from_params(self, tensors: list[Tensor]) -> Tensor:
        """The module's trainable parameter tensors (or tensors shaped like them) as one (M, p) [W | b]
        matrix, the inverse of :meth:`to_params`."""
        parts, it = [], iter(tensors)
        if self.has_weight:
            parts.append(next(it).reshape(self.out_width, -1))
        if self.has_bias:
            parts.append(next(it).reshape(self.out_width, 1))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def jvp(self, update: list[Tensor]) -> Tensor:
        u = self.from_params(update).to(self.dtype)  # (M, p)
        out = (self.a2 @ u.T).reshape(self.n, self.positions, self.out_width)  # U a_{n,t}
        return torch.einsum("kntm,ntm->nk", self.d, out)

    def _per_sample(self, dtype: torch.dtype) -> Tensor:
        """G (N, C, M, p): the per-sample Jacobians as [W | b] matrices."""
        if self.positions == 1:
            return self.d[:, :, 0].to(dtype).permute(1, 0, 2)[..., None] * self.a[:, 0].to(dtype)[:, None, None, :]
        return torch.einsum("kntm,ntp->nkmp", self.d.to(dtype), self.a.to(dtype))

    def jacobian(self, dtype: torch.dtype | None = None) -> Tensor:
        g = self._per_sample(dtype or self.dtype)  # (N, C, M, p)
        rows = self.n * self.c
        if not (self.has_bias and self.has_weight):
            return g.reshape(rows, -1)
        return torch.cat([g[..., :-1].reshape(rows, -1), g[..., -1].reshape(rows, -1)], 1)

    def units(self, dtype: torch.dtype | None = None) -> Units:
        """The per-output-channel units; shared over positions, their per-sample Jacobians are summed
        over the positions in the network's precision (as autograd's gradient is) and then cast."""
        g = self._per_sample(self.dtype if self.positions > 1 else dtype or self.dtype).to(dtype or self.dtype)
        jac = g.permute(2, 0, 1, 3).reshape(self.out_width, self.n * self.c, self.in_width)
        return Units(jac=jac, to_params=self.to_params)

    def mix(self, m: Tensor) -> AffineSignals:
        """Output rows m_n δ_n: m (N, R, C); the forward signal is shared."""
        return replace(self, d=torch.einsum("nrc,cntm->rntm", m.to(self.dtype), self.d))

    def to(self, dtype: torch.dtype) -> AffineSignals:
        return replace(self, a=self.a.to(dtype), d=self.d.to(dtype))

    @classmethod
    def cat(cls, parts: list[AffineSignals]) -> AffineSignals:
        first = parts[0]
        return replace(first, a=torch.cat([p.a for p in parts], 0), d=torch.cat([p.d for p in parts], 1))

    def tensors(self) -> list[Tensor]:
        return [self.a, self.d.transpose(0, 1)]  # sample axis first

    def with_tensors(self, tensors: list[Tensor]) -> AffineSignals:
        return replace(self, a=tensors[0], d=tensors[1].transpose(0, 1).contiguous())


def affine_signals(
    module_weight: Tensor,
    module_bias: Tensor | None,
    inp: Tensor,
    d: Tensor,
    name: str,
    *,
    scale: float = 1.0,
    bias_value: float = 1.0,
) -> AffineSignals:
    """The signals of an affine layer from its input rows ``inp`` (N, T, M_in) and backward signal
    ``d`` (C, N, T, M): the forward signal holds ``scale`` · inp for a trainable weight and the
    column ``bias_value`` for a trainable bias. Frozen parameters (``requires_grad=False``) are not
    coordinates of the Fisher: they get no column and no entry in ``params``."""
    w_on = module_weight.requires_grad
    b_on = module_bias is not None and module_bias.requires_grad
    if w_on and b_on:
        a = with_bias_column(inp, bias_value, scale)
    elif w_on:
        a = inp if scale == 1.0 else inp * scale
    elif b_on:
        a = inp.new_full((*inp.shape[:-1], 1), bias_value)
    else:
        raise ValueError(f"{name}: every parameter of this layer is frozen; it has no signals")
    params = tuple(p for p, on in ((module_weight, w_on), (module_bias, b_on)) if on)
    return AffineSignals(a=a, d=d, has_bias=b_on, params=params, name=name, has_weight=w_on)
