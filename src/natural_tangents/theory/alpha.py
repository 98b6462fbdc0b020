"""The isotropy constant α of each Fisher approximation, and the unit-wise γ_l (the paper's (S.138)–(S.141)).

Under the isotropic condition (the paper's Condition 1; docs/conventions.md) the coefficient matrix on the training
set is Θ̄(x, x) = α I, and NGD with η = 1/α converges in one step. In the paper's 1/N conventions
(Θ = J J^T / N, G = J^T J / N + ρ I) and in the zero-damping limit ρ → 0:

=================================  ==============================================================
Fisher                             α
=================================  ==============================================================
exact                              1 (S.53)
layer-wise, pattern Σ              1^T Σ^{-1} 1 (S.71); singular Σ (tri-diagonal, L = 3s+2): none
K-FAC, M_0 ≥ N                     N L (S.107) with the paper's B*_L = 1/N; N (L−1) + 1 with B*_L = 1
K-FAC, M_0 < N, Forster inputs     N (L−1) + M_0 (S.111)
K-FAC, M_0 < N, raw inputs         not isotropic (S.109); the mean eigenvalue is N (L−1) + M_0
K-FAC, bias blocks (S.123)         N (2L−1) for M_0 ≥ N, N (2L−2) + M_0 with Forster inputs
unit-wise                          Σ_{l<L} γ_l M_l / C (S.128; C = 1 there), + 1 for the output units
=================================  ==============================================================
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .. import activations as _act
from .. import fisher as _fisher
from ..fisher.kfac import warn_narrow_input
from ..validation import check_widths
from .analytic import check_variances
from .architecture import Architecture
from .gaussian import second_moment

__all__ = ["gamma", "alpha", "variances", "alpha_rule", "AlphaQuery", "resolve_fisher"]

_F64 = torch.float64
_SCAN_NODES = 64  # sample points per piece between kinks when testing φ′ ≠ 0
_DENSE_NODES = 200_001  # grid of the fallback for pieces where φ′ vanishes only in part


def _check_q(q: float) -> float:
    q = float(q)
    if not (math.isfinite(q) and q > 0):
        raise ValueError(f"q: the variance of u must be a positive finite number, got {q}")
    return q


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _gamma_numeric(act: _act.Activation, q: float) -> float:
    """P(φ′(u) ≠ 0) by pieces between the kinks: a piece where φ′ vanishes at every sample point
    counts as a flat piece, one where it never vanishes counts fully (isolated zeros have measure
    zero); a piece with both is integrated on a dense grid (accuracy ~1e-6)."""
    sd = math.sqrt(q)
    lim = 12.0 * sd
    edges = [-math.inf, *sorted(float(k) for k in act.kinks), math.inf]
    x, _ = np.polynomial.legendre.leggauss(_SCAN_NODES)
    nodes = torch.as_tensor(x, dtype=_F64)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        mass = _normal_cdf(hi / sd) - _normal_cdf(lo / sd)
        a, b = max(lo, -lim), min(hi, lim)
        if b <= a or mass == 0.0:
            continue
        u = 0.5 * (a + b) + 0.5 * (b - a) * nodes
        nonzero = act.derivative(u) != 0
        if bool(nonzero.all()):
            total += mass
        elif bool(nonzero.any()):
            grid = torch.linspace(a, b, _DENSE_NODES, dtype=_F64)
            mid = 0.5 * (grid[1:] + grid[:-1])
            dens = torch.exp(-0.5 * mid**2 / q) / math.sqrt(2.0 * math.pi * q) * (grid[1] - grid[0])
            total += float((dens * (act.derivative(mid) != 0)).sum())
    return total


def _gamma_one(act: _act.Activation, q: float) -> float:
    q = _check_q(q)
    if isinstance(act, _act.ReLU):
        return 0.5
    if isinstance(act, _act.ShiftedReLU):
        return 0.5 + 0.5 * math.erf(float(act.s) / math.sqrt(2.0 * q))  # (S.156)
    if isinstance(act, _act.Tanh | _act.Erf | _act.Identity | _act.Sigmoid | _act.Softplus):
        return 1.0  # φ′ > 0 everywhere
    return _gamma_numeric(act, q)


def gamma(activation: str | _act.Activation | Callable[[Tensor], Tensor], q: float | Tensor) -> float | Tensor:
    """γ = P_{u~N(0,q)}(φ′(u) ≠ 0) (S.140)–(S.141): the fraction of a layer's units whose backward
    signal is non-zero, which sets the unit-wise α.

    Closed values: 1 for tanh, erf, sigmoid, softplus and the identity; 1/2 for ReLU;
    1/2 + erf(s/√(2q))/2 for the shifted ReLU max(u, −s) (S.156). Any other activation is scanned
    piece by piece between its ``kinks`` (see :func:`_gamma_numeric`); a smooth activation whose φ′
    has only isolated zeros (e.g. GELU) has γ = 1.

    Args:
        activation: a name, an :class:`~natural_tangents.activations.Activation` or a callable.
        q: the variance q_l of the pre-activation (> 0); a float or a tensor of them.

    Returns:
        A float for a float ``q``, else a float64 tensor of ``q``'s shape.
    """
    act = _act.get(activation)
    if isinstance(q, Tensor):
        flat = [_gamma_one(act, float(v)) for v in q.detach().reshape(-1)]
        return torch.tensor(flat, dtype=_F64).reshape(q.shape)
    return _gamma_one(act, q)


def variances(
    depth: int,
    *,
    activation: str | _act.Activation | Callable[[Tensor], Tensor],
    sigma_w2: float,
    sigma_b2: float,
    q0: float,
) -> Tensor:
    """q_1 … q_L of one input (S.138), (S.175): q_1 = σ_w² q_0 + σ_b²,
    q_{l+1} = σ_w² E_{u~N(0,q_l)}[φ(u)²] + σ_b². ``q0`` = ||x||²/M_0 (1/M_0 for unit-norm inputs).
    Returns a float64 tensor of length L (entry l−1 is q_l)."""
    from .analytic import check_depth

    depth = check_depth(depth)
    sigma_w2, sigma_b2 = check_variances(sigma_w2, sigma_b2)
    q0 = float(q0)
    if not (math.isfinite(q0) and q0 >= 0):
        raise ValueError(f"q0: must be ||x||²/M_0 >= 0, got {q0}")
    act = _act.get(activation)
    qs = [sigma_w2 * q0 + sigma_b2]
    for _ in range(depth - 1):
        qs.append(sigma_w2 * float(second_moment(act, _check_q(qs[-1]))) + sigma_b2)
    return torch.tensor(qs, dtype=_F64)


# ------------------------------------------------------------------------------------ alpha
def _sigma_alpha(fisher, depth: int) -> float:
    """1^T Σ^{-1} 1 for a layer-wise pattern Σ (L × L), refusing a singular Σ."""
    return float(fisher.sigma_weights(depth).sum())


def _kfac_alpha(fisher, widths: tuple[int, ...], sigma_b2: float, n_train: int, forster: bool) -> float:
    """α (or, where Θ̄ is not isotropic, its mean eigenvalue) of K-FAC on the training set.

    From (S.105): Θ̄ = N Σ_{l<L} B̄_l ⊙ Ā_{l−1} + c_L Ā_{L−1}, with B̄_l = I on the training set (wide
    hidden layers), c_L = N for the paper's B*_L = 1/N and 1 for B*_L = 1. Ā_{l−1} = I when the forward
    signal of layer l is at least N wide; an input narrower than N (p_0 < N) gives the projection
    P = X(X^TX)^{-1}X^T (S.108) of trace p_0, whose diagonal is p_0/N only in radial isotropic
    position (S.109)–(S.111). ``bias="block"`` gives the hidden layers' biases their own blocks, which
    add N B̄_l = N I each (S.124), and keeps the output bias in the augmented factor.
    """
    depth = len(widths) - 1
    n = n_train
    if any(m < n for m in widths[1:-1]):
        raise ValueError(
            f"widths: the K-FAC α assumes hidden widths M_l >= N = {n} (positive definite B_l and A_l), "
            f"got {list(widths[1:-1])}"
        )
    c_out = float(n) if fisher.output_factor == "paper" else 1.0
    block = fisher.bias == "block"
    # the first layer's forward signal carries the σ_b column unless its bias has its own block
    p0 = widths[0] + (1 if sigma_b2 > 0 and not (block and depth > 1) else 0)
    first = min(p0, n) / n  # mean of diag(Ā_0) on the training set
    if depth == 1:
        mean = c_out * first
    else:
        mean = n * first + n * (depth - 2) + c_out
        if block and sigma_b2 > 0:
            mean += n * (depth - 1)
    if p0 < n and (depth == 1 or not forster):
        warn_narrow_input("alpha: K-FAC's first layer", p0, n, first=True, augmented=p0 > widths[0], single=depth == 1)
        # the mean eigenvalue is returned
    return float(mean)


def resolve_fisher(fisher) -> _fisher.Fisher:
    """The Fisher instance ``fisher`` (a name goes through :func:`natural_tangents.fisher.get`).

    Raises:
        ValueError: ``fisher`` is neither a Fisher instance nor the name of one.
    """
    fisher = _fisher.get(fisher) if isinstance(fisher, str) else fisher
    if not isinstance(fisher, _fisher.Fisher):
        raise ValueError(
            f"fisher: expected an instance of a nat.fisher class (or its name), got {type(fisher).__name__}"
        )
    return fisher


@dataclass(frozen=True)
class AlphaQuery:
    """What an analytic-α rule may need: the network's widths [M_0, …, M_L] and activation, σ_w²,
    σ_b², the number of training samples N, whether the inputs are Forster-transformed, and whether
    the C output units count (unit-wise)."""

    widths: tuple[int, ...]
    activation: object
    sigma_w2: float | None
    sigma_b2: float
    n_train: int | None
    forster: bool
    include_output: bool

    @property
    def depth(self) -> int:
        return len(self.widths) - 1


@functools.singledispatch
def alpha_rule(fisher, query: AlphaQuery) -> float:
    """The registry of analytic α's, one rule per Fisher class (``alpha_rule.register``)."""
    raise ValueError(
        f"fisher: no analytic α is registered for {type(fisher).__name__}; register one with "
        "nat.theory.alpha_rule.register"
    )


