"""Two-dimensional Gaussian expectations of an activation: closed forms and quadrature.

The infinite-width recursion (seed Appendix E, (S.170), (S.172)) needs, for every pair of inputs,

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

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .. import activations as _act

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

HERMITE_ORDER = 48
"""Default Gauss–Hermite order (nodes per dimension) for smooth activations."""

TRAPEZOID_ORDER = 48
"""Default number of trapezoidal nodes per dimension for smooth activations."""

PIECE_ORDER = 48
"""Default Gauss–Legendre order (nodes per piece and dimension) for kinked activations."""

METHODS = ("auto", "closed_form", "quadrature", "trapezoid", "series")

SERIES_TOL = 1e-15
"""The Hermite series is truncated where its tail Σ_{k≥K} a_k² falls below this fraction of the total."""

_SERIES_KMAX = (256, 1024)  # the series is tried with these many terms before giving up
_TRAPEZOID_RANGE = 9.0

_TRUNCATION = 10.0  # standard deviations kept by the piecewise rule (tail mass < 1e-22)
_CHUNK = 1 << 19  # elements of the largest temporary in the quadrature loops (4 MiB in float64)
_F64 = torch.float64


# ---------------------------------------------------------------------------------------- rules
@lru_cache(maxsize=16)
def _hermite(order: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of E_{z~N(0,1)}[g(z)] ≈ Σ w_i g(z_i) (probabilists' Hermite)."""
    z, w = np.polynomial.hermite_e.hermegauss(order)
    return torch.from_numpy(z).to(_F64), torch.from_numpy(w / w.sum()).to(_F64)


@lru_cache(maxsize=16)
def _trapezoid(order: int) -> tuple[Tensor, Tensor]:
    """Equispaced nodes on [−9, 9] with weights h·N(0,1)-density, normalized to sum to one."""
    z = torch.linspace(-_TRAPEZOID_RANGE, _TRAPEZOID_RANGE, order, dtype=_F64)
    w = _phi(z)
    return z, w / w.sum()


@lru_cache(maxsize=16)
def _legendre(order: int) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre nodes and weights on [−1, 1]."""
    x, w = np.polynomial.legendre.leggauss(order)
    return torch.from_numpy(x).to(_F64), torch.from_numpy(w).to(_F64)


def _phi(x: Tensor) -> Tensor:
    """Standard normal density."""
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _cdf(x: Tensor) -> Tensor:
    """Standard normal CDF Φ (accurate in both tails)."""
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def _chunks(n: int, per_item: int):
    """Slices of range(n) so that a chunk holds about _CHUNK elements of size ``per_item`` each."""
    step = max(1, _CHUNK // max(1, per_item))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _correlation(q1: Tensor, q2: Tensor, cov: Tensor) -> Tensor:
    """ρ = Q / √(q q′), clipped to [−1, 1] (rounding can push it past ±1 on the diagonal)."""
    return (cov / torch.sqrt(q1 * q2)).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------- bivariate normal CDF
_BVN_LEVELS = 20
_BVN_NODES = 10


@lru_cache(maxsize=1)
def _bvn_mesh() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Geometric mesh of t ∈ [0, π/2] graded towards t = 0: [π/2^{j+2}, π/2^{j+1}], then [0, …]."""
    x, w = _legendre(_BVN_NODES)
    edges = [math.pi / 2 ** (j + 1) for j in range(_BVN_LEVELS + 1)] + [0.0]
    hi = torch.tensor(edges[:-1], dtype=_F64)
    lo = torch.tensor(edges[1:], dtype=_F64)
    return x, w, lo, hi


