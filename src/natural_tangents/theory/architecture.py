"""The architecture of the infinite-width MLP: depth, activation and the weight/bias variances."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .. import activations as _act

__all__ = ["Architecture", "check_depth", "check_variances", "resolve"]


def check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
        raise ValueError(f"depth: expected an integer L >= 1 (the number of weight layers), got {depth!r}")
    return int(depth)


def check_variances(sigma_w2: float, sigma_b2: float) -> tuple[float, float]:
    sigma_w2, sigma_b2 = float(sigma_w2), float(sigma_b2)
    if not (math.isfinite(sigma_w2) and sigma_w2 > 0):
        raise ValueError(f"sigma_w2: must be a positive finite number, got {sigma_w2}")
    if not (math.isfinite(sigma_b2) and sigma_b2 >= 0):
        raise ValueError(f"sigma_b2: must be a finite number >= 0 (0 means no bias), got {sigma_b2}")
    return sigma_w2, sigma_b2


@dataclass(frozen=True)
class Architecture:
    """An L-layer MLP in the NTK parameterization, as the infinite-width theory sees it.

    Attributes:
        depth: L, the number of weight layers (``len(widths) - 1`` of the matching
            :class:`~natural_tangents.MLP`).
        activation: φ, stored as an :class:`~natural_tangents.activations.Activation` (a name such as
            ``"relu"``, an Activation or a callable is accepted).
        sigma_w2, sigma_b2: σ_w² > 0 and σ_b² ≥ 0 (0: no bias).

    Example::

        arch = nat.theory.Architecture(depth=3, activation="relu", sigma_w2=2.0, sigma_b2=0.0)
        nat.theory.ntk(x, arch=arch)
    """

    depth: int
    activation: _act.Activation
    sigma_w2: float
    sigma_b2: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", check_depth(self.depth))
        object.__setattr__(self, "activation", _act.get(self.activation))
        sw2, sb2 = check_variances(self.sigma_w2, self.sigma_b2)
        object.__setattr__(self, "sigma_w2", sw2)
        object.__setattr__(self, "sigma_b2", sb2)


def resolve(
    arch: Architecture | None,
    depth: int | None,
    activation: str | _act.Activation | Callable[[Tensor], Tensor] | None,
    sigma_w2: float | None,
    sigma_b2: float | None,
) -> Architecture:
    """``arch``, or an :class:`Architecture` from the four keywords (exactly one of the two ways)."""
    given = {"depth": depth, "activation": activation, "sigma_w2": sigma_w2, "sigma_b2": sigma_b2}
    if arch is not None:
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise ValueError(f"arch: given together with {', '.join(extra)}; pass either arch= or the four keywords")
        if not isinstance(arch, Architecture):
            raise ValueError(f"arch: expected a nat.theory.Architecture, got {type(arch).__name__}")
        return arch
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"{missing[0]}: missing; pass depth=, activation=, sigma_w2= and sigma_b2= "
            "(or arch=nat.theory.Architecture(...))"
        )
    return Architecture(depth, activation, sigma_w2, sigma_b2)
