"""One tile of the infinite-width kernels: the recursion (S.168)–(S.178) on a rows × cols block.

The per-sample variances q_l(x) are computed once per sample (:func:`per_sample_variances`); a tile
then needs only its rows and columns of the inputs and of q. Three tile functions:

* :func:`ntk_tile_relu` and :func:`ntk_tile_erf`: the NTK by the forward form
  Θ^{(1)} = Q_1, Θ^{(l+1)} = σ_w² Ξ_l ⊙ Θ^{(l)} + Q_{l+1}, fused in place on a few tile-sized
  buffers, with the closed forms (S.176)–(S.177) (ReLU) and the arcsine kernel (erf).
* :func:`ntk_tile_generic`: the same recursion through
  :func:`~natural_tangents.theory.gaussian.gaussian_expectations` (any activation and method).
* :func:`kernels_tile`: every stacked signal of :class:`~natural_tangents.theory.AnalyticKernels`.

On a diagonal tile of a symmetric kernel (``diag=True``) the pair (x, x) has ρ = 1 exactly: the
diagonal of Q_l is set to q_l(x), so that the closed forms take their exact limits (ReLU: √(1−ρ²) = 0,
angle π; erf: 2q/(1+2q)) instead of cancelling in √(1−ρ²) at a rounded ρ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import activations as _act
from .architecture import Architecture
from .gaussian import gaussian_expectations, second_moment

__all__ = ["per_sample_variances", "ntk_tile_relu", "ntk_tile_erf", "ntk_tile_generic", "kernels_tile", "fast_path"]

_F64 = torch.float64


def per_sample_variances(x: Tensor, arch: Architecture, method: str, order: int | None, name: str = "x") -> Tensor:
    """(L+1, N): row 0 is ||x||²/M_0, row l is q_l(x) = σ_w² E[φ(u)²]_{u~N(0, q_{l−1})} + σ_b² (S.175)
    (with E[φ(u)²] replaced by q_0 at l = 1). Refuses a zero sample when σ_b² = 0 (``name`` for the message)."""
    q = torch.empty(arch.depth + 1, x.shape[0], dtype=_F64)
    q[0] = (x * x).sum(1) / x.shape[1]
    qa = q[0]
    for l in range(1, arch.depth + 1):
        q[l] = arch.sigma_w2 * qa + arch.sigma_b2
        if l == 1 and bool((q[1] <= 0).any()):
            n = int((q[1] <= 0).nonzero()[0, 0])
            raise ValueError(
                f"{name}: sample {n} is the zero vector and sigma_b2 = 0, so u_1 ≡ 0 and the kernel is "
                "undefined; drop the sample or use sigma_b2 > 0"
            )
        if l < arch.depth:
            qa = second_moment(arch.activation, q[l], method=method, order=order)
    return q


def fast_path(arch: Architecture, method: str) -> str | None:
    """'relu' or 'erf' when a fused closed-form tile applies, else None."""
    if method not in ("auto", "closed_form"):
        return None
    act = arch.activation
    if isinstance(act, _act.ReLU) or (isinstance(act, _act.ShiftedReLU) and float(act.s) == 0.0):
        return "relu"
    if isinstance(act, _act.Erf):
        return "erf"
    return None


def _first_layer(x1: Tensor, x2: Tensor, sigma_b2: float) -> Tensor:
    """Q_1 = x1 x2^T + σ_b² for inputs pre-scaled by σ_w/√M_0."""
    cov = x1 @ x2.T
    if sigma_b2:
        cov.add_(sigma_b2)
    return cov


_STRIP = 64
"""Rows per strip of the fused elementwise recursion: a strip's few buffers stay in the L2 cache."""


def _strips(n: int):
    for start in range(0, n, _STRIP):
        yield start, min(n, start + _STRIP)


