"""Pointwise activation functions φ with their derivatives φ′.

Each activation is a small immutable object carrying what both the finite-width code and the
infinite-width theory need:

* ``activation(u)`` evaluates φ elementwise, ``activation.derivative(u)`` evaluates φ′;
* ``kinks`` lists the points where φ′ jumps (the theory integrates piecewise between them);
* ``name`` is the string that :func:`get` accepts (for the parameter-free ones).

Strings name the parameter-free activations: ``"relu"``, ``"tanh"``, ``"erf"``, ``"identity"``
(alias ``"linear"``), ``"gelu"``, ``"softplus"``, ``"sigmoid"``. ``ShiftedReLU(s)`` is the paper's
φ_s(u) = max(u, −s) (Appendix C.3.3) and :class:`Elementwise` wraps any elementwise torch function,
its derivative taken by autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "Activation",
    "ReLU",
    "ShiftedReLU",
    "Tanh",
    "Erf",
    "Identity",
    "GELU",
    "Softplus",
    "Sigmoid",
    "Elementwise",
    "Composed",
    "get",
    "NAMES",
]


class Activation:
    """Base class: an elementwise φ with derivative φ′ (both map tensors to tensors of the same shape)."""

    name: str = "activation"
    kinks: tuple[float, ...] = ()

    def __call__(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def derivative(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True, repr=False)
class ReLU(Activation):
    """φ(u) = max(u, 0); φ′(u) = 1 for u > 0, else 0 (closed-form kernels: the paper's (S.176)–(S.178))."""

    name = "relu"
    kinks = (0.0,)

    def __call__(self, u: Tensor) -> Tensor:
        return torch.clamp_min(u, 0.0)

    def derivative(self, u: Tensor) -> Tensor:
        return (u > 0).to(u.dtype)


@dataclass(frozen=True, repr=False)
class ShiftedReLU(Activation):
    """The paper's shifted ReLU φ_s(u) = max(u, −s) (Appendix C.3.3); ``s = 0`` is the ReLU."""

    s: float = 1.0
    name = "shifted_relu"

    @property
    def kinks(self) -> tuple[float, ...]:  # type: ignore[override]
        return (-float(self.s),)

    def __call__(self, u: Tensor) -> Tensor:
        return torch.clamp_min(u, -float(self.s))

    def derivative(self, u: Tensor) -> Tensor:
        return (u > -float(self.s)).to(u.dtype)

    def __repr__(self) -> str:
        return f"ShiftedReLU(s={self.s})"


@dataclass(frozen=True, repr=False)
class Tanh(Activation):
    """φ(u) = tanh(u); φ′(u) = 1 − tanh²(u)."""

    name = "tanh"

    def __call__(self, u: Tensor) -> Tensor:
        return torch.tanh(u)

    def derivative(self, u: Tensor) -> Tensor:
        return 1.0 - torch.tanh(u) ** 2


@dataclass(frozen=True, repr=False)
class Erf(Activation):
    """φ(u) = erf(u); φ′(u) = 2/√π · exp(−u²) (arcsine closed-form kernel)."""

    name = "erf"

    def __call__(self, u: Tensor) -> Tensor:
        return torch.erf(u)

    def derivative(self, u: Tensor) -> Tensor:
        return (2.0 / math.sqrt(math.pi)) * torch.exp(-(u**2))


@dataclass(frozen=True, repr=False)
class Identity(Activation):
    """φ(u) = u (a deep linear network)."""

    name = "identity"

    def __call__(self, u: Tensor) -> Tensor:
        return u

    def derivative(self, u: Tensor) -> Tensor:
        return torch.ones_like(u)


@dataclass(frozen=True, repr=False)
class GELU(Activation):
    """φ(u) = u Φ(u) with Φ the standard normal CDF (exact, not the tanh approximation)."""

    name = "gelu"

    def __call__(self, u: Tensor) -> Tensor:
        return u * _normal_cdf(u)

    def derivative(self, u: Tensor) -> Tensor:
        return _normal_cdf(u) + u * torch.exp(-0.5 * u**2) / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True, repr=False)
class Softplus(Activation):
    """φ(u) = log(1 + e^u); φ′(u) = sigmoid(u)."""

    name = "softplus"

    def __call__(self, u: Tensor) -> Tensor:
        return torch.nn.functional.softplus(u)

    def derivative(self, u: Tensor) -> Tensor:
        return torch.sigmoid(u)


@dataclass(frozen=True, repr=False)
class Sigmoid(Activation):
    """φ(u) = 1 / (1 + e^{−u}); φ′ = φ(1 − φ)."""

    name = "sigmoid"

    def __call__(self, u: Tensor) -> Tensor:
        return torch.sigmoid(u)

    def derivative(self, u: Tensor) -> Tensor:
        s = torch.sigmoid(u)
        return s * (1.0 - s)


@dataclass(frozen=True, repr=False)
class Elementwise(Activation):
    """Any elementwise torch function ``fn``; φ′ is ``grad`` if given (a closed form), else autograd.

    ``kink_points`` may list points where φ′ is discontinuous so that the theory integrates piecewise.
    """

    fn: Callable[[Tensor], Tensor]
    label: str = "elementwise"
    kink_points: tuple[float, ...] = field(default=())
    grad: Callable[[Tensor], Tensor] | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    @property
    def kinks(self) -> tuple[float, ...]:  # type: ignore[override]
        return tuple(self.kink_points)

    def __call__(self, u: Tensor) -> Tensor:
        return self.fn(u)

    def derivative(self, u: Tensor) -> Tensor:
        if self.grad is not None:
            return self.grad(u)
        with torch.enable_grad():
            v = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.fn(v).sum(), v)
        return g.detach()

    def __repr__(self) -> str:
        return f"Elementwise({self.label})"


@dataclass(frozen=True, repr=False)
class Composed(Activation):
    """φ = φ_k ∘ … ∘ φ_1 (applied in the order given); φ′ by the chain rule."""

    parts: tuple[Activation, ...]

    @property
    def name(self) -> str:  # type: ignore[override]
        return "∘".join(p.name for p in reversed(self.parts))

    def __call__(self, u: Tensor) -> Tensor:
        for p in self.parts:
            u = p(u)
        return u

    def derivative(self, u: Tensor) -> Tensor:
        d = torch.ones_like(u)
        for p in self.parts:
            d = d * p.derivative(u)
            u = p(u)
        return d

    def __repr__(self) -> str:
        return f"Composed({', '.join(map(repr, self.parts))})"


def _normal_cdf(u: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))


_BY_NAME: dict[str, Callable[[], Activation]] = {
    "relu": ReLU,
    "tanh": Tanh,
    "erf": Erf,
    "identity": Identity,
    "linear": Identity,
    "gelu": GELU,
    "softplus": Softplus,
    "sigmoid": Sigmoid,
}
NAMES: tuple[str, ...] = tuple(_BY_NAME)


def get(activation: str | Activation | Callable[[Tensor], Tensor]) -> Activation:
    """Resolve ``activation`` (a name, an :class:`Activation`, or an elementwise callable).

    Raises ``ValueError`` naming the argument for an unknown name.
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.strip().lower()
        if key not in _BY_NAME:
            raise ValueError(
                f"activation: unknown name {activation!r}; use one of {sorted(_BY_NAME)}, "
                "nat.activations.ShiftedReLU(s), or nat.activations.Elementwise(fn)"
            )
        return _BY_NAME[key]()
    if callable(activation):
        return Elementwise(activation, label=getattr(activation, "__name__", "elementwise"))
    raise ValueError(f"activation: expected a name, an Activation or a callable, got {type(activation).__name__}")
