"""Symmetric positive semi-definite systems at zero damping (linalg/psd.py): the pseudo-inverse A^+
(the limit ρ → 0⁺), by Cholesky only when A is provably far from singular, by the eigendecomposition
otherwise, against torch.linalg.pinv with the library's cut-off n·eps·λ_max."""

import math
from collections import Counter

import pytest
import torch

from natural_tangents.linalg import psd

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("rank", [40, 25])
def test_zero_damping_inverse_is_the_pseudo_inverse_by_either_route(rank):
    """At ρ = 0 a kernel far from singular is inverted by Cholesky, a singular one by the
    eigendecomposition's pseudo-inverse; both equal the pseudo-inverse."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(40, rank, generator=g, dtype=torch.float64)
    a = x @ x.T
    got = psd.inverse_psd(a, 0.0)
    want = torch.linalg.pinv(a, hermitian=True)
    assert _rel(got, want) < 1e-9
    assert (psd.cholesky_if_nonsingular(a) is not None) == (rank == 40)
    b = torch.randn(40, 3, generator=g, dtype=torch.float64)
    assert _rel(psd.solve_psd(a, b), want @ b) < 1e-9


def _with_condition_number(n, cond_1, spectrum, seed):
    """A = Q diag(λ) Q^T (n × n, Q a random orthogonal matrix, λ_max = 1) whose 1-norm condition
    number ‖A‖_1 ‖A^{-1}‖_1 (the quantity the route estimates) is ``cond_1``: the smallest eigenvalue
    is rescaled until it is. ``spectrum``: "graded" (λ log-spaced from 1 to λ_min) or "one small"
    (λ in [1, 2] but one)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    bulk = 1.0 + torch.rand(n, generator=g, dtype=F64)
    kappa = cond_1
    for _ in range(4):  # ‖A‖_1 ‖A^{-1}‖_1 is nearly proportional to κ_2 = 1/λ_min: converges at once
        if spectrum == "graded":
            ev = torch.logspace(0, -math.log10(kappa), n, dtype=F64)
        else:
            ev = torch.cat([torch.tensor([1.0 / kappa], dtype=F64), bulk[1:] / 2])
        a = (q * ev) @ q.T
        a = 0.5 * (a + a.T)
        kappa *= cond_1 / float(torch.linalg.cond(a, p=1))
    return a


@pytest.mark.parametrize("spectrum", ["graded", "one small"])
@pytest.mark.parametrize(("side", "factor"), [("below", 0.5), ("above", 4.0)])
def test_zero_damping_route_on_both_sides_of_the_cut_off(spectrum, side, factor):
    """Cholesky is kept at ρ = 0 only when the estimated condition number is 10⁴ times below
    1/(n·eps), the safety factor that keeps matrices whose smallest eigenvalues may lie near the
    pseudo-inverse's cut-off n·eps·λ_max off the Cholesky route. Just below that cut-off (1-norm
    condition number half of it) the factor is kept — the estimate never exceeds the true 1-norm
    condition number; just above (4×, a margin for Hager's estimate, which is within a factor 1.8 of
    it on these matrices) the route is the eigendecomposition. Without the 10⁴ both sides would take
    Cholesky. Either way the inverse is A^+ (every eigenvalue lies far above pinv's cut-off here, so
    the two routes agree to rounding: both are backward stable, so within a few κ_2·eps)."""
    n = 40
    cut = 1.0 / (1e4 * n * EPS)  # ≈ 1.1e10
    a = _with_condition_number(n, factor * cut, spectrum, seed=3)
    assert float(torch.linalg.cond(a, p=1)) == pytest.approx(factor * cut, rel=1e-3)
    chol = psd.cholesky_if_nonsingular(a)
    assert (chol is not None) == (side == "below")
    if chol is not None:
        assert _rel(chol @ chol.T, a) < 1e-14
    routes = Counter()
    inverse = psd.PSDInverse.of(a, 0.0, routes=routes)
    assert dict(routes) == ({"cholesky": 1} if side == "below" else {"eigh": 1})
    want = torch.linalg.pinv(a, hermitian=True, rtol=n * EPS)  # the library's cut-off n·eps·λ_max
    b = torch.randn(n, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    tol = 10 * float(torch.linalg.cond(a)) * EPS  # κ_2 ≈ 2e9 (below), 1.5e10 (above); 1e-7 measured below
    assert _rel(inverse.matrix(), want) < tol
    assert _rel(inverse.solve(b), want @ b) < tol
    assert _rel(psd.inverse_psd(a, 0.0), want) < tol
    assert _rel(psd.solve_psd(a, b), want @ b) < tol