def bivariate_normal_cdf(h: Tensor, k: Tensor, rho: Tensor) -> Tensor:
    """Φ₂(h, k; ρ) = P(X ≤ h, Y ≤ k) for standard normals with correlation ρ, elementwise.

    Sheppard's formula Φ₂ = Φ(h)Φ(k) + (1/2π) ∫_0^{arcsin ρ} exp(−(h² + k² − 2hk sin θ)/(2cos²θ)) dθ,
    integrated with Gauss–Legendre on a mesh graded geometrically towards θ = ±π/2, where the
    integrand has a boundary layer of width |h ∓ k| as ρ → ±1 (20 levels × 10 nodes; absolute error
    below 1e-13 for all ρ ∈ [−1, 1], including ρ = ±1 exactly).
    """
    h, k, rho = torch.broadcast_tensors(
        torch.as_tensor(h, dtype=_F64), torch.as_tensor(k, dtype=_F64), torch.as_tensor(rho, dtype=_F64)
    )
    shape = h.shape
    h, k, rho = h.reshape(-1), k.reshape(-1), rho.clamp(-1.0, 1.0).reshape(-1)
    x, w, lo, hi = _bvn_mesh()
    out = torch.empty_like(h)
    for sl in _chunks(h.numel(), lo.numel() * x.numel()):
        hh, kk, rr = h[sl, None, None], k[sl, None, None], rho[sl]
        sign = torch.where(rr < 0, -1.0, 1.0)
        # θ = sign·(π/2 − t), t from t_end = π/2 − |arcsin ρ| up to π/2
        t_end = (0.5 * math.pi - torch.asin(rr.abs()))[:, None]
        a = torch.maximum(lo, t_end)
        b = torch.maximum(hi, t_end)
        half = (0.5 * (b - a))[..., None]
        t = (0.5 * (b + a))[..., None] + half * x
        s = sign[:, None, None]
        # h² + k² − 2hk sin θ with sin θ = s·cos t, written without cancellation near t = 0
        num = (hh - s * kk) ** 2 + 4.0 * s * hh * kk * torch.sin(0.5 * t) ** 2
        f = torch.exp(-num / (2.0 * torch.sin(t) ** 2))
        integral = (f * half * w).sum((-1, -2))
        out[sl] = _cdf(h[sl]) * _cdf(k[sl]) + sign * integral / (2.0 * math.pi)
    return out.reshape(shape)


