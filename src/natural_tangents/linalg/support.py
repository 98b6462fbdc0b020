"""Batched positive-definite systems on index subsets of one shared N × N matrix: the unit-wise
Fisher's support systems (:mod:`natural_tangents.fisher.unitwise`).

Unit i of a layer solves, on its support S_i (the slots of ``idx[i]``),

    A_i z_i = c_i,   A_i = diag(t_i) K[S_i, S_i] diag(t_i) + ρ I,

for one shared symmetric K (N × N) and a positive scale t_i per slot. Padding slots (beyond the
unit's support) are identity rows that never couple, so a batch of units of similar support size is
one (u, m, m) tensor.

:func:`principal_submatrices` gathers the K[S_i, S_i] through one flat index (a quarter of the time
of two-dimensional advanced indexing, which builds an index tensor per dimension).

:func:`refined_solve` is the mixed-precision route for one right-hand side per unit: the batched
Cholesky factorization in float32 (:mod:`.lapack`), refined by :func:`~.refine.refine` with float64
residuals A_i z_i computed through K itself — all units' products in one (u, N) × (N, N) matrix
product — to a certified float64 backward error (‖A_i‖ bounded below by its largest diagonal entry).
Units that are not certified are reported, for the caller to solve in float64.

:func:`complement_solve` serves supports of more than half of the samples at ρ = 0: through
P = K^{-1} each unit factors only the block of P outside its support (the inverse of a Schur
complement), min(|S|, N − |S|)³ work instead of |S|³, refined and certified the same way.

:func:`primal_solve` serves ρ = 0 supports larger than rank K, where K[S, S] is singular: the
weighted r × r normal equations on a basis of K's range, refined and certified the same way.

:func:`cg_solve` is the damped update's shared-K route: conjugate gradients for all units of a
layer at once, with the same certificate.

The batches are factored by :func:`.lapack.cholesky` in the buffers of a :class:`.lapack.ScratchPool`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .lapack import Scratch, buffer, cholesky, cholesky_solve, factored
from .options import SolverOptions
from .refine import refine

__all__ = ["cg_solve", "complement_solve", "primal_solve", "principal_submatrices", "refined_solve"]

DEFAULT = SolverOptions()


def principal_submatrices(k: Tensor, idx: Tensor, work: Scratch | None = None, key: str = "sub") -> Tensor:
    """k[idx_i][:, idx_i] for every row idx_i of idx (u, m): (u, m, m), in ``work``'s buffer ``key``
    (a new tensor without one)."""
    u, m = idx.shape
    size = k.shape[-1]
    index_dtype = torch.int32 if k.numel() < 2**31 else torch.int64
    rows = idx.to(index_dtype)
    flat = ((rows * size)[:, :, None] + rows[:, None, :]).view(-1)
    if work is None:
        return k.reshape(-1).index_select(0, flat).view(u, m, m)
    out = work.get(key, (u, m, m), k)
    torch.index_select(k.reshape(-1), 0, flat, out=out.view(-1))
    return out


def refined_solve(
    k: Tensor,
    k_low: Tensor,
    idx: Tensor,
    sub_idx: Tensor,
    valid: Tensor,
    t: Tensor | None,
    damping: float,
    c: Tensor,
    work: Scratch | None = None,
    options: SolverOptions = DEFAULT,
) -> tuple[Tensor, Tensor]:
    """The support systems A_i z_i = c_i, factored in ``k_low``'s precision and refined in ``k``'s.

    Args:
        k: K (N, N), float64.
        k_low: K ⊕ I in float32, (N + p, N + p) with p ≥ the padding of any unit.
        idx: (u, m) sample of each slot; padding slots hold distinct samples outside the support
            (where z = 0).
        sub_idx: (u, m) row of ``k_low`` for each slot (padding slots point into the identity).
        valid: (u, m) bool, the support slots.
        t: (u, m) scale of each slot (None: 1), positive on the support.
        damping: ρ ≥ 0.
        c: (u, m) float64 right-hand sides, zero on padding.
        work: scratch buffers for the (u, m, m) systems and factors.

    Returns:
        z (u, m) float64, zero on padding, and certified (u,) bool: the units whose backward error
        meets the float64 bound; the others' z is not to be used.
    """
    sub = principal_submatrices(k_low, sub_idx, work)
    if t is not None:
        tl = t.to(sub.dtype) * valid + (~valid)
        sub.mul_(tl[:, :, None] * tl[:, None, :])
    if damping:
        sub.diagonal(dim1=1, dim2=2).add_(damping)
    chol, info = cholesky(sub, work, overwrite=True)
    del sub
    mask = valid.to(c.dtype)

    def approx(r: Tensor) -> Tensor:
        return cholesky_solve(chol, r.to(chol.dtype)[:, :, None])[:, :, 0].to(c.dtype) * mask

    apply, a_norm = _support_product(k, idx, valid, t, damping)
    return refine(apply, approx, c, a_norm, info == 0 if damping else factored(chol, info), idx.shape[1], options)


def complement_solve(
    k: Tensor,
    p_ext: Tensor,
    idx: Tensor,
    valid: Tensor,
    out_idx: Tensor,
    out_valid: Tensor,
    c: Tensor,
    work: Scratch | None = None,
    options: SolverOptions = DEFAULT,
) -> tuple[Tensor, Tensor]:
    """K[S_i, S_i]^{-1} c_i for supports S_i larger than half of the N samples, through P = K^{-1}
    (N × N, shared): with S̄_i the samples outside the support,

        K[S, S]^{-1} = P[S, S] − P[S, S̄] P[S̄, S̄]^{-1} P[S̄, S]

    (the inverse of a Schur complement), so each unit factors only its |S̄_i| × |S̄_i| block of P, and
    the products with P are two (u, N) × (N, N) matrix products for all units. The result is refined
    with float64 residuals and certified as in :func:`refined_solve`.

    Args:
        k: K (N, N), float64, positive definite.
        p_ext: P ⊕ I, (N + q, N + q), float64.
        idx, valid: (u, m) support slots, as in :func:`refined_solve`.
        out_idx: (u, q) samples outside each support first; ``out_valid`` (u, q) marks them (slots
            beyond point into ``p_ext``'s identity for the factorization and carry zeros).
        c: (u, m) right-hand sides, zero on padding.
        work: scratch buffers for the (u, q, q) blocks and factors.
    """
    n = k.shape[0]
    u, q = out_idx.shape
    slot = torch.arange(q, device=out_idx.device)[None, :]
    sub = principal_submatrices(p_ext, torch.where(out_valid, out_idx, n + slot), work)
    chol, info = cholesky(sub, work, overwrite=True)
    del sub
    p = p_ext[:n, :n]
    mask, out_mask = valid.to(c.dtype), out_valid.to(c.dtype)
    dense = torch.zeros(u, n, dtype=c.dtype, device=c.device)

    def approx(r: Tensor) -> Tensor:
        g = dense.zero_().scatter_(1, idx, r * mask) @ p
        y = cholesky_solve(chol, (torch.gather(g, 1, out_idx) * out_mask)[:, :, None])[:, :, 0]
        g.sub_(dense.zero_().scatter_(1, out_idx, y * out_mask) @ p)
        return torch.gather(g, 1, idx) * mask

    apply, a_norm = _support_product(k, idx, valid, None, 0.0)
    return refine(apply, approx, c, a_norm, info == 0, idx.shape[1], options)


def primal_solve(
    x: Tensor,
    x_low: Tensor | None,
    idx: Tensor,
    scale: Tensor,
    g: Tensor,
    work: Scratch | None = None,
    options: SolverOptions = DEFAULT,
) -> tuple[Tensor, Tensor]:
    """Weighted normal equations on row subsets of one shared basis, G_i φ_i = g_i with

        G_i = Σ_{n ∈ S_i} t_{i,n}² x_n x_n^T   (r × r),

    for supports larger than r, where the dual systems of :func:`refined_solve` are singular.
    The Grams are batched products of the gathered, scaled rows (u, m, r), r²·|S_i| work per unit.

    Args:
        x: (N, r) the shared rows x_n (columns orthonormal keeps G_i as well conditioned as the
            data allow).
        x_low: x in float32: factor in float32 and refine with residuals in x's precision (one
            right-hand side) to the certified backward error of :func:`refined_solve`; None: one
            Cholesky factorization in x's precision.
        idx: (u, m) each unit's samples (support first; the rest carry t = 0).
        scale: (u, m) t_{i,n}, zero off the support.
        g: (u, r, R) right-hand sides (R = 1 to refine).
        work: scratch buffers for the (u, m, r) rows and the (u, r, r) Grams and factors.

    Returns:
        φ (u, r, R) and certified (u,) bool: factored (and, refined, within the backward-error
        bound); the others' φ is not to be used.
    """
    low = x if x_low is None else x_low
    u, m = idx.shape
    r = x.shape[1]
    rows = buffer(work, "rows", (u, m, r), low)
    torch.index_select(low, 0, idx.reshape(-1), out=rows.view(u * m, r))
    rows.mul_(scale.to(low.dtype)[:, :, None])
    gram = buffer(work, "gram", (u, r, r), low)
    torch.bmm(rows.mT, rows, out=gram)
    del rows
    chol, info = cholesky(gram, work, overwrite=True)
    ok = factored(chol, info)
    if x_low is None:
        return cholesky_solve(chol, g.to(chol.dtype)).to(g.dtype), ok
    weight = torch.zeros(u, x.shape[0], dtype=x.dtype, device=x.device).scatter_(1, idx, scale.to(x.dtype) ** 2)

    def apply(phi: Tensor) -> Tensor:  # G_i φ_i through x: two (u, N)-sized products for all units
        return ((phi @ x.T) * weight) @ x

    def approx(res: Tensor) -> Tensor:
        return cholesky_solve(chol, res.to(chol.dtype)[:, :, None])[:, :, 0].to(x.dtype)

    a_norm = (weight @ (x * x)).amax(1)  # the largest diagonal entry of G_i
    phi, ok = refine(apply, approx, g[:, :, 0], a_norm, ok, r, options)
    return phi[:, :, None], ok


def _support_product(k: Tensor, idx: Tensor, valid: Tensor, t: Tensor | None, damping: float):
    """z ↦ A_i z_i for every unit (u, m), A_i = diag(t_i) K[S_i, S_i] diag(t_i) + ρ I, in K's
    precision: one (u, N) × (N, N) product for all units (zero on padding)."""
    mask = valid.to(k.dtype)
    dense = torch.zeros(idx.shape[0], k.shape[0], dtype=k.dtype, device=k.device)

    def apply(z: Tensor) -> Tensor:
        tz = z if t is None else z * t
        az = torch.gather(dense.zero_().scatter_(1, idx, tz * mask) @ k, 1, idx)
        if t is not None:
            az.mul_(t)
        if damping:
            az.add_(z, alpha=damping)
        return az * mask

    kd = torch.diagonal(k)[idx]
    a_diag = kd if t is None else kd * t * t
    return apply, (a_diag * mask).amax(1) + damping  # and the largest diagonal entries, ≤ ‖A_i‖


def cg_solve(
    k: Tensor,
    s: Tensor,
    b: Tensor,
    damping: float,
    *,
    tol: float,
    maxiter: int,
    certify: bool,
    fallback: Callable[[Tensor, Tensor], Tensor],
    options: SolverOptions = DEFAULT,
) -> Tensor:
    """The unit-wise update's systems by conjugate gradients, all units of a layer at once.

    Unit i solves A_i z_i = c_i with A_i = S_i K S_i / N + ρ and c_i = b_i / s_i (0 where
    s_i = 0), and w_i = s_i z_i, as the direct route; every iteration applies all the layer's
    systems with one (U, N) × (N, N) product, Jacobi-preconditioned (diagonal s_n² K_nn / N + ρ).
    Without ``certify`` a unit stops at residual ≤ ``tol`` ‖c_i‖; with it, it stops at a tenth of
    the backward-error bound N·eps (‖A_i‖ ‖z_i‖ + ‖c_i‖), and is kept only if its true residual,
    recomputed at the end, meets the bound. The units left (not converged in ``maxiter``
    iterations, or not certified) go to ``fallback(s, b)``. s, b: (M, N). Returns w (M, N).
    ``options.certify`` scales the bound (0: no unit is kept, all take the fallback)."""
    n, rho = k.shape[0], damping
    bound = options.certify * n * torch.finfo(k.dtype).eps
    kn = k / n

    def apply(scale: Tensor, v: Tensor) -> Tensor:  # A_i v_i for every row
        return torch.mm(scale * v, kn).mul_(scale).add_(v, alpha=rho)

    def diagonal(scale: Tensor) -> Tensor:  # the diagonals of the A_i, (rows, N)
        return (scale * scale).mul_(torch.diagonal(kn)).add_(rho)

    def rhs(rows: Tensor) -> Tensor:
        su = s[rows]
        return torch.where(su > 0, b[rows] / torch.where(su > 0, su, 1.0), 0.0)

    z = torch.zeros_like(b)
    rows = torch.nonzero((b != 0).any(1) & (s > 0).any(1))[:, 0]  # units still iterating
    su, res = s[rows], rhs(rows)
    dinv = diagonal(su).reciprocal_()
    c_norm = res.norm(dim=1)
    a_norm = 1.0 / dinv.amin(1)  # the largest diagonal entry of A_i, ≤ ‖A_i‖
    p = dinv * res
    rz, x = (res * p).sum(1), torch.zeros_like(res)
    converged = []
    for _ in range(maxiter):
        if len(rows) == 0:
            break
        q = apply(su, p)
        alpha = (rz / (p * q).sum(1))[:, None]
        x.addcmul_(p, alpha)
        res.addcmul_(q, alpha, value=-1.0)
        del q
        if certify:
            done = res.norm(dim=1) <= 0.1 * bound * (a_norm * x.norm(dim=1) + c_norm)
        else:
            done = res.norm(dim=1) <= tol * c_norm
        if bool(done.any()):
            z[rows[done]] = x[done]
            converged.append(rows[done])
            keep = ~done
            kept = (t[keep] for t in (rows, su, res, x, p, rz, dinv, c_norm, a_norm))
            rows, su, res, x, p, rz, dinv, c_norm, a_norm = kept
        y = dinv * res
        rz_new = (res * y).sum(1)
        p = p.mul_((rz_new / rz)[:, None]).add_(y)
        rz = rz_new
        del y
    left = [rows]
    if certify and converged:  # the true residuals of the accepted units
        acc = torch.cat(converged)
        su, c, za = s[acc], rhs(acc), z[acc]
        a_acc = diagonal(su).amax(1)
        eta = (c - apply(su, za)).norm(dim=1) / (a_acc * za.norm(dim=1) + c.norm(dim=1))
        left.append(acc[~(eta <= bound)])
    w = z.mul_(s)
    rows = torch.cat(left)
    if len(rows):  # not converged or not certified: the direct route
        w[rows] = fallback(s[rows], b[rows])
    return w