@alpha_rule.register
def _(fisher: _fisher.Exact, query: AlphaQuery) -> float:
    return 1.0


@alpha_rule.register
def _(fisher: _fisher.Layerwise, query: AlphaQuery) -> float:
    return _sigma_alpha(fisher, query.depth)


@alpha_rule.register
def _(fisher: _fisher.KFAC, query: AlphaQuery) -> float:
    if query.n_train is None or int(query.n_train) < 1:
        raise ValueError(f"n_train: K-FAC's α depends on N; pass the number of samples, got {query.n_train!r}")
    return _kfac_alpha(fisher, query.widths, float(query.sigma_b2), int(query.n_train), bool(query.forster))


@alpha_rule.register
def _(fisher: _fisher.Unitwise, query: AlphaQuery) -> float:
    if query.activation is None or query.sigma_w2 is None:
        raise ValueError(
            "activation, sigma_w2: the unit-wise α = Σ γ_l M_l needs the activation and σ_w² (and "
            "sigma_b2) to compute γ_l at the forward variances q_l"
        )
    widths, depth, act = query.widths, query.depth, query.activation
    qs = variances(depth, activation=act, sigma_w2=query.sigma_w2, sigma_b2=query.sigma_b2, q0=1.0 / widths[0])
    total = sum(gamma(act, float(qs[l - 1])) * widths[l] for l in range(1, depth))
    # a hidden unit's C rows of one sample are multiples of that sample's input: its projection has
    # rank |S| ≤ N of N·C, so each unit adds γ_l / C; the C output units together add 1
    c = widths[-1]
    return float(total / c + (1 if query.include_output else 0))


