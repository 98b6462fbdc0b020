"""The Forster transformation: N ≥ M_0 unit vectors put in radial isotropic position,
X̄^T X̄ = (N/M_0) I with ||x̄_n|| = 1, which restores K-FAC's isotropic condition when M_0 < N
(the paper's (S.108)–(S.111))."""

from __future__ import annotations

import math
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from ..validation import as_tensor, check_batch, check_finite
from ._validate import check_int
from .dataset import normalize, unit_rows

__all__ = ["forster", "apply_forster"]


def _isotropy(xbar: Tensor) -> tuple[float, Tensor, Tensor]:
    """||M_0/N X̄^T X̄ − I||_2 and the eigen-decomposition of S = M_0/N X̄^T X̄."""
    n, m0 = xbar.shape
    s = (m0 / n) * (xbar.T @ xbar)
    w, v = torch.linalg.eigh(s)
    return float((w - 1).abs().max()), w, v


def _forster_prechecks(u: Tensor) -> None:
    """Reject inputs that provably have no radial isotropic position (u: unit rows, float64).

    A set of N points has a radial isotropic position when no k-dimensional subspace
    (0 < k < M_0) holds more than k N / M_0 of them, and a subspace holding exactly k N / M_0
    points must split off (the others lie in a complementary subspace). Checked here: the whole
    set spans R^{M_0}, and the lines through the points (duplicates up to sign and scale). Other
    subspaces are left to the iteration, which then does not converge.
    """
    n, m0 = u.shape
    rank = int(torch.linalg.matrix_rank(u))
    if rank < m0:
        raise ValueError(
            f"x: the N={n} points span only a {rank}-dimensional subspace of R^{m0} (rank-deficient X), "
            f"which holds all N > {rank}·N/M_0 of them, so no invertible A puts them in radial "
            "isotropic position; project X onto its span (or drop constant/dependent features) first"
        )
    # Lines: canonical direction of each row (sign of its first entry away from zero), rounded.
    lead = (u.abs() > 1e-8).to(torch.int8).argmax(dim=1)
    sign = torch.sign(u.gather(1, lead[:, None]))
    key = torch.round(u * sign * 1e9)
    _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    for group in torch.nonzero(counts >= 2).flatten().tolist():
        p = int(counts[group])
        if p * m0 < n:
            continue
        rows = torch.nonzero(inverse == group).flatten().tolist()
        shown = ", ".join(str(i) for i in rows[:6]) + (", ..." if len(rows) > 6 else "")
        if p * m0 > n:
            raise ValueError(
                f"x: rows {shown} are parallel (duplicates up to sign and scale): one line holds "
                f"{p} > N/M_0 = {n / m0:g} of the points, so no radial isotropic position exists; "
                "remove duplicate samples (Assumption 2 asks for distinct inputs)"
            )
        rest = u[inverse != group]
        if rest.shape[0] and int(torch.linalg.matrix_rank(rest)) == m0:
            raise ValueError(
                f"x: rows {shown} are parallel (duplicates up to sign and scale): one line holds "
                f"exactly N/M_0 = {p} of the points while the other points span R^{m0}, so the "
                "radial isotropic position is only approached as A becomes singular; remove "
                "duplicate samples (Assumption 2 asks for distinct inputs)"
            )


_MAX_CONDITION = 1e10  # a transform A worse conditioned than this is taken as singular


def _not_converged(residual: float, tol: float, max_iter: int, method: str, n: int, m0: int) -> ValueError:
    return ValueError(
        f"forster: ||M_0/N X̄^T X̄ - I||_2 = {residual:.3g} > tol={tol:g} after max_iter={max_iter} "
        f"{method} iterations (N={n}, M_0={m0}). Either the points are (nearly) concentrated in a "
        "subspace (a k-dimensional subspace holding at least k·N/M_0 of them, e.g. duplicated or "
        "nearly dependent samples), where no radial isotropic position exists, or convergence is "
        "slow because N is close to M_0: raise max_iter, loosen tol, or try method='newton'"
    )