# ------------------------------------------------------------------------------ closed forms
def _relu_closed(q1: Tensor, q2: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """(S.176)–(S.177) with per-sample variances: the arc-cosine kernel of degree 1 and 0."""
    rho = _correlation(q1, q2, cov)
    angle = 0.5 * math.pi + torch.asin(rho)  # π − arccos ρ
    a = torch.sqrt(q1 * q2) / (2.0 * math.pi) * (torch.sqrt((1.0 - rho * rho).clamp_min(0.0)) + rho * angle)
    xi = angle / (2.0 * math.pi)
    return a, xi


def _erf_closed(q1: Tensor, q2: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """φ = erf: A = (2/π) arcsin(2Q/√((1+2q)(1+2q′))), Ξ = (4/π) / √((1+2q)(1+2q′) − 4Q²)."""
    d = (1.0 + 2.0 * q1) * (1.0 + 2.0 * q2)
    a = (2.0 / math.pi) * torch.asin((2.0 * cov / torch.sqrt(d)).clamp(-1.0, 1.0))
    xi = (4.0 / math.pi) / torch.sqrt(d - 4.0 * cov * cov)
    return a, xi


def _identity_closed(q1: Tensor, q2: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    q1, q2, cov = torch.broadcast_tensors(q1, q2, cov)
    return cov.clone(), torch.ones_like(cov)


def _shifted_relu_closed(s: float, q1: Tensor, q2: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """φ_s(u) = max(u, −s) = relu(u + s) − s, via truncated bivariate normal moments.

    With X = u/√q, Y = u′/√q′ (correlation ρ) and the truncation points a = −s/√q, b = −s/√q′:
    Ξ = P(X > a, Y > b) = Φ₂(−a, −b; ρ), and A follows from E[1], E[X 1], E[XY 1] on that quadrant
    (Stein's identity E[X g] = E[∂_x g] + ρ E[∂_y g]).
    """
    q1, q2, cov = torch.broadcast_tensors(q1, q2, cov)
    rho = _correlation(q1, q2, cov)
    r1, r2 = torch.sqrt(q1), torch.sqrt(q2)
    a, b = -s / r1, -s / r2
    c = torch.sqrt((1.0 - rho * rho).clamp_min(0.0))
    p = bivariate_normal_cdf(-a, -b, rho)

    def ratio(num: Tensor) -> Tensor:  # num / c with 0/0 → 0 (ρ = ±1 on the kink line)
        return torch.where(num == 0, torch.zeros_like(num), num / c)

    ca = _cdf(ratio(rho * a - b))  # P(Y > b | X = a)
    cb = _cdf(ratio(rho * b - a))  # P(X > a | Y = b)
    pa, pb = _phi(a), _phi(b)
    ex = pa * ca + rho * pb * cb
    ey = pb * cb + rho * pa * ca
    exy = rho * p + rho * a * pa * ca + rho * b * pb * cb + pa * c * _phi(ratio(b - rho * a))
    both = r1 * r2 * exy + s * r1 * ex + s * r2 * ey + s * s * p  # E[(u+s)(u'+s) 1]
    m1 = r1 * pa + s * _cdf(-a)  # E[(u+s) 1{u > −s}]
    m2 = r2 * pb + s * _cdf(-b)
    return both - s * (m1 + m2) + s * s, p


def has_closed_form(activation: _act.Activation) -> bool:
    """Whether :func:`gaussian_expectations` has a closed form for ``activation``."""
    return isinstance(activation, _act.ReLU | _act.ShiftedReLU | _act.Erf | _act.Identity)


def _closed(activation: _act.Activation, q1: Tensor, q2: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    if isinstance(activation, _act.ReLU):
        return _relu_closed(q1, q2, cov)
    if isinstance(activation, _act.ShiftedReLU):
        if float(activation.s) == 0.0:
            return _relu_closed(q1, q2, cov)
        return _shifted_relu_closed(float(activation.s), q1, q2, cov)
    if isinstance(activation, _act.Erf):
        return _erf_closed(q1, q2, cov)
    if isinstance(activation, _act.Identity):
        return _identity_closed(q1, q2, cov)
    raise ValueError(
        f"method: no closed form for {activation!r} (closed forms: ReLU, ShiftedReLU, erf, identity); "
        "use method='quadrature' or 'auto'"
    )


# ------------------------------------------------------------------------ smooth quadrature
def _value_and_derivative(activation: _act.Activation, u: Tensor) -> tuple[Tensor, Tensor]:
    """(φ(u), φ′(u)), sharing the transcendental evaluation where the derivative allows it."""
    if isinstance(activation, _act.Tanh):
        t = torch.tanh(u)
        return t, 1.0 - t * t
    if isinstance(activation, _act.Sigmoid):
        t = torch.sigmoid(u)
        return t, t * (1.0 - t)
    if isinstance(activation, _act.GELU):
        cdf, pdf = _cdf(u), _phi(u)
        return u * cdf, cdf + u * pdf
    return activation(u), activation.derivative(u)


def _smooth_quadrature(
    activation: _act.Activation, q1: Tensor, q2: Tensor, cov: Tensor, rule: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """Tensor-product rule (z, w): u = √q z₁, u′ = √q′(ρ z₁ + √(1−ρ²) z₂), order² nodes per pair."""
    z, w = rule
    rho = _correlation(q1, q2, cov).reshape(-1)
    r1, r2 = torch.sqrt(q1).reshape(-1), torch.sqrt(q2).reshape(-1)
    c = torch.sqrt((1.0 - rho * rho).clamp_min(0.0))
    a_out, x_out = torch.empty_like(rho), torch.empty_like(rho)
    k = z.numel()
    for sl in _chunks(rho.numel(), k * k):
        u = r1[sl, None] * z  # (E, K)
        fu, du = _value_and_derivative(activation, u)
        v = torch.addcmul(  # (E, K, K): √q′ (ρ z_i + √(1−ρ²) z_j)
            (r2[sl] * rho[sl])[:, None, None] * z[:, None], (r2[sl] * c[sl])[:, None, None], z
        )
        gv, dv = _value_and_derivative(activation, v)
        fu, du = fu * w, du * w
        gv, dv = gv @ w, dv @ w  # (E, K): inner expectations over z₂
        a_out[sl] = (fu * gv).sum(-1)
        x_out[sl] = (du * dv).sum(-1)
    return a_out, x_out


# ----------------------------------------------------------------------- kinked quadrature
def _piece_rule(lo: Tensor, hi: Tensor, order: int) -> tuple[Tensor, Tensor]:
    """Legendre nodes and weights (including the N(0,1) density) on sorted breakpoints.

    ``lo``/``hi`` of shape (..., P) are the pieces' ends (clipped, possibly empty); returns nodes and
    weights of shape (..., P·order).
    """
    x, w = _legendre(order)
    half = (0.5 * (hi - lo)).unsqueeze(-1)
    t = (0.5 * (hi + lo)).unsqueeze(-1) + half * x
    wt = half * w * _phi(t)
    return t.flatten(-2), wt.flatten(-2)


def _pieces(breaks: Tensor) -> tuple[Tensor, Tensor]:
    """Breakpoints (..., p) → piece ends (..., p + 1) on [−T, T]."""
    tt = torch.full((*breaks.shape[:-1], 1), _TRUNCATION, dtype=_F64)
    pts = torch.cat([-tt, breaks.clamp(-_TRUNCATION, _TRUNCATION).sort(-1).values, tt], -1)
    return pts[..., :-1], pts[..., 1:]


def _kinked_quadrature(
    activation: _act.Activation, q1: Tensor, q2: Tensor, cov: Tensor, order: int
) -> tuple[Tensor, Tensor]:
    """Piecewise Gauss–Legendre over the pieces cut by the kink lines (see the module docstring)."""
    kinks = torch.tensor(sorted(float(k) for k in activation.kinks), dtype=_F64)
    rho = _correlation(q1, q2, cov).reshape(-1)
    r1, r2 = torch.sqrt(q1).reshape(-1), torch.sqrt(q2).reshape(-1)
    sign = torch.where(rho < 0, -1.0, 1.0)
    sm, sd = torch.sqrt(1.0 + rho.abs()), torch.sqrt((1.0 - rho.abs()).clamp_min(0.0))
    kx = math.sqrt(2.0) * kinks / r1[:, None]  # kinks of f at m + d = kx
    ky = math.sqrt(2.0) * kinks / r2[:, None] * sign[:, None]  # kinks of g at m − d = ky
    # d-breakpoints (in units of sd): where a kink of f meets a kink of g on the m-line
    cross = (kx[:, :, None] - ky[:, None, :]).flatten(1) / 2.0
    tiny = sd[:, None] <= 1e-300
    d_breaks = torch.where(tiny, torch.full_like(cross, math.inf), cross / torch.where(tiny, 1.0, sd[:, None]))
    p_out = d_breaks.shape[1] + 1
    p_in = 2 * kinks.numel() + 1
    a_out, x_out = torch.empty_like(rho), torch.empty_like(rho)
    per = p_out * p_in * order * order
    for sl in _chunks(rho.numel(), per):
        td, wd = _piece_rule(*_pieces(d_breaks[sl]), order)  # (E, O)
        d = sd[sl, None] * td  # (E, O)
        # m-breakpoints for each outer node, in units of sm: m = kx − d and m = ky + d
        mb = torch.cat([kx[sl, None, :] - d[..., None], ky[sl, None, :] + d[..., None]], -1)
        tm, wm = _piece_rule(*_pieces(mb / sm[sl, None, None]), order)  # (E, O, I)
        m = sm[sl, None, None] * tm
        d3 = d[..., None]
        u = r1[sl, None, None] * (m + d3) / math.sqrt(2.0)
        v = r2[sl, None, None] * sign[sl, None, None] * (m - d3) / math.sqrt(2.0)
        wt = wm * wd[..., None]
        a_out[sl] = (activation(u) * activation(v) * wt).sum((-1, -2))
        x_out[sl] = (activation.derivative(u) * activation.derivative(v) * wt).sum((-1, -2))
    return a_out, x_out


# ---------------------------------------------------------------------------- Hermite series
@lru_cache(maxsize=4)
def _hermite_basis(kmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """Trapezoidal nodes z, weights h·ϕ(z)^{1/2}, and the Hermite functions
    ψ_k(z) = He_k(z)/√k! · ϕ(z)^{1/2} for k = 0 … kmax (rows), by their stable three-term recurrence."""
    half = 2.0 * math.sqrt(kmax) + 12.0  # beyond the oscillatory region |z| < 2√k, plus the tail
    h = 0.6 / math.sqrt(kmax)  # about 10 nodes per wavelength 2π/√k of ψ_kmax
    z = torch.arange(-half, half + h / 2, h, dtype=_F64)
    root = torch.sqrt(_phi(z))
    psi = torch.empty(kmax + 1, z.numel(), dtype=_F64)
    psi[0] = root
    if kmax >= 1:
        psi[1] = z * root
    for k in range(1, kmax):
        psi[k + 1] = (z * psi[k] - math.sqrt(k) * psi[k - 1]) / math.sqrt(k + 1)
    return z, h * root, psi


def _series_coefficients(activation: _act.Activation, qs: Tensor) -> tuple[Tensor, Tensor]:
    """Normalized Hermite coefficients a_k(q) = E[φ(√q z) He_k(z)]/√k! and b_k(q) = E[φ′(√q z) He_k(z)]/√k!
    for each q, (U, K) each. b comes from Stein's identity b_k = √((k+1)/q) a_{k+1}. The series is cut
    at the first K whose tail Σ_{k≥K} max(a_k², b_k²) is below SERIES_TOL of the total (the truncation
    error of every kernel entry, |ρ| ≤ 1, is at most that tail), provided the computed coefficients
    have visibly decayed before the last one."""
    for kmax in _SERIES_KMAX:
        z, wt, psi = _hermite_basis(kmax + 1)
        vals = activation(torch.sqrt(qs)[:, None] * z) * wt  # (U, Z)
        a = vals @ psi.T  # (U, kmax + 2)
        ks = torch.arange(kmax + 1, dtype=_F64)
        b = a[:, 1:] * torch.sqrt((ks + 1)[None, :] / qs[:, None])
        a = a[:, :-1]
        size = torch.maximum(a * a, b * b).amax(0)  # (kmax + 1,)
        tail = size.flip(0).cumsum(0).flip(0)  # tail[k] = Σ_{j ≥ k} size_j
        total = float(tail[0])
        if total == 0.0 or float(tail[-16:].max()) <= 1e-3 * SERIES_TOL * total:
            k_eff = int((tail > SERIES_TOL * total).sum()) if total > 0 else 1
            return a[:, : max(k_eff, 1)].contiguous(), b[:, : max(k_eff, 1)].contiguous()
    raise ValueError(
        f"method: the Hermite series of {activation!r} has not converged after {_SERIES_KMAX[-1]} terms "
        f"(a kink, or a very steep φ at q = {float(qs.max()):.3g}); use method='quadrature', or declare "
        "the kinks of an Elementwise activation"
    )


def _series(
    activation: _act.Activation, q1: Tensor, q2: Tensor, cov: Tensor, raw: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """Mehler's formula: E[φ(u)φ(u′)] = Σ_k a_k(q) a_k(q′) ρ^k (and with b for φ′), by Horner's rule.
    ``raw`` are q1, q2 before broadcasting (their distinct values are found on these)."""
    rho = _correlation(q1, q2, cov).reshape(-1)
    # one coefficient vector per distinct variance; variances equal to ~1e-12 (unit-norm inputs after
    # rounding) share one, which changes the kernel by a relative ~1e-12 at most
    r1, r2 = raw
    key = torch.round(torch.log(torch.cat([r1.reshape(-1), r2.reshape(-1)])) * 2.0**40)
    keys, inv = torch.unique(key, return_inverse=True)
    qs = torch.exp(keys / 2.0**40)
    a, b = _series_coefficients(activation, qs)
    if qs.numel() > 1:
        i1 = inv[: r1.numel()].reshape(r1.shape).expand(q1.shape).reshape(-1)
        i2 = inv[r1.numel() :].reshape(r2.shape).expand(q2.shape).reshape(-1)
    out_a, out_x = torch.zeros_like(rho), torch.zeros_like(rho)
    for k in range(a.shape[1] - 1, -1, -1):
        if qs.numel() == 1:
            pa, pb = a[0, k] ** 2, b[0, k] ** 2
        else:
            pa, pb = a[i1, k] * a[i2, k], b[i1, k] * b[i2, k]
        out_a.mul_(rho).add_(pa)
        out_x.mul_(rho).add_(pb)
    return out_a, out_x


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
        return _closed(act, q1, q2, cov)
    shape = cov.shape
    if method == "series":
        if act.kinks:
            raise ValueError(
                f"method: the Hermite series converges too slowly for the kinked {act!r}; use "
                "method='auto' (closed form) or 'quadrature' (piecewise)"
            )
        a, xi = _series(act, q1, q2, cov, raw)
        return a.reshape(shape), xi.reshape(shape)
    if act.kinks:
        a, xi = _kinked_quadrature(act, q1, q2, cov, _check_order(order, PIECE_ORDER))
    elif method == "trapezoid":
        rule = _trapezoid(_check_order(order, TRAPEZOID_ORDER))
        a, xi = _smooth_quadrature(act, q1, q2, cov, rule)
    else:
        a, xi = _smooth_quadrature(act, q1, q2, cov, _hermite(_check_order(order, HERMITE_ORDER)))
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
