"""Infinite-width kernels of the NTK-parameterized MLP (seed Appendix E, (S.168)–(S.178)).

The network is the one of :class:`natural_tangents.MLP` (MATH.md §1):
u_1 = (σ_w/√M_0) W_1 x + σ_b b_1, u_l = (σ_w/√M_{l−1}) W_l φ(u_{l−1}) + σ_b b_l, f = u_L. As the
hidden widths grow, for two batches x1 (N1 samples) and x2 (N2 samples):

    A_0(x, x′) = x·x′ / M_0                                          (input Gram, S.66)
    Q_l = σ_w² A_{l−1} + σ_b²                                        (covariance of u_l, S.174)
    A_l = E[φ(u) φ(u′)],  Ξ_l = E[φ′(u) φ′(u′)],  l = 1 … L−1         (S.170), (S.172)
          (u, u′) ~ N(0, [[q_l(x), Q_l(x, x′)], [Q_l(x, x′), q_l(x′)]])
    B_L = 1 1^T,  B_l = σ_w² Ξ_l ⊙ B_{l+1}                           (S.171)
    Θ_l = σ_w² B_l ⊙ A_{l−1} + σ_b² B_l = B_l ⊙ Q_l                  (S.68)
    Θ_ana = Σ_{l=1}^{L} Θ_l                                          (S.169)

Here q_l(x) = Q_l(x, x) is the variance of u_l for the sample x: q_0(x) = ||x||²/M_0 and
q_l(x) = σ_w² E_{u~N(0, q_{l−1}(x))}[φ(u)²] + σ_b² (S.175). The seed assumes ||x|| = 1 for every
sample (its Assumption 2), so that q_l is one number per layer (S.178) and only the correlation
Q̄_l = Q_l/q_l varies (S.173); this module accepts inputs of any norm and keeps q_l per sample.

Normalization: Θ_l and Θ_ana here are the limits of the empirical J_l(x1) J_l(x2)^T and
J(x1) J(x2)^T *without* the 1/N of the seed's Θ = J J^T / N, i.e. the convention of
:func:`natural_tangents.empirical_ntk`; the seed's NTK is Θ(x′, x) = I_C ⊗ Θ_ana(x′, x)/N (S.168).
The finite-width fluctuations around these limits are O(1/√M).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import activations as _act
from .._checks import as_tensor, check_batch
from .gaussian import gaussian_expectations, second_moment

__all__ = ["AnalyticKernels", "kernels", "ntk"]

_F64 = torch.float64


@dataclass(frozen=True, eq=False)
class AnalyticKernels:
    """The infinite-width signals and kernels of an L-layer MLP on two batches (float64).

    Layer indices follow the seed (l = 1 … L); the stacked tensors are 0-based as noted.

    Attributes:
        q1: (L+1, N1) per-sample variances of x1: ``q1[0]`` = ||x||²/M_0, ``q1[l]`` = q_l = Q_l(x, x).
        q2: (L+1, N2) the same for x2.
        A: (L, N1, N2) forward kernels, ``A[l]`` = A_l for l = 0 … L−1 (A_0 = x1 x2^T / M_0).
        Q: (L, N1, N2) pre-activation covariances, ``Q[l-1]`` = Q_l = σ_w² A_{l−1} + σ_b².
        Xi: (L−1, N1, N2) derivative kernels, ``Xi[l-1]`` = Ξ_l for l = 1 … L−1.
        B: (L, N1, N2) backward kernels, ``B[l-1]`` = B_l (``B[L-1]`` is all ones).
        per_layer: (L, N1, N2) ``per_layer[l-1]`` = Θ_l = σ_w² B_l ⊙ A_{l−1} + σ_b² B_l (no 1/N).
        ntk: (N1, N2) Θ_ana = Σ_l Θ_l (S.169), no 1/N.
        depth, activation, sigma_w2, sigma_b2, method: the settings that produced them.
    """

    q1: Tensor
    q2: Tensor
    A: Tensor
    Q: Tensor
    Xi: Tensor
    B: Tensor
    per_layer: Tensor
    ntk: Tensor
    depth: int
    activation: _act.Activation
    sigma_w2: float
    sigma_b2: float
    method: str

    @property
    def shape(self) -> tuple[int, int]:
        """(N1, N2)."""
        return tuple(self.ntk.shape)


# --------------------------------------------------------------------------------- checks
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


def check_pair(x1, x2, names: tuple[str, str] = ("x1", "x2")) -> tuple[Tensor, Tensor | None]:
    """Both batches as finite float64 (N, M_0) tensors with the same M_0 (``names`` for messages)."""
    n1, n2 = names
    x1 = check_batch(x1, n1, dtype=_F64)
    if x2 is None:
        return x1, None
    x2 = as_tensor(x2, n2)
    if x2.ndim == 2 and x2.shape[1] != x1.shape[1]:
        raise ValueError(
            f"{n2}: has {x2.shape[1]} features per sample but {n1} has {x1.shape[1]}; both batches must "
            "have the same input width M_0"
        )
    return x1, check_batch(x2, n2, features=x1.shape[1], dtype=_F64)


def _check_positive(q: Tensor, name: str) -> None:
    if bool((q <= 0).any()):
        n = int((q <= 0).nonzero()[0, 0])
        raise ValueError(
            f"{name}: sample {n} is the zero vector and sigma_b2 = 0, so u_1 ≡ 0 and the kernel is "
            "undefined; drop the sample or use sigma_b2 > 0"
        )


# ------------------------------------------------------------------------------ recursion
_BLOCK = 1 << 20  # entries per block of rows in the pairwise integration (8 MiB in float64)


def _layer_expectations(
    act: _act.Activation,
    q1: Tensor,
    q2: Tensor,
    cov: Tensor,
    symmetric: bool,
    method: str,
    order: int | None,
) -> tuple[Tensor, Tensor]:
    """A_l and Ξ_l for one layer, integrated in blocks of rows so that the temporaries of the
    Gaussian integrals stay small; with ``symmetric`` only the upper triangle is integrated."""
    n1, n2 = cov.shape
    a, xi = torch.empty_like(cov), torch.empty_like(cov)
    rows = max(1, _BLOCK // n2)
    for r0 in range(0, n1, rows):
        r1 = min(n1, r0 + rows)
        c0 = r0 if symmetric else 0  # columns left of the diagonal block come from the mirror
        blk_a, blk_x = gaussian_expectations(
            act, q1[r0:r1, None], q2[None, c0:], cov[r0:r1, c0:], method=method, order=order
        )
        if symmetric:  # the square diagonal block was integrated whole: keep its upper triangle
            k = r1 - r0
            for blk in (blk_a, blk_x):
                blk[:, :k] = torch.triu(blk[:, :k]) + torch.triu(blk[:, :k], 1).T
            a[r1:, r0:r1], xi[r1:, r0:r1] = blk_a[:, k:].T, blk_x[:, k:].T
        a[r0:r1, c0:], xi[r0:r1, c0:] = blk_a, blk_x
    return a, xi


def _forward(
    x1: Tensor,
    x2: Tensor | None,
    depth: int,
    act: _act.Activation,
    sigma_w2: float,
    sigma_b2: float,
    method: str,
    order: int | None,
):
    """Run the recursion. Yields per layer l = 1 … L: (q_l(x1), q_l(x2), Q_l, A_l, Ξ_l) with
    A_l, Ξ_l None at l = L. Memory stays at a few N1 × N2 matrices unless the caller keeps them."""
    symmetric = x2 is None
    x2_ = x1 if symmetric else x2
    m0 = x1.shape[1]
    a_prev = x1 @ x2_.T / m0
    if symmetric:  # a matrix product is not bitwise symmetric; keep the upper triangle
        a_prev = torch.triu(a_prev) + torch.triu(a_prev, 1).T
    qa1 = (x1 * x1).sum(1) / m0
    qa2 = qa1 if symmetric else (x2_ * x2_).sum(1) / m0
    yield qa1, qa2, None, a_prev, None
    for l in range(1, depth + 1):
        cov = sigma_w2 * a_prev + sigma_b2
        q1 = sigma_w2 * qa1 + sigma_b2
        q2 = q1 if symmetric else sigma_w2 * qa2 + sigma_b2
        if l == 1:
            _check_positive(q1, "x1")
            _check_positive(q2, "x2")
        if l == depth:
            yield q1, q2, cov, None, None
            return
        a, xi = _layer_expectations(act, q1, q2, cov, symmetric, method, order)
        if symmetric:
            qa1 = qa2 = torch.diagonal(a).clone()
        else:
            qa1 = second_moment(act, q1, method=method, order=order)
            qa2 = second_moment(act, q2, method=method, order=order)
        yield q1, q2, cov, a, xi
        a_prev = a


def kernels(
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    depth: int,
    activation: str | _act.Activation | Callable[[Tensor], Tensor],
    sigma_w2: float,
    sigma_b2: float,
    method: str = "auto",
    order: int | None = None,
) -> AnalyticKernels:
    """All infinite-width signals of an L-layer MLP (seed (S.168)–(S.178)); see :class:`AnalyticKernels`.

    Args:
        x1: (N1, M_0) inputs; x2: (N2, M_0) inputs, default ``x1`` (then only the upper triangle
            is integrated). Any norms: q_0 = ||x||²/M_0 per sample (the seed assumes ||x|| = 1).
        depth: L, the number of weight layers (``len(widths) - 1`` of the matching
            :class:`~natural_tangents.MLP`); L = 1 is the linear model Θ = σ_w² A_0 + σ_b².
        activation: a name, an :class:`~natural_tangents.activations.Activation` or a callable.
        sigma_w2, sigma_b2: σ_w², σ_b² of the network (σ_b² = 0: no bias).
        method, order: how the Gaussian expectations are computed (closed form for ReLU,
            ShiftedReLU, erf and identity; quadrature otherwise), see
            :mod:`natural_tangents.theory.gaussian`.

    Returns:
        An :class:`AnalyticKernels` in float64; ``.ntk`` is J J^T without the 1/N, comparable with
        ``nat.empirical_ntk(net, x1, x2)``, and ``.per_layer[l-1]`` with
        ``nat.empirical_ntk(net, x1, x2, per_layer=True)[l-1]``.
    """
    depth = check_depth(depth)
    sigma_w2, sigma_b2 = check_variances(sigma_w2, sigma_b2)
    act = _act.get(activation)
    x1, x2 = check_pair(x1, x2)
    steps = list(_forward(x1, x2, depth, act, sigma_w2, sigma_b2, method, order))
    q1 = torch.stack([s[0] for s in steps])
    q2 = torch.stack([s[1] for s in steps])
    a = torch.stack([s[3] for s in steps[:-1]])  # A_0 … A_{L−1}
    cov = torch.stack([s[2] for s in steps[1:]])  # Q_1 … Q_L
    n1, n2 = a.shape[1:]
    xi = torch.stack([s[4] for s in steps[1:-1]]) if depth > 1 else a.new_empty(0, n1, n2)
    b = torch.empty_like(cov)
    b[depth - 1] = 1.0
    for l in range(depth - 1, 0, -1):  # B_l = σ_w² Ξ_l ⊙ B_{l+1}, stored at l − 1
        b[l - 1] = sigma_w2 * xi[l - 1] * b[l]
    per_layer = b * cov
    return AnalyticKernels(
        q1=q1,
        q2=q2,
        A=a,
        Q=cov,
        Xi=xi,
        B=b,
        per_layer=per_layer,
        ntk=per_layer.sum(0),
        depth=depth,
        activation=act,
        sigma_w2=sigma_w2,
        sigma_b2=sigma_b2,
        method=method,
    )


def ntk(
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    depth: int,
    activation: str | _act.Activation | Callable[[Tensor], Tensor],
    sigma_w2: float,
    sigma_b2: float,
    method: str = "auto",
    order: int | None = None,
) -> Tensor:
    """The infinite-width NTK Θ_ana(x1, x2) (S.169), shape (N1, N2), float64, *without* the 1/N.

    Same convention as :func:`natural_tangents.empirical_ntk` (J J^T); the seed's Θ is this divided
    by N (S.168). Arguments as in :func:`kernels`. Uses the forward form of the recursion,
    Θ^{(1)} = Q_1, Θ^{(l+1)} = σ_w² Ξ_l ⊙ Θ^{(l)} + Q_{l+1}, so only a few N1 × N2 matrices are alive.
    """
    depth = check_depth(depth)
    sigma_w2, sigma_b2 = check_variances(sigma_w2, sigma_b2)
    act = _act.get(activation)
    x1, x2 = check_pair(x1, x2)
    theta = None
    for step in _forward(x1, x2, depth, act, sigma_w2, sigma_b2, method, order):
        _, _, cov, _, xi = step
        if cov is None:
            continue
        theta = cov if theta is None else theta + cov
        if xi is not None:
            theta = sigma_w2 * xi * theta
    return theta