def _singular(residual: float, it: int, method: str, n: int, m0: int) -> ValueError:
    return ValueError(
        f"forster: the transform A became numerically singular (condition number > {_MAX_CONDITION:g}) "
        f"after {it} {method} iterations, with ||M_0/N X̄^T X̄ - I||_2 = {residual:.3g} (N={n}, "
        f"M_0={m0}): the points are concentrated in a subspace (a k-dimensional subspace holds at "
        "least k·N/M_0 of them), so X has no radial isotropic position; remove near-duplicate or "
        "dependent samples, or project X onto fewer features"
    )


def _forster_fixed_point(u: Tensor, tol: float, max_iter: int) -> Tensor:
    """A ← S^{-1/2} A with S = M_0/N X̄^T X̄ and X̄ the rows of X A^T normalized.

    This is Tyler's fixed-point iteration for the scatter matrix B = A^T A; it converges (linearly)
    exactly when a radial isotropic position exists, and otherwise A drifts towards singularity.
    """
    n, m0 = u.shape
    a = torch.eye(m0, dtype=u.dtype, device=u.device)
    residual = math.inf
    for it in range(max_iter + 1):
        xbar = unit_rows(u @ a.T)
        if not bool(torch.isfinite(xbar).all()):
            raise _singular(residual, it, "fixed-point", n, m0)
        try:
            residual, w, v = _isotropy(xbar)
        except torch.linalg.LinAlgError:
            raise _singular(residual, it, "fixed-point", n, m0) from None
        if residual <= tol:
            return a
        if it == max_iter:
            break
        if float(w.min()) <= 0 or (it % 10 == 9 and float(torch.linalg.cond(a)) > _MAX_CONDITION):
            raise _singular(residual, it, "fixed-point", n, m0)
        a = (v * w.rsqrt()) @ v.T @ a
        a = a * (math.sqrt(m0) / torch.linalg.matrix_norm(a))
    raise _not_converged(residual, tol, max_iter, "fixed-point", n, m0)


