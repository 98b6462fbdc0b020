"""K-FAC in dual form (docs/conventions.md; the paper's Appendix B.3, (S.95)–(S.111), (S.123)–(S.124)).

Per layer the Fisher block is a Kronecker product of an output factor B*_l (M_l × M_l) and an
input factor A*_{l−1} (p × p, p = M_{l−1} [+ 1 for the bias column]):

    A*_{l−1} = a^T a / N   (= σ_w² h^T h / (N M_{l−1}) with the bias column σ_b appended)   (S.95)
    B*_l     = Δ_l^T Λ Δ_l / N  (summed over outputs),   B*_L = mean_n Λ_n / N  (the paper's convention)

and the natural gradient of [W_l | b_l] is (B*_l + ρI)^{-1} ∇L (A*_{l−1} + ρI)^{-1}. Both inverses
are taken in whichever form is smaller: the push-through identity gives the dual form
a (a^T a / N + ρ)^{-1} = (a a^T / N + ρ)^{-1} a (an N × N solve) for wide layers, and the factor is
inverted as it is (primal) for a layer narrower than N, such as an input layer with M_0 < N (S.108).
On the training set at ρ = 0, Θ̄ = N Σ_l B̄_l ⊙ Ā_{l−1} (S.105) = N L I when M_0 ≥ N (S.107).

Bias treatment: ``bias="augment"`` (default) appends σ_b to the forward signal (section B.3.3);
``bias="block"`` keeps K-FAC for the weights of the hidden layers and gives their biases the
separate block J_b^T Λ J_b / N² of (S.123) (a Kronecker block with the scalar input factor σ_b²/N),
so that (1/N) Θ̄ = Σ_{l<L} B̄_l ⊙ (Ā_{l−1} + 1 1^T) + Ā_{L−1} (S.124) and the Forster transformation of
the inputs restores isotropy when M_0 < N: α = N(2L − 2) + M_0 (N(2L − 1) when M_0 ≥ N). The output
layer keeps its bias in the augmented factor: on its own, an output-bias block would add the rank-C
term N 1 1^T of (S.124) with B̄_L = 1 1^T and break isotropy.

Convolutions (and Linear layers applied at several positions T) follow KFC (Grosse & Martens, 2016)
with this normalization: A* = Σ_{n,t} a_{n,t} a_{n,t}^T / (N T) and B* = Σ_{n,t} δ_{n,t}^T Λ_n δ_{n,t} / N,
so that B* ⊗ A* is the expected per-sample Fisher when the derivatives of different positions are
uncorrelated and the patches' statistics do not depend on the position; for T = 1 this is (S.95).
Both factors are small there (C_out and C_in·k² + 1) and are inverted as they are (primal). A
module without Kronecker structure (the generic kind) keeps its exact block J_l^T Λ J_l / N + ρ I.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import warn
from ..layers.affine import AffineSignals
from ..layers.base import outer_gram, padded_mm
from ..signals import Signals
from .base import (
    BoundFisher,
    Fisher,
    block_diag_metric,
    damped_cholesky,
    inverse_psd,
    solve_psd,
    solve_with_metric,
)

__all__ = ["KFAC", "warn_narrow_input"]

_FORCE_ROUTE: str | None = None  # tests pin the order of the update's products ("input_first", …)


@dataclass(frozen=True)
class _KronBlock:
    """One Kronecker-factored block: rows of layer ``layer``, columns ``cols`` of [W_l | b_l]."""

    layer: int
    cols: slice
    a_scale: float  # A* = a_scale · a^T a / N
    b_scale: float  # B* = b_scale · Δ^T Λ Δ / N


@dataclass(frozen=True, kw_only=True)
class KFAC(Fisher):
    """Block-diagonal K-FAC (the paper's (S.95)) with factored damping (B* + ρI) ⊗ (A* + ρI).

    Args:
        bias: ``"augment"`` (default; σ_b appended to the forward signal, B.3.3) or ``"block"``
            (a separate bias block, (S.123); MLP-like layers only, convolutions always augment).
        output_factor: ``"paper"`` (default; B*_L = mean Λ / N, i.e. I_C / N for MSE, giving
            α = N L) or ``"fisher"`` (B*_L = mean Λ, the plain K-FAC factor: α = N (L − 1) + 1).
        warn: warn when a layer's input factor is narrower than N and the inputs are not in
            radial isotropic position, where the isotropic condition fails (S.109).

    With ρ > 0, the N × N factors of a network in lower precision than ``solve_dtype`` (float32)
    are factored in the network's precision, in which they are applied to its signals anyway.
    """

    bias: str = "augment"
    output_factor: str = "paper"
    warn: bool = True

    name: ClassVar[str] = "kfac"
    label: ClassVar[str] = "K-FAC"
    aliases: ClassVar[tuple[str, ...]] = ("kfac", "k_fac")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bias not in ("augment", "block"):
            raise ValueError(f"bias: expected 'augment' or 'block', got {self.bias!r}")
        if self.output_factor not in ("paper", "fisher"):
            raise ValueError(f"output_factor: expected 'paper' or 'fisher', got {self.output_factor!r}")

    # ------------------------------------------------------------------ structure
    def _blocks(self, sig: Signals) -> list[_KronBlock]:
        out, last = [], sig.output_layer
        for l, layer in enumerate(sig.layers):
            kr = layer.kron
            if kr is None or kr.positions > 1:
                out.append(_KronBlock(l, slice(None), 1.0, 1.0))
                continue
            b_scale = 1.0 / sig.n if (l == last and self.output_factor == "paper") else 1.0
            p = kr.in_width
            if kr.has_bias and kr.has_weight and self.bias == "block" and l != last:
                out.append(_KronBlock(l, slice(0, p - 1), 1.0, b_scale))
                out.append(_KronBlock(l, slice(p - 1, p), 1.0 / sig.n, b_scale))
            else:
                out.append(_KronBlock(l, slice(0, p), 1.0, b_scale))
        return out

    def _check_isotropy(self, sig: Signals) -> None:
        if not self.warn or self.damping > 0:
            return
        n = sig.n
        for l, layer in enumerate(sig.layers):
            kr = layer.kron
            if kr is None or kr.positions > 1:
                continue
            p = kr.in_width - (kr.has_bias and kr.has_weight and self.bias == "block")
            if p >= n:
                continue
            if l == 0:
                x = kr.a[:, 0, :p].to(torch.float64)
                x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
                gram = x.T @ x * (p / n)
                if float(torch.linalg.matrix_norm(gram - torch.eye(p, dtype=gram.dtype), 2)) < 1e-6:
                    continue
            warn_narrow_input(
                f"K-FAC: layer {l + 1}", p, n, first=l == 0, augmented=kr.has_bias and self.bias == "augment"
            )

    # ------------------------------------------------------------------ precision
    def _work_dtype(self, bound: BoundFisher, blk: _KronBlock) -> torch.dtype:
        """The precision of block ``blk``'s N × N factors, their solves and the update's products.

        A network in a lower precision than ``solve_dtype`` (float32) keeps its own only where that
        is provably accurate: ρ > 0 and both factors' condition numbers, bounded by
        (tr K + ρ) / ρ with the traces read off the signals, below 10⁻³ / eps of the network's
        precision (about 1.7·10⁴ in float32), so that a float32 factorization loses at most about
        10⁻³ relative. Otherwise (small or zero damping) the signals are cast to ``solve_dtype``
        once and everything about the block is computed there."""
        kr = bound.signals.layers[blk.layer].kron
        net, sd = kr.dtype, self.solve_dtype
        if net.itemsize >= sd.itemsize:
            return net
        if self.damping == 0:
            return sd
        a = kr.a[:, 0, blk.cols]
        d = kr.flat_delta()
        lam = bound.metric
        lam_max = 1.0 if lam is None else float(torch.diagonal(lam, dim1=1, dim2=2).sum(1).max())
        traces = (
            blk.a_scale / bound.n * float(a.double().square().sum()),
            blk.b_scale / bound.n * lam_max * float(d.double().square().sum()),
        )
        kappa = max(traces) / self.damping + 1.0
        return net if kappa * torch.finfo(net).eps <= 1e-3 else sd

    # ------------------------------------------------------------------ factor inverses (cached)
    def _factors(self, bound: BoundFisher, i: int, blk: _KronBlock):
        key = ("kfac", i)
        if key not in bound.cache:
            layer = bound.signals.layers[blk.layer]
            if layer.kron is None:
                theta = layer.gram(dtype=self.solve_dtype) / bound.n
                bound.cache[key] = ("exact", solve_with_metric(theta, bound.metric, self.damping))
            elif layer.kron.positions > 1:
                bound.cache[key] = ("primal", *self._kfc_inverses(bound, layer.kron))
            else:
                bound.cache[key] = ("dual", *self._input_side(bound, blk), self._output_dual(bound, blk))
        return bound.cache[key]

    def _input_side(self, bound: BoundFisher, blk: _KronBlock) -> tuple[Tensor, Tensor]:
        """(a, R_A) with R_A = a (A* + ρI)^{-1}, both (N, p). The O(N² p) products run in the block's
        work precision (:meth:`_work_dtype`); the small factor is solved in the solve dtype."""
        a = bound.signals.layers[blk.layer].kron.a[:, 0, blk.cols].to(self._work_dtype(bound, blk))
        n, p = a.shape
        t = blk.a_scale / n
        sd = self.solve_dtype
        if p < n:  # primal p × p (S.108)
            a64 = a.to(sd)
            return a64, solve_psd(t * (a64.T @ a64), a64.T, self.damping).T
        gram = (a @ a.T).to(sd) * t  # dual N × N
        inv = inverse_psd(gram, self.damping)
        return a, inv.to(a.dtype) @ a

    def _output_dual(self, bound: BoundFisher, blk: _KronBlock) -> Tensor:
        """(B* + ρ)^{-1} Δ^T (M_l, N·C): through Δ^T Z with Z = (b_scale Λ β / N + ρ)^{-1} and
        β = Δ Δ^T (N·C × N·C) for a wide layer, as it is (primal) for a layer narrower than N·C."""
        kr = bound.signals.layers[blk.layer].kron
        d = kr.flat_delta(self._work_dtype(bound, blk))
        nf, m = d.shape
        lam = bound.metric
        if m < nf:
            d = d.to(self.solve_dtype)
            ld = d if lam is None else block_diag_metric(lam) @ d
            b_star = d.T @ ld * (blk.b_scale / bound.n)
            return solve_psd(b_star, d.T, self.damping)  # (M, NC)
        beta = (d @ d.T).to(self.solve_dtype) * (blk.b_scale / bound.n)
        return d.T @ solve_with_metric(beta, lam, self.damping).to(d.dtype)  # Δ^T Z, (M, NC)

    def _kfc_inverses(self, bound: BoundFisher, kr: AffineSignals) -> tuple[Tensor, Tensor]:
        """(B* + ρ)^{-1} (M, M) and (A* + ρ)^{-1} (p, p) of a layer with positions (KFC)."""
        sd, n = self.solve_dtype, bound.n
        a2, d = kr.a2.to(sd), kr.d.to(sd)
        a_star = a2.T @ a2 / (n * kr.positions)
        lam = bound.metric
        if lam is None:
            b_star = torch.einsum("knti,kntm->im", d, d) / n
        else:
            b_star = torch.einsum("knti,nkj,jntm->im", d, lam, d) / n
        return inverse_psd(b_star, self.damping), inverse_psd(a_star, self.damping)

    # ------------------------------------------------------------------ the update's fast route
    def _fast(self, bound: BoundFisher, layer) -> bool:
        """MSE-type blocks of MLP-like layers: the update goes through Cholesky factors only (at ρ = 0
        when the N × N factors are far from singular, so that their inverses are the pseudo-inverses)."""
        return bound.metric is None and layer.kron is not None and layer.kron.positions == 1

    def _sides(self, bound: BoundFisher, i: int, blk: _KronBlock) -> dict:
        """The two factors of block ``i`` as whatever is cheapest to apply (cached per batch):
        ``a_inv`` (A* + ρ)^{-1} (p × p) for an input narrower than N, else ``a_chol``, the Cholesky
        factor of t a a^T + ρ (N × N); likewise ``d_inv`` (B* + ρ)^{-1} (M × M) or ``d_chol`` of
        s Δ Δ^T + ρ (N·C × N·C). Grams are formed in the network's precision (symmetric products) and
        factored in the solve dtype (the N × N ones in the network's, see :func:`_dual_cholesky`)."""
        key = ("kfac_sides", i)
        if key in bound.cache:
            return bound.cache[key]
        kr = bound.signals.layers[blk.layer].kron
        work = self._work_dtype(bound, blk)
        a, d = kr.a[:, 0, blk.cols].to(work), kr.flat_delta(work)
        n, sd, rho = bound.n, self.solve_dtype, self.damping
        t, s = blk.a_scale / n, blk.b_scale / n
        out = {"a": a, "d": d}
        if a.shape[1] < n:
            a64 = a.to(sd)
            out["a_inv"] = inverse_psd(t * outer_gram(a64.T), rho)
        else:
            out["a_chol"] = _dual_cholesky(a, t, rho, sd)
        if d.shape[1] < d.shape[0]:
            d64 = d.to(sd)
            out["d_inv"] = inverse_psd(s * outer_gram(d64.T), rho)
        else:
            out["d_chol"] = _dual_cholesky(d, s, rho, sd)
        bound.cache[key] = out
        return out

    def _fast_update(self, bound: BoundFisher, i: int, blk: _KronBlock, r: Tensor) -> Tensor:
        """(B* + ρ)^{-1} G (A* + ρ)^{-1} = B_side R A_side / N with B_side = (B* + ρ)^{-1} Δ^T (M × N·C),
        A_side = a (A* + ρ)^{-1} (N × p) and R the residual as an (N·C × N) matrix, multiplied in the
        cheapest order: input side first, output side first, or (both sides dual) the N·C × N middle
        X = Z R K_A^{-1} first. Everything after the factorizations runs in the network's precision
        (the factors cast to it), so a float32 network's update costs float32 flops."""
        sides = self._sides(bound, i, blk)
        a, d = sides["a"], sides["d"]
        (n, p), (nc, m) = a.shape, d.shape
        c, dtype = bound.c, a.dtype
        rr = r.to(dtype) / n  # the 1/N of the update folded into the residual
        a_cost = 2 * n * p * p if "a_inv" in sides else 2 * n * n * p
        d_cost = 2 * nc * m * m if "d_inv" in sides else 2 * nc * nc * m
        costs = {  # flops of each order
            "input_first": a_cost + (2 * m * m * p if "d_inv" in sides else 2 * nc * nc * p) + 2 * m * nc * p,
            "output_first": d_cost + (2 * p * p * m if "a_inv" in sides else 2 * n * n * m) + 2 * m * n * p,
        }
        if "a_chol" in sides and "d_chol" in sides:
            costs["middle"] = (2 * nc**3) // 3 + 2 * n * n * nc + 2 * nc * n * min(m, p) + 2 * m * n * p
        route = _FORCE_ROUTE if _FORCE_ROUTE in costs else min(costs, key=costs.get)
        if route == "input_first":
            a_side = a @ sides["a_inv"].to(dtype) if "a_inv" in sides else _chol_apply(sides["a_chol"], a)
            u = (rr[:, :, None] * a_side[:, None, :]).reshape(nc, p)  # R A_side
            if "d_inv" in sides:
                return padded_mm(sides["d_inv"].to(dtype), padded_mm(d.T, u))
            return padded_mm(d.T, _chol_apply(sides["d_chol"], u))
        if route == "output_first":
            b_side = d @ sides["d_inv"].to(dtype) if "d_inv" in sides else _chol_apply(sides["d_chol"], d)  # (NC, M)
            v = torch.einsum("nkm,nk->nm", b_side.reshape(n, c, m), rr)  # (R^T B_side^T), (N, M)
            if "a_inv" in sides:
                return padded_mm(padded_mm(v.T, a), sides["a_inv"].to(dtype))
            return padded_mm(_chol_apply(sides["a_chol"], v).T, a)
        z = torch.cholesky_inverse(sides["d_chol"]).to(dtype)  # (NC, NC)
        zr = torch.einsum("xnk,nk->xn", z.reshape(nc, n, c), rr)  # Z R, (NC, N)
        x = _chol_apply(sides["a_chol"], zr.T).T  # Z R K_A^{-1}, (NC, N)
        if m <= p:
            return padded_mm(d.T @ x, a)
        return padded_mm(d.T, x @ a)

    # ------------------------------------------------------------------ interface
    def _layer_updates(self, bound: BoundFisher, r: Tensor) -> list[list[Tensor]]:
        sig = bound.signals
        self._check_isotropy(sig)
        done: dict[int, list[Tensor]] = {}
        mats: dict[int, list[Tensor]] = {}
        n = bound.n
        for i, blk in enumerate(self._blocks(sig)):
            layer = sig.layers[blk.layer]
            if self._fast(bound, layer) and None not in self._sides(bound, i, blk).values():
                mats.setdefault(blk.layer, []).append(self._fast_update(bound, i, blk, r))
                continue
            fac = self._factors(bound, i, blk)
            if fac[0] == "exact":
                done[blk.layer] = layer.transpose((fac[1] @ r.reshape(-1)).reshape(r.shape) / n)
            elif fac[0] == "primal":
                kr = layer.kron
                w = torch.einsum("nk,kntm->ntm", r, kr.d.to(self.solve_dtype))
                grad = w.reshape(-1, kr.out_width).T @ kr.a2.to(self.solve_dtype) / n
                done[blk.layer] = kr.to_params(fac[1] @ grad @ fac[2])
            else:
                _, _, ra, dz = fac
                dtype = ra.dtype  # the O(M p N) products in the block's work precision
                zr = torch.einsum("mnk,nk->mn", dz.reshape(-1, n, bound.c).to(dtype), r.to(dtype) / n)  # (M, N)
                mats.setdefault(blk.layer, []).append(padded_mm(zr, ra.to(dtype)))
        for l, m in mats.items():
            done[l] = sig.layers[l].kron.to_params(torch.cat(m, dim=1) if len(m) > 1 else m[0])
        return [done[l] for l in range(sig.depth)]

    def _coefficient(self, bound: BoundFisher, test: Signals) -> Tensor:
        sig = bound.signals
        self._check_isotropy(sig)
        n, c, sd = bound.n, bound.c, self.solve_dtype
        total = 0.0
        for i, blk in enumerate(self._blocks(sig)):
            layer, tl = sig.layers[blk.layer], test.layers[blk.layer]
            fac = self._factors(bound, i, blk)
            if fac[0] == "exact":
                cross = layer.gram(dtype=sd) if tl is layer else tl.gram(layer, sd)
                total = total + cross / n @ fac[1]
                continue
            if fac[0] == "primal":
                g = layer.kron.units(sd).jac.transpose(0, 1)  # (NC, M, p)
                gt = g if tl is layer else tl.kron.units(sd).jac.transpose(0, 1)
                h = fac[1] @ g @ fac[2]
                total = total + gt.flatten(1) @ h.flatten(1).T / n
                continue
            _, _, ra, dz = fac
            at = tl.kron.a[:, 0, blk.cols].to(sd)
            a_part = at @ ra.to(sd).T  # a′ (A* + ρ)^{-1} a^T, (N′, N)
            dt = tl.kron.flat_delta(sd)
            b_part = dt @ dz.to(sd)  # Δ′ (B* + ρ)^{-1} Δ^T, (N′C, NC)
            expand = a_part.repeat_interleave(c, 0).repeat_interleave(c, 1)
            total = total + b_part * expand / n
        return total


def _dual_cholesky(x: Tensor, scale: float, damping: float, solve_dtype: torch.dtype) -> Tensor | None:
    """Cholesky factor of scale · x x^T + ρ I (N × N; None at ρ = 0 unless far from singular).

    The factor is only ever applied to the signals in their own precision (:func:`_chol_apply`), so
    for a network in a lower precision than ``solve_dtype`` (float32) with ρ > 0 it is computed in
    that precision: a float32 factorization has the same first-order backward error as the float64
    factor rounded to float32, at half the time. If it breaks down (a kernel too ill-conditioned for
    float32, or a Gram entry overflowing it), the Gram and its factor are computed in ``solve_dtype``
    instead."""
    gram = outer_gram(x, mirror=damping == 0)  # Cholesky reads the lower triangle only
    if damping > 0 and x.dtype.itemsize < solve_dtype.itemsize:
        low = gram * scale
        low.diagonal().add_(damping)
        chol, info = torch.linalg.cholesky_ex(low)
        # a non-finite entry below the diagonal makes a later pivot -inf or NaN (info > 0), so with
        # info = 0 a finite diagonal means a finite factor: an N-element check, not N²
        if int(info) == 0 and bool(torch.isfinite(chol.diagonal()).all()):
            return chol
        # too ill-conditioned, or overflowed, in the network's precision: the Gram again in solve_dtype
        gram = outer_gram(x.to(solve_dtype), mirror=False)
    return damped_cholesky(gram.to(solve_dtype).mul_(scale), damping)


def _chol_apply(chol: Tensor, x: Tensor) -> Tensor:
    """(L L^T)^{-1} x in the higher of the two precisions (the result in x's): a factor computed in a
    higher precision than the signals (the float64 fallback of :func:`_dual_cholesky`) is applied in it."""
    if chol.dtype.itemsize > x.dtype.itemsize:
        return torch.cholesky_solve(x.to(chol.dtype), chol).to(x.dtype)
    return torch.cholesky_solve(x, chol.to(x.dtype))


def warn_narrow_input(where: str, p: int, n: int, *, first: bool, augmented: bool, single: bool = False) -> None:
    """The one warning for a K-FAC input factor narrower than N (Θ̄ not isotropic, (S.109)), with
    the fix that applies: Forster inputs, bias blocks when a bias column is appended, a wider layer."""
    if single:
        hint = "a single layer has Θ̄ = c_L X(X^TX)^{-1}X^T, a projection, for any inputs; use N <= M_0"
    elif not first:
        hint = "widen the layer to at least N units"
    elif augmented:
        hint = (
            "use KFAC(bias='block') and nat.data.forster(x): the appended bias column keeps the "
            "augmented inputs out of radial isotropic position"
        )
    else:
        hint = "put the inputs in radial isotropic position with nat.data.forster(x) (then α = N (L−1) + M_0, (S.111))"
    warn(
        f"{where} has an input factor of width {p} < N = {n}, so K-FAC's Θ̄ is not isotropic "
        f"(the paper's (S.109)) and η = 1/α is not one-step optimal; {hint}",
        RuntimeWarning,
    )