def ntk_tile_relu(x1: Tensor, x2: Tensor, q1: Tensor, q2: Tensor, arch: Architecture, diag: bool) -> Tensor:
    """The ReLU NTK on one tile. x1 (n1, M_0), x2 (n2, M_0) scaled by σ_w/√M_0; q1 (L+1, n1), q2 (L+1, n2).

    Per layer, with ρ = Q_l/√(q q′) and θ = π/2 + arcsin ρ = π − arccos ρ:
    Ξ_l = θ/(2π), A_l = √(q q′) (√(1−ρ²) + ρ θ)/(2π) (S.176)–(S.177). The elementwise part runs on
    strips of :data:`_STRIP` rows, in place on three strip buffers."""
    sb2, c = arch.sigma_b2, arch.sigma_w2 / (2.0 * math.pi)
    gram = _first_layer(x1, x2, sb2)  # Q_1, overwritten strip by strip
    theta = torch.empty_like(gram)
    r1, r2 = q1[1 : arch.depth].sqrt(), q2[1 : arch.depth].sqrt()
    inv1, inv2, cr1 = 1.0 / r1, 1.0 / r2, c * r1
    width = gram.shape[1]
    bufs = torch.empty(2, min(_STRIP, gram.shape[0]), width, dtype=gram.dtype)
    one = torch.ones((), dtype=gram.dtype)
    for i0, i1 in _strips(gram.shape[0]):
        cov, th = gram[i0:i1], theta[i0:i1]
        angle, spare = bufs[0, : i1 - i0], bufs[1, : i1 - i0]
        th.copy_(cov)
        for l in range(arch.depth - 1):  # layer l + 1
            rho = cov.mul_(inv1[l, i0:i1, None]).mul_(inv2[l, None, :]).clamp_(-1.0, 1.0)  # in place
            if diag:
                rho.diagonal(i0).fill_(1.0)  # the pairs (x, x): ρ = 1 exactly
            torch.asin(rho, out=angle).add_(0.5 * math.pi)
            root = torch.addcmul(one, rho, rho, value=-1.0, out=spare).sqrt_()
            cov = root.addcmul_(rho, angle).mul_(cr1[l, i0:i1, None]).mul_(r2[l, None, :])  # σ_w² A_{l+1}
            if sb2:
                cov.add_(sb2)  # Q_{l+2}
            torch.addcmul(cov, th, angle, value=c, out=th)  # Θ ← σ_w² Ξ ⊙ Θ + Q
            spare = rho
    return theta


def ntk_tile_erf(x1: Tensor, x2: Tensor, q1: Tensor, q2: Tensor, arch: Architecture, diag: bool) -> Tensor:
    """The erf NTK on one tile (arguments as :func:`ntk_tile_relu`). With d = 1/√(1+2q) and
    r = 2Q d d′: A_l = (2/π) arcsin r, Ξ_l = (4/π) d d′/√(1 − r²)."""
    sw2, sb2 = arch.sigma_w2, arch.sigma_b2
    gram = _first_layer(x1, x2, sb2)
    theta = torch.empty_like(gram)
    d1, d2 = torch.rsqrt(1.0 + 2.0 * q1[1 : arch.depth]), torch.rsqrt(1.0 + 2.0 * q2[1 : arch.depth])
    two_d1, k_d1 = 2.0 * d1, (4.0 * sw2 / math.pi) * d1
    exact = 2.0 * q1[1 : arch.depth] / (1.0 + 2.0 * q1[1 : arch.depth])  # r on the diagonal
    buf = torch.empty(min(_STRIP, gram.shape[0]), gram.shape[1], dtype=gram.dtype)
    one = torch.ones((), dtype=gram.dtype)
    for i0, i1 in _strips(gram.shape[0]):
        cov, th, inv = gram[i0:i1], theta[i0:i1], buf[: i1 - i0]
        th.copy_(cov)
        for l in range(arch.depth - 1):
            r = cov.mul_(two_d1[l, i0:i1, None]).mul_(d2[l, None, :]).clamp_(-1.0, 1.0)
            if diag:
                r.diagonal(i0).copy_(exact[l, i0:i1])
            torch.addcmul(one, r, r, value=-1.0, out=inv).rsqrt_()
            th.mul_(inv).mul_(k_d1[l, i0:i1, None]).mul_(d2[l, None, :])  # σ_w² Ξ ⊙ Θ
            cov = r.asin_().mul_(2.0 * sw2 / math.pi)
            if sb2:
                cov.add_(sb2)
            th.add_(cov)
    return theta


