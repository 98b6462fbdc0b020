"""Two-dimensional Gaussian expectations of an activation: closed forms and quadrature.

The infinite-width recursion (the paper's Appendix E, (S.170), (S.172)) needs, for every pair of inputs,

    A = E[φ(u) φ(u′)],   Ξ = E[φ′(u) φ′(u′)],   (u, u′) ~ N(0, [[q, Q], [Q, q′]])

with per-sample variances q, q′ and covariance Q. :func:`gaussian_expectations` returns both,
elementwise over broadcast tensors, in float64. The route is chosen by ``method``:

* ``"closed_form"``: ReLU (S.176)–(S.177), the shifted ReLU φ_s(u) = max(u, −s) (via the bivariate
  normal CDF Φ₂, see :func:`bivariate_normal_cdf`), erf (the arcsine kernel) and the identity.
* ``"quadrature"``, smooth activations (``activation.kinks == ()``): two-dimensional Gauss–Hermite
  quadrature with ``order`` nodes per dimension (default :data:`HERMITE_ORDER` = 48, i.e. 48² = 2304
  evaluations of φ and of φ′ per pair), u = √q z₁, u′ = √q′ (ρ z₁ + √(1−ρ²) z₂), ρ = Q/√(q q′).
  Its accuracy depends on how steep φ(√q z) is. Measured maximum errors over q, q′ ≤ q_max and
  all ρ (against the erf closed form, and against the trapezoidal rule of order 161 for tanh):

  ===================  ========  ========  ========  ========
  q_max                0.5       1         1.5       2
  erf, Gauss–Hermite   4e-15     3e-9      9e-7      2e-5
  tanh, Gauss–Hermite  2e-9      2e-6      3e-5      2e-4
  erf, trapezoid       4e-16     2e-12     4e-9      3e-7
  tanh, trapezoid      2e-11     6e-8      2e-6      2e-5
  ===================  ========  ========  ========  ========

  Raise ``order`` for larger variances (the error decays like exp(−c √(order / q))).
* ``"trapezoid"``, smooth activations: the same tensor-product scheme with the trapezoidal rule on
  [−9, 9] (``order`` equispaced nodes per dimension, default :data:`TRAPEZOID_ORDER` = 48, same
  cost as Gauss–Hermite). For analytic integrands under a Gaussian weight it converges like
  exp(−2πτ/h) (τ the distance of the nearest singularity of φ(√q z) from the real axis, h the node
  spacing) and is more accurate than Gauss–Hermite of the same order for saturating activations
  (table above).
* ``"series"``, smooth activations only: Mehler's formula E[φ(√q x) φ(√q′ y)] = Σ_k a_k(q) a_k(q′) ρ^k
  with the normalized Hermite coefficients a_k(q) = E[φ(√q z) He_k(z)]/√k!, computed once per
  distinct variance by a fine one-dimensional trapezoidal rule, and truncated where the tail
  Σ_{k≥K} a_k² falls below :data:`SERIES_TOL` = 1e-15 of Σ a_k² (Ξ uses b_k = √((k+1)/q) a_{k+1},
  Stein's identity, so φ′ is never evaluated). O(K) per pair instead of O(order²); accurate to
  ~1e-14 (measured for tanh, erf, GELU, softplus at q ≤ 4). The choice for large batches (see
  ``benchmarks/kernels.py``). Kinked activations are refused (their coefficients decay
  algebraically).
* ``"quadrature"`` or ``"trapezoid"``, kinked activations (``activation.kinks`` non-empty: ReLU,
  ShiftedReLU, an :class:`~natural_tangents.activations.Elementwise` with ``kink_points``): piecewise
  Gauss–Legendre quadrature that splits the plane exactly along the lines u = κ and u′ = κ′, so
  that every piece is smooth. In standardized coordinates x = u/√q, y = u′/√q′ the pair is
  x = (m + d)/√2, y = sign(ρ)(m − d)/√2 with independent m ~ N(0, 1 + |ρ|), d ~ N(0, 1 − |ρ|);
  for fixed d the kink lines cut the m-line at known points, and the d-line is split where two
  such points cross. Each piece (truncated at ±10 standard deviations) gets ``order`` Legendre
  nodes (default :data:`PIECE_ORDER` = 48; for a ReLU 2·48 × 3·48 = 13824 evaluations per pair).
  It stays accurate as ρ → ±1 (d collapses to a point) and matches the ReLU and shifted-ReLU
  closed forms to 1e-13 (order 32: 2e-8, order 24: 4e-5, limited by the long outer pieces).

``"auto"`` (default) uses the closed form when there is one, ``"quadrature"`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import activations as _act
from .closed_forms import bivariate_normal_cdf, closed_form_expectations, has_closed_form
from .hermite_series import SERIES_TOL, series_expectations
from .quadrature import (
    HERMITE_ORDER,
    PIECE_ORDER,
    TRAPEZOID_ORDER,
    hermite_rule,
    kinked_quadrature,
    smooth_quadrature,
    trapezoid_rule,
)

__all__ = [
    "HERMITE_ORDER",
    "TRAPEZOID_ORDER",
    "SERIES_TOL",
    "PIECE_ORDER",
    "METHODS",
    "gaussian_expectations",
    "second_moment",
    "bivariate_normal_cdf",
    "has_closed_form",
]

_F64 = torch.float64

METHODS = ("auto", "closed_form", "quadrature", "trapezoid", "series")


# ----------------------------------------------------------------------------- public entry
def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return method


def _check_order(order: int | None, default: int) -> int:
    if order is None:
        return default
    if int(order) != order or order < 2:
        raise ValueError(f"order: expected an integer >= 2 (quadrature nodes per dimension), got {order!r}")
    return int(order)


def gaussian_expectations(
    activation: str | _act.Activation | Callable[[Tensor], Tensor],
    q1: Tensor | float,
    q2: Tensor | float,
    cov: Tensor | float,
    *,
    method: str = "auto",
    order: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(E[φ(u)φ(u′)], E[φ′(u)φ′(u′)]) for (u, u′) ~ N(0, [[q1, cov], [cov, q2]]), elementwise.

    Args:
        activation: a name, an :class:`~natural_tangents.activations.Activation` or a callable.
        q1, q2: variances of u and u′ (> 0); cov: their covariance (|cov| ≤ √(q1 q2) up to rounding).
            Broadcast against each other, e.g. (N1, 1), (1, N2), (N1, N2) for a kernel matrix.
        method: ``"auto"``, ``"closed_form"``, ``"quadrature"``, ``"trapezoid"`` or ``"series"``
            (module docstring).
        order: quadrature nodes per dimension (per piece for kinked activations); default
            :data:`HERMITE_ORDER` or :data:`TRAPEZOID_ORDER` (smooth), :data:`PIECE_ORDER` (kinked).

    Returns:
        Two float64 tensors of the broadcast shape: A (S.170) and Ξ (S.172).
    """
    act = _act.get(activation)
    method = _check_method(method)
    raw = torch.as_tensor(q1, dtype=_F64), torch.as_tensor(q2, dtype=_F64)
    q1, q2, cov = torch.broadcast_tensors(*raw, torch.as_tensor(cov, dtype=_F64))
    if bool((raw[0] <= 0).any()) or bool((raw[1] <= 0).any()):
        raise ValueError(
            "q1, q2: variances must be > 0 (a zero input with sigma_b2 = 0 gives u ≡ 0); "
            "use sigma_b2 > 0 or non-zero inputs"
        )
    bound = torch.sqrt(q1 * q2)  # rounding in a deep recursion can push |Q| a hair past √(q q′)
    cov = torch.minimum(torch.maximum(cov, -bound), bound)
    if method == "closed_form" or (method == "auto" and has_closed_form(act)):
        return closed_form_expectations(act, q1, q2, cov)
    shape = cov.shape
    if method == "series":
        if act.kinks:
            raise ValueError(
                f"method: the Hermite series converges too slowly for the kinked {act!r}; use "
                "method='auto' (closed form) or 'quadrature' (piecewise)"
            )
        a, xi = series_expectations(act, q1, q2, cov, raw)
        return a.reshape(shape), xi.reshape(shape)
    if act.kinks:
        a, xi = kinked_quadrature(act, q1, q2, cov, _check_order(order, PIECE_ORDER))
    elif method == "trapezoid":
        rule = trapezoid_rule(_check_order(order, TRAPEZOID_ORDER))
        a, xi = smooth_quadrature(act, q1, q2, cov, rule)
    else:
        a, xi = smooth_quadrature(act, q1, q2, cov, hermite_rule(_check_order(order, HERMITE_ORDER)))
    return a.reshape(shape), xi.reshape(shape)


def second_moment(
    activation: str | _act.Activation | Callable[[Tensor], Tensor],
    q: Tensor | float,
    *,
    method: str = "auto",
    order: int | None = None,
) -> Tensor:
    """E_{u~N(0,q)}[φ(u)²] elementwise (the diagonal of A; the map behind (S.138), (S.175))."""
    q = torch.as_tensor(q, dtype=_F64)
    return gaussian_expectations(activation, q, q, q, method=method, order=order)[0]
