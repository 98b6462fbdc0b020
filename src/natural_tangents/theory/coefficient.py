"""Infinite-width coefficient matrices Θ̄(x′, x) of NGD for each Fisher (the paper's Appendices A–C).

Θ̄(x′, x) = J(x′) G^{-1} J(x)^T / N (S.4) drives the function-space dynamics
f_{t+1} − f_t = −η Θ̄ (f_t − y). In the infinite-width limit it is a function of the analytic
kernels of :mod:`natural_tangents.theory.analytic` alone. Everything here is for one output (C = 1)
and in the paper's 1/N convention: Θ = Θ_ana / N, Θ_l = Θ_ana,l / N (N = number of training samples).

* exact (S.53): Θ̄ = Θ(x′, x) (Θ + ρI)^{-1}; at ρ = 0, Θ(x′, x) Θ^{-1} (Θ̄(x, x) = I).
* layer-wise with pattern Σ (S.71)–(S.74): at ρ = 0, Θ̄ = Σ_l (Σ^{-1} 1)_l Θ_l(x′, x) Θ_l^{-1}; with
  ρ > 0, Θ̄ = Σ_l Θ_l(x′, x) V_l where ((Σ ⊗ I) blockdiag(Θ_l) + ρI) V = 1 ⊗ I (one L·N × L·N solve).
* K-FAC (S.96)–(S.111), (S.124), with the factored damping (B*_l + ρI) ⊗ (A*_{l−1} + ρI):

      Θ̄ = N Σ_{l<L} B̄_l ⊙ Ā_{l−1} + c_L Ā_{L−1}
      B̄_l = B_l(x′, x) (B_l + NρI)^{-1},   Ā_{l−1} = F_l(x′, x) (F_l + NρI)^{-1}

  with F_l = Q_l = σ_w² A_{l−1} + σ_b² (the σ_b column appended to the forward signal, B.3.3),
  c_L = N/(1 + Nρ) for the paper's output factor B*_L = 1/N (B̄_L = 1 1^T) and 1/(1 + ρ) for
  B*_L = 1. When the first layer's forward signal a = [σ_w x/√M_0 (, σ_b)] is narrower than N, A*_0
  is inverted as it is (S.108): Ā_0 = a′ (a^T a + NρI)^{-1} a^T, i.e. X′(X^TX)^{-1}X^T at ρ = 0.
  ``bias="block"`` gives each hidden layer's bias its own block (S.123): F_l = σ_w² A_{l−1} and an
  extra N B̄_l σ_b²/(σ_b² + Nρ) per hidden layer, as in (S.124); the output layer keeps its bias in
  the augmented factor (a separate output-bias block would add the rank-one c_L 1 1^T and break
  isotropy), matching :class:`natural_tangents.fisher.KFAC`.
* unit-wise: Θ̄(x, x) = α I on the training set (Lemma C.2, S.128); the paper has no closed form on
  other inputs ((S.155) sums over products of different units' backward signals).

All solves are float64 and use the (symmetric positive definite) training kernels; no explicit
inverse is formed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import activations as _act
from .. import fisher as _fisher
from ..validation import check_widths
from .alpha import alpha, resolve_fisher
from .analytic import AnalyticKernels, check_pair, kernels
from .architecture import Architecture, resolve

__all__ = ["coefficient", "coefficient_rule", "CoefficientQuery"]

_F64 = torch.float64


def _right_solve(left: Tensor, mat: Tensor, name: str) -> Tensor:
    """left · mat^{-1} for a symmetric positive definite ``mat`` (Cholesky); a numerically singular
    ``mat`` (a pivot below n·eps of the largest, e.g. duplicate inputs) raises ValueError."""
    chol, info = torch.linalg.cholesky_ex(0.5 * (mat + mat.T))
    diag = torch.diagonal(chol) ** 2
    if int(info) != 0 or float(diag.min()) <= mat.shape[0] * torch.finfo(_F64).eps * float(diag.max()):
        raise ValueError(
            f"{name}: the training kernel is singular (duplicate or linearly dependent training inputs, "
            "or too narrow a first layer); use a Fisher with damping > 0 or distinct inputs"
        )
    return torch.cholesky_solve(left.T, chol).T


@dataclass(frozen=True)
class CoefficientQuery:
    """What an analytic-Θ̄ rule may need: the analytic kernels of (test, train) and (train, train),
    the inputs, N and ρ."""

    kst: AnalyticKernels
    ktt: AnalyticKernels
    x_test: Tensor
    x_train: Tensor
    n: int
    rho: float


@functools.singledispatch
def coefficient_rule(fisher, query: CoefficientQuery) -> Tensor:
    """The registry of analytic Θ̄(x′, x), one rule per Fisher class (``coefficient_rule.register``)."""
    raise ValueError(
        f"fisher: no analytic Θ̄ is registered for {type(fisher).__name__}; register one with "
        "nat.theory.coefficient_rule.register"
    )


@coefficient_rule.register
def _exact(fisher: _fisher.Exact, q: CoefficientQuery) -> Tensor:
    theta = q.ktt.ntk / q.n + q.rho * torch.eye(q.n, dtype=_F64)
    return _right_solve(q.kst.ntk / q.n, theta, "x_train")


@coefficient_rule.register
def _layerwise(fisher: _fisher.Layerwise, q: CoefficientQuery) -> Tensor:
    kst, ktt, n, rho = q.kst, q.ktt, q.n, q.rho
    depth = ktt.depth
    sigma = fisher.sigma_matrix(depth)
    th_t = ktt.per_layer / n  # (L, N, N)
    th_s = kst.per_layer / n  # (L, N', N)
    if rho == 0:
        c = fisher.sigma_weights(depth)  # raises for a singular Σ, naming the remedies
        return sum(c[l] * _right_solve(th_s[l], th_t[l], "x_train") for l in range(depth))
    big = (sigma[:, None, :, None] * th_t.permute(1, 0, 2)[None]).reshape(depth * n, depth * n)
    big = big + rho * torch.eye(depth * n, dtype=_F64)
    v = torch.linalg.solve(big, torch.eye(n, dtype=_F64).repeat(depth, 1)).reshape(depth, n, n)
    return torch.einsum("lab,lbc->ac", th_s, v)


@coefficient_rule.register
def _kfac(fisher: _fisher.KFAC, q: CoefficientQuery) -> Tensor:
    kst, ktt, x_test, x_train, n, rho = q.kst, q.ktt, q.x_test, q.x_train, q.n, q.rho
    depth = ktt.depth
    sw2, sb2 = ktt.sigma_w2, ktt.sigma_b2
    block = fisher.bias == "block" and sb2 > 0
    eye = torch.eye(n, dtype=_F64)
    c_out = n / (1.0 + n * rho) if fisher.output_factor == "paper" else 1.0 / (1.0 + rho)
    bias_factor = sb2 / (sb2 + n * rho) if block else 0.0  # Ā of a separate bias block (times 1 1^T)

    def forward_factor(l: int) -> Tensor:  # Ā_{l−1}, l = 1 … L
        augmented = sb2 > 0 and not (block and l < depth)
        if l == 1:
            m0 = x_train.shape[1]
            p0 = m0 + (1 if augmented else 0)
            if p0 < n:  # primal (S.108): a′ (a^T a + NρI)^{-1} a^T

                def signal(x: Tensor) -> Tensor:
                    a = (sw2 / m0) ** 0.5 * x
                    if augmented:
                        a = torch.cat([a, torch.full((a.shape[0], 1), sb2**0.5, dtype=_F64)], 1)
                    return a

                a_t, a_s = signal(x_train), signal(x_test)
                gram = a_t.T @ a_t + n * rho * torch.eye(p0, dtype=_F64)
                return _right_solve(a_s, gram, "x_train") @ a_t.T
        f_t = ktt.Q[l - 1] if augmented else sw2 * ktt.A[l - 1]
        f_s = kst.Q[l - 1] if augmented else sw2 * kst.A[l - 1]
        return _right_solve(f_s, f_t + n * rho * eye, "x_train")

    total = c_out * forward_factor(depth)
    for l in range(1, depth):
        b_bar = _right_solve(kst.B[l - 1], ktt.B[l - 1] + n * rho * eye, "x_train")
        total = total + n * b_bar * (forward_factor(l) + bias_factor)
    return total


def coefficient(
    fisher,
    x_test: Tensor | None,
    x_train: Tensor,
    *,
    arch: Architecture | None = None,
    depth: int | None = None,
    activation: str | _act.Activation | Callable[[Tensor], Tensor] | None = None,
    sigma_w2: float | None = None,
    sigma_b2: float | None = None,
    method: str = "auto",
    order: int | None = None,
    widths: Sequence[int] | None = None,
    include_output: bool = True,
) -> Tensor:
    """The infinite-width Θ̄(x_test, x_train) of ``fisher`` (C = 1), shape (N′, N), float64.

    The paper's 1/N convention (Θ = J J^T / N): on the training set exact NGD gives I, block-diagonal L·I,
    K-FAC N L·I (see the module docstring for each formula). The Fisher's ``damping`` ρ is honored
    (ρ = 0 is the zero-damping limit).

    Args:
        fisher: an instance from :mod:`natural_tangents.fisher` (Exact, Layerwise and its
            subclasses, KFAC, Unitwise) or a name accepted by ``nat.fisher.get``.
        x_test: (N′, M_0) test inputs, or None for x_test = x_train.
        x_train: (N, M_0) training inputs (N sets the 1/N).
        arch: the network's :class:`~natural_tangents.theory.Architecture` (e.g. ``net.architecture``),
            or else the four keywords depth, activation, sigma_w2, sigma_b2.
        method, order: as in :func:`natural_tangents.theory.kernels`.
        widths: [M_0, …, M_L] (checked against depth and M_0 when given); needed by the unit-wise
            Fisher for α = Σ_{l<L} γ_l M_l / C (+ 1), ignored by the others (infinite width).
        include_output: unit-wise only: add the C output units to α (see
            :func:`natural_tangents.theory.alpha`).

    Raises:
        ValueError: bad inputs, a singular Σ at ρ = 0, a singular training kernel.
        NotImplementedError: unit-wise Θ̄ on inputs other than the training set (S.155).
    """
    fisher = resolve_fisher(fisher)
    arch = resolve(arch, depth, activation, sigma_w2, sigma_b2)
    depth, act, sigma_w2, sigma_b2 = arch.depth, arch.activation, arch.sigma_w2, arch.sigma_b2
    x_train, x_test_ = check_pair(x_train, x_test, ("x_train", "x_test"))
    on_train = x_test_ is None or (x_test_.shape == x_train.shape and torch.equal(x_test_, x_train))
    n = x_train.shape[0]

    if widths is not None:
        widths = check_widths(widths)
        if len(widths) != depth + 1 or widths[0] != x_train.shape[1]:
            raise ValueError(
                f"widths: expected {depth + 1} widths starting with M_0 = {x_train.shape[1]}, got {list(widths)}"
            )
    if isinstance(fisher, _fisher.Unitwise):
        if not on_train:
            raise NotImplementedError(
                "x_test: the unit-wise Θ̄(x′, x) has no closed form off the training set (the paper's (S.155) "
                "sums products of different units' backward signals); measure it on a network with "
                "nat.fisher.Unitwise().coefficient(net, x_train, x_test)"
            )
        if widths is None:
            raise ValueError("widths: the unit-wise Θ̄ = α I needs the layer widths [M_0, …, M_L]")
        a = alpha(
            fisher,
            widths=widths,
            activation=act,
            sigma_w2=sigma_w2,
            sigma_b2=sigma_b2,
            include_output=include_output,
        )
        return a * torch.eye(n, dtype=_F64)

    opts = {"depth": depth, "activation": act, "sigma_w2": sigma_w2, "sigma_b2": sigma_b2}
    ktt = kernels(x_train, method=method, order=order, **opts)
    kst = ktt if on_train else kernels(x_test_, x_train, method=method, order=order, **opts)
    x_s = x_train if on_train else x_test_
    return coefficient_rule(fisher, CoefficientQuery(kst, ktt, x_s, x_train, n, float(fisher.damping)))