def alpha(
    fisher,
    *,
    widths: Sequence[int],
    arch: Architecture | None = None,
    activation: str | _act.Activation | Callable[[Tensor], Tensor] | None = None,
    sigma_w2: float | None = None,
    sigma_b2: float = 0.0,
    n_train: int | None = None,
    forster: bool = False,
    include_output: bool = True,
) -> float:
    """The theoretical α of Θ̄(x, x) = α I for ``fisher`` (zero-damping limit; the Fisher's
    ``damping`` is not used). The paper's conventions: Θ = J J^T / N, so exact NGD has α = 1 and η = 1/α
    is the one-step learning rate.

    Args:
        fisher: an instance of a class of :mod:`natural_tangents.fisher`.
        widths: [M_0, M_1, …, M_L] of the network (L = len(widths) − 1).
        arch: the network's :class:`~natural_tangents.theory.Architecture` (e.g. ``net.architecture``),
            in place of activation, sigma_w2 and sigma_b2 (its depth must be len(widths) − 1).
        activation, sigma_w2: needed by the unit-wise Fisher (γ_l at the forward variances q_l).
        sigma_b2: σ_b² of the network; for K-FAC with ``bias="augment"`` the bias column widens the
            first layer's forward signal to M_0 + 1.
        n_train: N, needed by K-FAC.
        forster: K-FAC only: the inputs are in radial isotropic position (Forster transformation,
            ``nat.data.forster``). Without it and with M_0 < N, Θ̄ is not isotropic (S.109): a
            ``RuntimeWarning`` is emitted and the mean eigenvalue of Θ̄ is returned. From (S.109),
            Θ̄ = N (L−1) I + N (I ⊙ X(X^TX)^{-1}X^T) and tr X(X^TX)^{-1}X^T = M_0, so the mean eigenvalue
            is N (L−1) + M_0, the α of the Forster-transformed inputs (S.111); with
            ``output_factor="fisher"`` it is N (L−2) + M_0 + 1. With ``bias="augment"`` and σ_b² > 0
            the first layer's input is [σ_w x/√M_0, σ_b], of width M_0 + 1, and Forster on x does not
            make it isotropic; ``bias="block"`` (hidden biases in their own blocks, (S.123)–(S.124))
            adds N per hidden layer: α = N (2L−1) for M_0 ≥ N, N (2L−2) + M_0 with Forster inputs.
        include_output: unit-wise only: add the C output units (together exactly 1 at finite width,
            since each Θ_{L,k} is positive definite on its N rows; the paper drops this O(1/M) term).
            Default True, which is what a finite-width measurement of the mean eigenvalue gives.

    Unit-wise: α = Σ_{l=1}^{L−1} γ_l M_l / C (+ 1) (S.128, where C = 1), with γ_l = :func:`gamma` at q_l
    from :func:`variances` with q_0 = 1/M_0 (unit-norm inputs, the paper's Assumption 2). With C > 1
    outputs a hidden unit's C rows of one sample are multiples of that sample's input, so its
    projection Θ_{l,i} Θ_{l,i}^+ has rank |S_i| ≤ N of the N·C dimensions: it adds γ_l / C to the
    mean eigenvalue, not γ_l.

    Raises:
        ValueError: a singular layer pattern Σ (block tri-diagonal at L = 3s + 2), a missing
            argument the Fisher needs, or an unsupported Fisher.
    """
    widths = check_widths(widths)
    if arch is not None:
        if arch.depth != len(widths) - 1:
            raise ValueError(f"arch: depth {arch.depth} does not match widths {list(widths)} (L = {len(widths) - 1})")
        activation, sigma_w2, sigma_b2 = arch.activation, arch.sigma_w2, arch.sigma_b2
    query = AlphaQuery(widths, activation, sigma_w2, float(sigma_b2), n_train, bool(forster), bool(include_output))
    return alpha_rule(resolve_fisher(fisher), query)