def _forster_newton(u: Tensor, tol: float, max_iter: int) -> Tensor:
    """Newton's method with backtracking on Barthe's convex function of log-weights t ∈ R^N.

    For unit points x_n (rows of X),

        f(t) = log det Σ(t) − (M_0/N) Σ_n t_n,   Σ(t) = Σ_n e^{t_n} x_n x_n^T,

    has gradient τ − M_0/N, with leverage scores τ_n = e^{t_n} x_n^T Σ^{-1} x_n, and Hessian
    diag(τ) − P∘P, with P = D^{1/2} X Σ^{-1} X^T D^{1/2} (D = diag(e^t), P a projection). f is
    invariant under t → t + s·1, the Hessian's one null direction, which is filled with 11^T/N.
    At the minimizer τ_n = M_0/N for all n, and any A with A Σ A^T = I gives
    X̄^T X̄ = (N/M_0) I. Without a radial isotropic position f has no minimizer and the
    weights spread without bound (A becomes singular).

    Each step is taken from t = 0 in the current coordinates X̄_k (rows of X A_k^T, normalized):
    since A Σ_X(t) A^T = Σ_{X̄}(t + log ||A x_n||²), this is the same Newton method, but the
    matrices it factorizes stay well conditioned however ill-conditioned A_k is.
    """
    n, m0 = u.shape
    c = m0 / n
    eye = torch.eye(m0, dtype=u.dtype, device=u.device)
    fill = torch.full((n, n), 1.0 / n, dtype=u.dtype, device=u.device)

    def evaluate(xbar: Tensor, t: Tensor) -> tuple[float, Tensor, Tensor, Tensor] | None:
        """f(t), its gradient, Z = D^{1/2} X̄ L^{-T} and L^{-1}, where Σ(t) = L L^T."""
        w = torch.exp(t)
        chol, info = torch.linalg.cholesky_ex((xbar * w[:, None]).T @ xbar)
        if int(info) != 0:
            return None
        a_step = torch.linalg.solve_triangular(chol, eye, upper=False)
        z = (xbar @ a_step.T) * w.sqrt()[:, None]
        value = 2 * float(torch.log(torch.diagonal(chol)).sum()) - c * float(t.sum())
        return value, (z * z).sum(dim=1) - c, z, a_step

    a = eye
    residual = math.inf
    zero = torch.zeros(n, dtype=u.dtype, device=u.device)
    for it in range(max_iter + 1):
        xbar = unit_rows(u @ a.T)
        if not bool(torch.isfinite(xbar).all()) or float(torch.linalg.cond(a)) > _MAX_CONDITION:
            raise _singular(residual, it, "Newton", n, m0)
        residual, _, _ = _isotropy(xbar)
        if residual <= tol:
            return a
        if it == max_iter:
            break
        state = evaluate(xbar, zero)
        if state is None:
            raise _singular(residual, it, "Newton", n, m0)
        value, grad, z, _ = state
        hess = torch.diag(grad + c) - (z @ z.T) ** 2 + fill
        step = -torch.linalg.lstsq(hess, grad[:, None]).solution[:, 0]
        slope = float(grad @ step)
        gnorm = float(grad.norm())
        # Backtracking: Armijo on f, or (for a full Newton step, where f is too flat to resolve
        # in floating point near the minimizer) a decrease of the gradient norm.
        size, a_step = 1.0, None
        while size > 1e-12:
            trial = evaluate(xbar, size * step)
            if trial is not None and (
                trial[0] <= value + 1e-4 * size * slope or (size == 1.0 and float(trial[1].norm()) < gnorm)
            ):
                a_step = trial[3]
                break
            size /= 2
        if a_step is None:
            raise ValueError(
                f"forster: Newton's line search stalled after {it} iterations with "
                f"||M_0/N X̄^T X̄ - I||_2 = {residual:.3g} > tol={tol:g} (max_iter={max_iter}, N={n}, "
                f"M_0={m0}); the points are probably (nearly) concentrated in a subspace (a "
                "k-dimensional subspace holding at least k·N/M_0 of them), where no radial isotropic "
                "position exists; otherwise loosen tol or try method='fixed_point'"
            )
        a = a_step @ a
        a = a * (math.sqrt(m0) / torch.linalg.matrix_norm(a))
    raise _not_converged(residual, tol, max_iter, "Newton", n, m0)


@overload
def forster(
    x: Tensor | np.ndarray,
    *,
    tol: float = ...,
    max_iter: int | None = ...,
    method: Literal["fixed_point", "newton"] = ...,
    return_transform: Literal[False] = ...,
) -> Tensor: ...