def ntk_tile_generic(
    x1: Tensor, x2: Tensor, q1: Tensor, q2: Tensor, arch: Architecture, diag: bool, method: str, order: int | None
) -> Tensor:
    """The NTK on one tile for any activation and integration method (arguments as :func:`ntk_tile_relu`)."""
    sw2, sb2 = arch.sigma_w2, arch.sigma_b2
    cov = _first_layer(x1, x2, sb2)
    if diag:
        cov.diagonal().copy_(q1[1])
    theta = cov.clone()
    for l in range(1, arch.depth):
        a, xi = gaussian_expectations(arch.activation, q1[l][:, None], q2[l][None, :], cov, method=method, order=order)
        theta.mul_(xi).mul_(sw2)  # σ_w² Ξ_l ⊙ Θ^{(l)}
        cov = a.mul_(sw2).add_(sb2)  # Q_{l+1}
        if diag:
            cov.diagonal().copy_(q1[l + 1])
        theta.add_(cov)
    return theta


def stack_layout(depth: int) -> dict[str, slice]:
    """Where each signal sits in the (5L, N1, N2) stack of :func:`kernels_tile`."""
    L = depth
    return {
        "A": slice(0, L),
        "Q": slice(L, 2 * L),
        "Xi": slice(2 * L, 3 * L - 1),
        "B": slice(3 * L - 1, 4 * L - 1),
        "per_layer": slice(4 * L - 1, 5 * L - 1),
        "ntk": slice(5 * L - 1, 5 * L),
    }


def kernels_tile(
    x1: Tensor, x2: Tensor, q1: Tensor, q2: Tensor, arch: Architecture, diag: bool, method: str, order: int | None
) -> Tensor:
    """(5L, n1, n2): A_0 … A_{L−1}, Q_1 … Q_L, Ξ_1 … Ξ_{L−1}, B_1 … B_L, Θ_1 … Θ_L, Θ_ana on one tile.
    x1, x2 are the raw inputs (not scaled); q1, q2 as in :func:`ntk_tile_relu`."""
    L, sw2, sb2 = arch.depth, arch.sigma_w2, arch.sigma_b2
    lay = stack_layout(L)
    out = torch.empty(5 * L, x1.shape[0], x2.shape[0], dtype=_F64)
    a, cov, xi, b, per = (out[lay[k]] for k in ("A", "Q", "Xi", "B", "per_layer"))
    torch.matmul(x1, x2.T, out=a[0]).div_(x1.shape[1])
    for l in range(1, L + 1):
        torch.mul(a[l - 1], sw2, out=cov[l - 1]).add_(sb2)
        if diag:
            cov[l - 1].diagonal().copy_(q1[l])
        if l < L:
            a[l], xi[l - 1] = gaussian_expectations(
                arch.activation, q1[l][:, None], q2[l][None, :], cov[l - 1], method=method, order=order
            )
    b[L - 1] = 1.0
    for l in range(L - 1, 0, -1):  # B_l = σ_w² Ξ_l ⊙ B_{l+1} (S.171)
        torch.mul(xi[l - 1], b[l], out=b[l - 1]).mul_(sw2)
    torch.mul(b, cov, out=per)  # Θ_l = B_l ⊙ Q_l (S.68)
    torch.sum(per, 0, out=out[5 * L - 1])
    return out
