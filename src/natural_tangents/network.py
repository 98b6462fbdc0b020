"""Wide MLPs in the NTK parameterization and their Jacobian's signals (the paper's (S.64)–(S.68)).

The network (docs/conventions.md), with widths M_0 (input), M_1 … M_{L−1} (hidden), M_L = C (outputs):

    h_0 = x,   u_l = (σ_w/√M_{l−1}) W_l h_{l−1} + σ_b b_l,   h_l = φ(u_l),   f = u_L

The Jacobian is never formed. For one output k the chain rule gives the per-layer derivative as
an outer product of a *backward signal* δ_l^{(k)} (M_l) and a *forward signal* a_{l−1} (the
scaled input of layer l with the bias column appended):

    ∂f_k/∂[W_l | b_l] = δ_l^{(k)} a_{l−1}^T,   a_{l−1} = [(σ_w/√M_{l−1}) h_{l−1}, σ_b]

:class:`~natural_tangents.signals.Signals` holds these signals for a batch (each layer an
:class:`~natural_tangents.layers.affine.AffineSignals` with one position); every kernel and every
Fisher of the library is built from them in O(N² M) memory instead of O(N P).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import activations as _act
from .layers.affine import affine_signals
from .signals import Signals
from .theory.architecture import Architecture
from .validation import check_batch, check_widths

__all__ = ["MLP", "AffineLayer", "mlp_signals"]


@dataclass(frozen=True)
class AffineLayer:
    """One affine layer u = weight_scale · W h + bias_scale · b, followed by ``activation``.

    ``weight`` is the parameter tensor (M_out, M_in); ``bias`` is the bias parameter (M_out) or
    ``None``. In the NTK parameterization weight_scale = σ_w/√M_in and bias_scale = σ_b; in the
    standard one both are 1. ``activation`` is ``None`` for a layer with no nonlinearity after it.
    """

    weight: Tensor
    bias: Tensor | None
    weight_scale: float
    bias_scale: float
    activation: _act.Activation | None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def trainable(self) -> bool:
        """Whether the weight or the bias requires grad (a frozen layer has no signals)."""
        return self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)

    @property
    def factor_width(self) -> int:
        """Width of the forward signal a: M_in, plus one for the bias column."""
        return self.in_features + (self.bias is not None)

    def preactivation(self, h: Tensor) -> Tensor:
        """u = weight_scale · h W^T + bias_scale · b for inputs h (N, M_in)."""
        if self.bias is None:
            return (h @ self.weight.T).mul_(self.weight_scale)
        return torch.addmm(self.bias, h, self.weight.T, beta=self.bias_scale, alpha=self.weight_scale)

    def output(self, u: Tensor) -> Tensor:
        """φ(u), or u for a layer without activation."""
        return u if self.activation is None else self.activation(u)


def mlp_signals(layers: list[AffineLayer], x: Tensor, cotangents: Callable[[Tensor], Tensor] | None = None) -> Signals:
    """Forward and backward signals of ``x`` (N, M_0) through ``layers``.

    One batched forward pass and one backward pass vectorized over all C outputs at once:
    δ_l = φ′(u_l) ⊙ (δ_{l+1} · weight_scale_{l+1} W_{l+1}) (S.65). No sample loop, no Jacobian.
    ``cotangents(f)`` (N, R, C): backward signals of the rows m_n J_n instead of the C outputs.
    """
    with torch.no_grad():
        h = x
        fwd, pre = [], []
        for layer in layers:
            u = layer.preactivation(h)
            fwd.append(h)
            pre.append(u)
            h = layer.output(u)
        f = h
        n, c = f.shape
        last = layers[-1]
        if cotangents is None:
            delta = torch.eye(c, dtype=f.dtype, device=f.device).unsqueeze(1).expand(c, n, c)
        else:
            delta = cotangents(f).to(f.dtype).permute(1, 0, 2)  # (R, N, C)
        if last.activation is not None:
            delta = delta * last.activation.derivative(pre[-1]).unsqueeze(0)
        back = [delta]
        for i in range(len(layers) - 2, -1, -1):
            nxt = layers[i + 1]
            delta = (delta @ nxt.weight).mul_(nxt.weight_scale)
            act = layers[i].activation
            if act is not None:
                delta.mul_(act.derivative(pre[i]).unsqueeze(0))
            pre[i] = None  # no longer needed
            back.append(delta)
        back.reverse()
    out = []
    for l, (h_in, b, layer) in enumerate(zip(fwd, back, layers)):
        if not layer.trainable:  # frozen: not a coordinate of the Fisher
            continue
        d = b.contiguous()[:, :, None, :]
        name = f"layer {l + 1}"
        out.append(
            affine_signals(
                layer.weight,
                layer.bias,
                h_in[:, None, :],
                d,
                name,
                scale=layer.weight_scale,
                bias_value=layer.bias_scale,
            )
        )
    return Signals(f=f, layers=tuple(out), frozen_output=not layers[-1].trainable)


class MLP(nn.Module):
    """A fully connected network in the NTK (or standard) parameterization (docs/conventions.md).

    Args:
        widths: [M_0, M_1, …, M_L]; M_0 is the input width and M_L = C the number of outputs.
        activation: a name (``"relu"``, ``"tanh"``, ``"erf"``, …), an
            :class:`~natural_tangents.activations.Activation`, or an elementwise callable.
        sigma_w2, sigma_b2: σ_w², σ_b². ``sigma_b2 = 0`` means the layers have no bias parameter.
        parameterization: ``"ntk"`` (W_l, b_l ~ N(0, 1), scaled by σ_w/√M_{l−1} and σ_b in the
            forward pass) or ``"standard"`` (W′ = σ_w/√M_{l−1} W, b′ = σ_b b stored directly).
            For the same ``seed`` both compute the same function.
        seed: seed of the initialization (draws are made in float64, then cast, so a float32
            and a float64 network with the same seed hold the same weights up to rounding).
        dtype, device: of the parameters.

    ``parameters()`` is ordered W_1, b_1, W_2, b_2, … (biases only when σ_b² > 0); W_l has shape
    (M_l, M_{l−1}). ``forward(x)`` maps (N, M_0) to f of shape (N, C).
    """

    def __init__(
        self,
        widths,
        activation: str | _act.Activation = "relu",
        sigma_w2: float = 2.0,
        sigma_b2: float = 0.0,
        parameterization: str = "ntk",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.widths = check_widths(widths)
        self.activation = _act.get(activation)
        if not (math.isfinite(sigma_w2) and sigma_w2 > 0):
            raise ValueError(f"sigma_w2: must be a positive number, got {sigma_w2}")
        if not (math.isfinite(sigma_b2) and sigma_b2 >= 0):
            raise ValueError(f"sigma_b2: must be a number >= 0 (0 means no bias), got {sigma_b2}")
        if parameterization not in ("ntk", "standard"):
            raise ValueError(f"parameterization: expected 'ntk' or 'standard', got {parameterization!r}")
        self.sigma_w2 = float(sigma_w2)
        self.sigma_b2 = float(sigma_b2)
        self.parameterization = parameterization
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        sw, sb = math.sqrt(self.sigma_w2), math.sqrt(self.sigma_b2)
        for l in range(1, len(self.widths)):
            m_in, m_out = self.widths[l - 1], self.widths[l]
            w = torch.randn(m_out, m_in, generator=gen, dtype=torch.float64)
            b = torch.randn(m_out, generator=gen, dtype=torch.float64) if self.has_bias else None
            if parameterization == "standard":
                w = w * (sw / math.sqrt(m_in))
                b = b * sb if b is not None else None
            self.register_parameter(f"W{l}", nn.Parameter(w.to(dtype=dtype, device=device)))
            if b is not None:
                self.register_parameter(f"b{l}", nn.Parameter(b.to(dtype=dtype, device=device)))

    @property
    def has_bias(self) -> bool:
        return self.sigma_b2 > 0

    @property
    def depth(self) -> int:
        """L, the number of weight layers."""
        return len(self.widths) - 1

    @property
    def architecture(self) -> Architecture:
        """Depth, activation, σ_w² and σ_b² as the infinite-width theory takes them
        (``nat.theory.ntk(x, arch=net.architecture)``)."""
        return Architecture(self.depth, self.activation, self.sigma_w2, self.sigma_b2)

    @property
    def in_features(self) -> int:
        return self.widths[0]

    @property
    def out_features(self) -> int:
        return self.widths[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W1.dtype

    @property
    def device(self) -> torch.device:
        return self.W1.device

    def layers(self) -> list[AffineLayer]:
        """The network as a list of :class:`AffineLayer` views on its parameters."""
        ntk = self.parameterization == "ntk"
        sw, sb = math.sqrt(self.sigma_w2), math.sqrt(self.sigma_b2)
        out = []
        for l in range(1, len(self.widths)):
            out.append(
                AffineLayer(
                    weight=getattr(self, f"W{l}"),
                    bias=getattr(self, f"b{l}") if self.has_bias else None,
                    weight_scale=sw / math.sqrt(self.widths[l - 1]) if ntk else 1.0,
                    bias_scale=sb if ntk else 1.0,
                    activation=self.activation if l < self.depth else None,
                )
            )
        return out

    def check_input(self, x, name: str = "x") -> Tensor:
        """``x`` as a finite (N, M_0) tensor in the network's dtype and device."""
        return check_batch(x, name, features=self.in_features, dtype=self.dtype, device=self.device)

    def forward(self, x: Tensor) -> Tensor:
        h = self.check_input(x)
        for layer in self.layers():
            h = layer.output(layer.preactivation(h))
        return h

    def signals(self, x: Tensor, name: str = "x", cotangents: Callable[[Tensor], Tensor] | None = None) -> Signals:
        """The signals of the batch ``x`` (N, M_0): forward and backward signals per layer, see
        :class:`~natural_tangents.signals.Signals`; errors name the argument ``name``; ``cotangents``
        as in :func:`natural_tangents.models.signals`."""
        return mlp_signals(self.layers(), self.check_input(x, name), cotangents)

    def extra_repr(self) -> str:
        return (
            f"widths={list(self.widths)}, activation={self.activation!r}, sigma_w2={self.sigma_w2}, "
            f"sigma_b2={self.sigma_b2}, parameterization={self.parameterization!r}"
        )