@overload
def forster(
    x: Tensor | np.ndarray,
    *,
    tol: float = ...,
    max_iter: int | None = ...,
    method: Literal["fixed_point", "newton"] = ...,
    return_transform: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def forster(
    x: Tensor | np.ndarray,
    *,
    tol: float = 1e-10,
    max_iter: int | None = None,
    method: Literal["fixed_point", "newton"] = "fixed_point",
    return_transform: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The Forster transformation: put N ≥ M_0 points in radial isotropic position.

    Finds an invertible A (M_0 × M_0) such that the rows x̄_n = A x_n / ||A x_n||_2 satisfy

        X̄^T X̄ = (N / M_0) I    and    ||x̄_n||_2 = 1,

    which is what K-FAC needs for the isotropic condition when M_0 < N: then
    A_0(x', x) = (M_0/N) X̄' X̄^T (S.110) and Θ̄ = α I with α = N(L − 1) + M_0 (S.111).
    Map test points with the same A through :func:`apply_forster`. The scale of each input
    row does not matter (only its direction does).

    Methods (both stop when ||M_0/N X̄^T X̄ − I||_2 ≤ tol, checked on the returned X̄):

    * ``"fixed_point"``: A ← S^{-1/2} A with S = M_0/N X̄^T X̄ (Tyler's scatter iteration).
      O(N M_0² + M_0³) per step; linear convergence, fast for N well above M_0 (≈ 40 steps for
      N = 80, M_0 = 40) and slow when N is close to M_0. Default max_iter 10,000.
    * ``"newton"``: Newton's method with backtracking on Barthe's convex function of N log-weights
      (see ``_forster_newton``). O(N³) per step, quadratic convergence; the better choice for
      N close to M_0 and N up to a few thousand. Default max_iter 100.

    A radial isotropic position exists when no k-dimensional subspace holds more than k N / M_0
    of the points (and one holding exactly k N / M_0 splits off). N < M_0, zero rows,
    rank-deficient X and parallel rows (duplicates up to sign and scale) on a line holding
    ≥ N/M_0 points are rejected up front; other concentrated configurations surface as
    non-convergence.

    Args:
        x: (N, M_0) inputs with N ≥ M_0 (need not be normalized; no zero rows).
        tol: tolerance on ||M_0/N X̄^T X̄ − I||_2, evaluated in float64.
        max_iter: iteration cap (``None``: 10,000 for fixed_point, 100 for newton).
        method: ``"fixed_point"`` or ``"newton"``.
        return_transform: also return A.

    Returns:
        X̄, (N, M_0) in the dtype of ``x`` (float64 for integer input), or (X̄, A) with A
        (M_0, M_0) in the same dtype. A is unique only up to a positive factor and a left
        orthogonal factor; it is returned scaled to ||A||_F² = M_0. The computation runs in
        float64, so for float32 input the returned X̄ is isotropic to float32 precision.

    Raises:
        ValueError: N < M_0, a zero or non-finite row, input with no radial isotropic position,
            or no convergence within max_iter (the message names tol and max_iter).
    """
    x = check_batch(x, "x")
    out_dtype = x.dtype if x.is_floating_point() else torch.float64
    tol = float(tol)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol: expected a positive tolerance such as 1e-10, got {tol}")
    if method not in ("fixed_point", "newton"):
        raise ValueError(f"method: expected 'fixed_point' or 'newton', got {method!r}")
    if max_iter is None:
        max_iter = 10_000 if method == "fixed_point" else 100
    max_iter = check_int(max_iter, "max_iter", minimum=0)

    n, m0 = x.shape
    if n < m0:
        raise ValueError(
            f"x: N={n} samples in M_0={m0} dimensions; radial isotropic position "
            f"X̄^T X̄ = (N/M_0) I needs N >= M_0 (X̄^T X̄ has rank <= N); use at least M_0 samples "
            "or fewer input features"
        )
    u = normalize(x.to(torch.float64))
    _forster_prechecks(u)
    solve = _forster_fixed_point if method == "fixed_point" else _forster_newton
    a = solve(u, tol, max_iter)  # already scaled to ||A||_F² = M_0
    xbar = unit_rows(u @ a.T).to(out_dtype)  # the X̄ whose residual the solver checked
    if return_transform:
        return xbar, a.to(out_dtype)
    return xbar


def apply_forster(transform: Tensor | np.ndarray, x: Tensor | np.ndarray) -> Tensor:
    """Map points with a Forster transform A from :func:`forster`: x̄ = A x / ||A x||_2.

    Use it for test points, so that train and test see the same input map (the paper's remark
    after (S.122)); the test rows come out with unit norm but are not isotropic themselves.

    Args:
        transform: A, (M_0, M_0), as returned by ``forster(..., return_transform=True)``.
        x: (n, M_0) points (no zero rows).

    Returns:
        (n, M_0) tensor with unit rows, in the dtype of ``x`` (float64 for integer input).
    """
    a = as_tensor(transform, "transform")
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(
            f"transform: expected the square (M_0, M_0) matrix A from forster(..., return_transform=True), "
            f"got shape {tuple(a.shape)}"
        )
    check_finite(a, "transform")
    x = check_batch(x, "x", features=a.shape[1])
    out_dtype = x.dtype if x.is_floating_point() else torch.float64
    mapped = x.to(torch.float64) @ a.to(torch.float64).T
    return normalize(mapped).to(out_dtype)
