"""Two-dimensional quadrature of the Gaussian expectations A = E[φ(u)φ(u′)], Ξ = E[φ′(u)φ′(u′)]:
tensor-product Gauss–Hermite or trapezoidal rules for smooth activations, and a piecewise
Gauss–Legendre rule split along the kink lines for kinked ones (see :mod:`.gaussian` for accuracy)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .. import activations as _act
from . import normal

__all__ = [
    "HERMITE_ORDER",
    "TRAPEZOID_ORDER",
    "PIECE_ORDER",
    "hermite_rule",
    "trapezoid_rule",
    "smooth_quadrature",
    "kinked_quadrature",
]

_F64 = torch.float64

HERMITE_ORDER = 48
"""Default Gauss–Hermite order (nodes per dimension) for smooth activations."""

TRAPEZOID_ORDER = 48
"""Default number of trapezoidal nodes per dimension for smooth activations."""

PIECE_ORDER = 48
"""Default Gauss–Legendre order (nodes per piece and dimension) for kinked activations."""

_TRAPEZOID_RANGE = 9.0

_TRUNCATION = 10.0  # standard deviations kept by the piecewise rule (tail mass < 1e-22)


# ---------------------------------------------------------------------------------------- rules
@lru_cache(maxsize=16)
def hermite_rule(order: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of E_{z~N(0,1)}[g(z)] ≈ Σ w_i g(z_i) (probabilists' Hermite)."""
    z, w = np.polynomial.hermite_e.hermegauss(order)
    return torch.from_numpy(z).to(_F64), torch.from_numpy(w / w.sum()).to(_F64)


@lru_cache(maxsize=16)
def trapezoid_rule(order: int) -> tuple[Tensor, Tensor]:
    """Equispaced nodes on [−9, 9] with weights h·N(0,1)-density, normalized to sum to one."""
    z = torch.linspace(-_TRAPEZOID_RANGE, _TRAPEZOID_RANGE, order, dtype=_F64)
    w = normal.pdf(z)
    return z, w / w.sum()


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
        cdf, pdf = normal.cdf(u), normal.pdf(u)
        return u * cdf, cdf + u * pdf
    return activation(u), activation.derivative(u)


def smooth_quadrature(
    activation: _act.Activation, q1: Tensor, q2: Tensor, cov: Tensor, rule: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """Tensor-product rule (z, w): u = √q z₁, u′ = √q′(ρ z₁ + √(1−ρ²) z₂), order² nodes per pair."""
    z, w = rule
    rho = normal.correlation(q1, q2, cov).reshape(-1)
    r1, r2 = torch.sqrt(q1).reshape(-1), torch.sqrt(q2).reshape(-1)
    c = torch.sqrt((1.0 - rho * rho).clamp_min(0.0))
    a_out, x_out = torch.empty_like(rho), torch.empty_like(rho)
    k = z.numel()
    for sl in normal.chunks(rho.numel(), k * k):
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
    x, w = normal.legendre(order)
    half = (0.5 * (hi - lo)).unsqueeze(-1)
    t = (0.5 * (hi + lo)).unsqueeze(-1) + half * x
    wt = half * w * normal.pdf(t)
    return t.flatten(-2), wt.flatten(-2)


def _pieces(breaks: Tensor) -> tuple[Tensor, Tensor]:
    """Breakpoints (..., p) → piece ends (..., p + 1) on [−T, T]."""
    tt = torch.full((*breaks.shape[:-1], 1), _TRUNCATION, dtype=_F64)
    pts = torch.cat([-tt, breaks.clamp(-_TRUNCATION, _TRUNCATION).sort(-1).values, tt], -1)
    return pts[..., :-1], pts[..., 1:]


def kinked_quadrature(
    activation: _act.Activation, q1: Tensor, q2: Tensor, cov: Tensor, order: int
) -> tuple[Tensor, Tensor]:
    """Piecewise Gauss–Legendre over the pieces cut by the kink lines (see the module docstring)."""
    kinks = torch.tensor(sorted(float(k) for k in activation.kinks), dtype=_F64)
    rho = normal.correlation(q1, q2, cov).reshape(-1)
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
    for sl in normal.chunks(rho.numel(), per):
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
