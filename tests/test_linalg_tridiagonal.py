"""The block tri-diagonal elimination (linalg/tridiagonal.py) against the dense (L·K)³ solve of the
whole system: non-symmetric and symmetric blocks, Σ with zero, negative and unequal entries, and the
float32 factorization with float64 refinement and its certified fallback."""

import pytest
import torch

import natural_tangents as nat
from natural_tangents.linalg.tridiagonal import TridiagonalSystem


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("ends", ["positive", "negative", "zero"])
def test_block_tridiagonal_elimination_matches_the_whole_system(depth, ends):
    """The O(L K³) block elimination of a tri-diagonal Σ against the dense (L·K)³ solve, with
    non-symmetric blocks (Λ Θ_l) and a Σ with zero, negative and unequal entries; the end layers are
    eliminated first unless their diagonal entry is zero."""
    g = torch.Generator().manual_seed(depth)
    k = 7
    s = torch.diag(1.0 + torch.rand(depth, generator=g, dtype=torch.float64))
    if depth > 1:
        s[0, 0] = s[-1, -1] = {"positive": 1.3, "negative": -0.8, "zero": 0.0}[ends]
    off = torch.randn(depth - 1, generator=g, dtype=torch.float64)
    off[2::3] = 0.0  # decoupled neighbours
    s = s + torch.diag(off, 1) + torch.diag(off, -1)
    j = torch.randn(depth, k, 3 * k, generator=g, dtype=torch.float64)
    lam = torch.randn(k, k, generator=g, dtype=torch.float64)
    left = (lam @ lam.T + torch.eye(k, dtype=torch.float64)) @ (j @ j.mT / k)
    rhs = torch.randn(k, 2, generator=g, dtype=torch.float64)
    big = (s[:, None, :, None] * left.permute(1, 0, 2)[None]).reshape(depth * k, depth * k)
    big = big + 1e-3 * torch.eye(depth * k, dtype=torch.float64)
    want = torch.linalg.solve(big, rhs.repeat(depth, 1))
    got = torch.cat(TridiagonalSystem(s, left, 1e-3, symmetric=False, options=nat.fisher.SolverOptions()).solve(rhs))
    assert _rel(got, want) < 1e-10
    theta = j @ j.mT / k  # symmetric PSD blocks: the end layers by Cholesky
    big = (s[:, None, :, None] * theta.permute(1, 0, 2)[None]).reshape(depth * k, depth * k)
    want = torch.linalg.solve(big + 1e-3 * torch.eye(depth * k, dtype=torch.float64), rhs.repeat(depth, 1))
    got = torch.cat(TridiagonalSystem(s, theta, 1e-3, symmetric=True, options=nat.fisher.SolverOptions()).solve(rhs))
    assert _rel(got, want) < 1e-10


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_block_tridiagonal_mixed_precision_refinement(depth):
    """Large float64 blocks are factored in float32 and refined: the solution agrees with the float64
    elimination to float64 rounding (certified backward error); a system too ill-conditioned for a
    float32 factorization (ρ = 1e-12 on rank-deficient blocks) is refused by the certificate and
    falls back to the float64 factorization."""
    g = torch.Generator().manual_seed(10 + depth)
    k = 40
    s = nat.fisher.tridiagonal_sigma(depth)
    float64_only = nat.fisher.SolverOptions(tridiagonal_refine_min_rows=10**9)
    refined = nat.fisher.SolverOptions(tridiagonal_refine_min_rows=0)
    for rank, damping, fallback in [(3 * k, 1e-3, False), (k // 2, 1e-12, True)]:
        j = torch.randn(depth, k, rank, generator=g, dtype=torch.float64)
        theta = j @ j.mT / rank
        rhs = torch.randn(k, 1, generator=g, dtype=torch.float64)
        big = (s[:, None, :, None] * theta.permute(1, 0, 2)[None]).reshape(depth * k, depth * k)
        want = torch.linalg.solve(big + damping * torch.eye(depth * k, dtype=torch.float64), rhs.repeat(depth, 1))
        direct = torch.cat(TridiagonalSystem(s, theta, damping, symmetric=True, options=float64_only).solve(rhs))
        system = TridiagonalSystem(s, theta, damping, symmetric=True, options=refined)
        got = torch.cat(system.solve(rhs))
        assert dict(system.routes) == ({"tridiagonal": 1} if fallback else {"tridiagonal refined": 1})
        if fallback:  # the float64 elimination itself
            assert torch.equal(got, direct)
        else:
            assert _rel(got, direct) < 1e-12
            assert _rel(got, want) < 1e-10
