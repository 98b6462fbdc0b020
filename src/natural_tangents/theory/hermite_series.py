"""The Hermite (Mehler) series of the Gaussian expectations for smooth activations:
E[φ(√q x) φ(√q′ y)] = Σ_k a_k(q) a_k(q′) ρ^k, O(K) per pair (see :mod:`.gaussian`)."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from .. import activations as _act
from . import normal

__all__ = ["SERIES_TOL", "series_expectations"]

_F64 = torch.float64

SERIES_TOL = 1e-15
"""The Hermite series is truncated where its tail Σ_{k≥K} a_k² falls below this fraction of the total."""

_SERIES_KMAX = (256, 1024)  # the series is tried with these many terms before giving up


# ---------------------------------------------------------------------------- Hermite series
@lru_cache(maxsize=4)
def _hermite_basis(kmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """Trapezoidal nodes z, weights h·ϕ(z)^{1/2}, and the Hermite functions
    ψ_k(z) = He_k(z)/√k! · ϕ(z)^{1/2} for k = 0 … kmax (rows), by their stable three-term recurrence."""
    half = 2.0 * math.sqrt(kmax) + 12.0  # beyond the oscillatory region |z| < 2√k, plus the tail
    h = 0.6 / math.sqrt(kmax)  # about 10 nodes per wavelength 2π/√k of ψ_kmax
    z = torch.arange(-half, half + h / 2, h, dtype=_F64)
    root = torch.sqrt(normal.pdf(z))
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


def series_expectations(
    activation: _act.Activation, q1: Tensor, q2: Tensor, cov: Tensor, raw: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """(A, Ξ) by Mehler's formula: E[φ(u)φ(u′)] = Σ_k a_k(q) a_k(q′) ρ^k (and with b_k for φ′), by
    Horner's rule, flattened over the pairs. ``q1``, ``q2``, ``cov`` are broadcast float64 tensors;
    ``raw`` are q1, q2 before broadcasting (their distinct values are found on these).

    Raises:
        ValueError: the series has not converged (a kink, or a very steep φ).
    """
    rho = normal.correlation(q1, q2, cov).reshape(-1)
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
