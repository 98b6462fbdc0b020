"""K-FAC in dual form (docs/conventions.md; the paper's Appendix B.3, (S.95)–(S.111), (S.123)–(S.124)).

Per layer the Fisher block is a Kronecker product of an output factor B*_l (M_l × M_l) and an
input factor A*_{l−1} (p × p, p = M_{l−1} [+ 1 for the bias column]):

    A*_{l−1} = a^T a / N   (= σ_w² h^T h / (N M_{l−1}) with the bias column σ_b appended)   (S.95)
    B*_l     = Δ_l^T Λ Δ_l / N  (summed over outputs),   B*_L = mean_n Λ_n / N  (the paper's convention)

B*_l is formed from the rows Λ^{1/2} Δ_l (:mod:`.rows`), so an output metric changes nothing below.

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
Each block's route is a :class:`KronRoute`; its factors are typed objects (:class:`FactorSide`,
:class:`KronFactors`) computed once per batch and shared by the update, Θ̄ and α̂.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from ..curvature import LayerCurvature
from ..layers.affine import AffineSignals
from ..layers.base import LayerSignals, outer_gram, padded_mm
from ..linalg.psd import PSDInverse
from ..validation import warn
from .base import Fisher
from .bound import BoundFisher

__all__ = ["KFAC", "KFACBatch", "KronRoute", "KronBlock", "FactorSide", "KronFactors", "warn_narrow_input"]

_ORDERS = ("auto", "input_first", "output_first", "middle")


class KronRoute(Enum):
    """How a layer's block of K-FAC is represented."""

    #: no Kronecker structure (the generic kind): the exact block Ĵ_l^T Ĵ_l / N + ρ I, in dual form
    EXACT = "exact"
    #: weight sharing over positions (KFC): both factors inverted as they are (primal)
    POSITIONS = "positions"
    #: one position (MLP-like layers): each factor primal or dual (N × N), whichever is smaller
    RANK_ONE = "rank_one"


@dataclass(frozen=True)
class KronBlock:
    """One block of K-FAC: rows of layer ``layer``, columns ``cols`` of [W_l | b_l], with
    A* = a_scale · a^T a / N and B* = b_scale · Δ^T Δ / N, represented by ``route``."""

    layer: int
    cols: slice
    a_scale: float
    b_scale: float
    route: KronRoute


@dataclass(frozen=True)
class FactorSide:
    """One damped Kronecker factor F + ρ I, F = ``scale`` · X^T X for the signal rows X (K, w), in the
    cheaper form: ``primal`` (F + ρ I)^{-1} (w × w) when w < K, else ``dual``, the factorization of
    scale · X X^T + ρ I (K × K; its pseudo-inverse at ρ = 0). Both give the same X (F + ρ I)^{-1}
    (the push-through identity)."""

    x: Tensor
    scale: float
    primal: Tensor | None = None
    dual: PSDInverse | None = None

    def signals_times_inverse(self) -> Tensor:
        """X (F + ρ I)^{-1} = (scale · X X^T + ρ I)^{-1} X, (K, w), in X's precision."""
        if self.primal is not None:
            return self.x @ self.primal.to(self.x.dtype)
        return self.dual.solve(self.x).to(self.x.dtype)

    def apply_dual(self, y: Tensor) -> Tensor:
        """(scale · X X^T + ρ I)^{-1} y for y (K, …), in y's precision (dual sides only)."""
        return self.dual.solve(y).to(y.dtype)

    def right(self, g: Tensor, damping: float) -> Tensor:
        """g (F + ρ I)^{-1} for any g (…, w): primal, or by Woodbury's identity
        (g − scale · (g X^T) X (F + ρ I)^{-1}) / ρ (dual; ρ > 0)."""
        if self.primal is not None:
            return g @ self.primal.to(g.dtype)
        x = self.x.to(g.dtype)
        return (g - self.scale * (g @ x.T) @ self.signals_times_inverse().to(g.dtype)) / damping


@dataclass(frozen=True)
class KronFactors:
    """The two sides of a block: ``a`` the input factor A* (rows a, (N, p) or (N·T, p)), ``b`` the
    output factor B* (rows Δ, (N·R, M) or (R·N·T, M))."""

    a: FactorSide
    b: FactorSide


class KFACBatch(BoundFisher):
    """K-FAC bound to a batch: its :attr:`blocks` and their :attr:`factors`, computed once."""

    parameter_space = True

    @cached_property
    def blocks(self) -> list[KronBlock]:
        fisher, n, last = self.fisher, self.n, self.signals.output_layer
        out = []
        for l, layer in enumerate(self.row_signals):
            kr = layer.kronecker
            if kr is None or not kr.rank_one:
                route = KronRoute.EXACT if kr is None else KronRoute.POSITIONS
                out.append(KronBlock(l, slice(None), 1.0, 1.0, route))
                continue
            b_scale = 1.0 / n if (l == last and fisher.output_factor == "paper") else 1.0
            p = kr.in_width
            if kr.has_bias and kr.has_weight and fisher.bias == "block" and l != last:
                out.append(KronBlock(l, slice(0, p - 1), 1.0, b_scale, KronRoute.RANK_ONE))
                out.append(KronBlock(l, slice(p - 1, p), 1.0 / n, b_scale, KronRoute.RANK_ONE))
            else:
                out.append(KronBlock(l, slice(0, p), 1.0, b_scale, KronRoute.RANK_ONE))
        return out

    @cached_property
    def factors(self) -> list[KronFactors | PSDInverse]:
        """Per block: the :class:`KronFactors`, or for an EXACT block (Θ_l + ρ I)^{-1} (N·R × N·R)."""
        self.fisher.check_isotropy(self.signals)
        out = []
        for blk in self.blocks:
            layer = self.row_signals[blk.layer]
            if blk.route is KronRoute.EXACT:
                theta = layer.gram(dtype=self.solve_dtype) / self.n
                out.append(PSDInverse.of(theta, self.fisher.damping, overwrite=True, routes=self.routes))
            elif blk.route is KronRoute.POSITIONS:
                out.append(self._position_factors(layer.kronecker))
            else:
                out.append(self._rank_one_factors(blk))
        return out

    # ------------------------------------------------------------------ factors
    def work_dtype(self, blk: KronBlock) -> torch.dtype:
        """The precision of a RANK_ONE block's N × N factors, their solves and the update's products.

        A network in a lower precision than ``solve_dtype`` (float32) keeps its own only where that
        is provably accurate: ρ > 0 and both factors' condition numbers, bounded by
        (tr K + ρ) / ρ with the traces read off the signals, below 10⁻³ / eps of the network's
        precision (about 1.7·10⁴ in float32), so that a float32 factorization loses at most about
        10⁻³ relative. Otherwise (small or zero damping) the signals are cast to ``solve_dtype``
        once and everything about the block is computed there."""
        kr = self.row_signals[blk.layer].kronecker
        net, sd, rho = kr.dtype, self.solve_dtype, self.fisher.damping
        if net.itemsize >= sd.itemsize:
            return net
        if rho == 0:
            return sd
        traces = (
            blk.a_scale / self.n * float(kr.a[:, 0, blk.cols].double().square().sum()),
            blk.b_scale / self.n * float(kr.d.double().square().sum()),
        )
        return net if (max(traces) / rho + 1.0) * torch.finfo(net).eps <= 1e-3 else sd

    def factor_side(self, x: Tensor, scale: float) -> FactorSide:
        """The damped factor scale · x^T x + ρ I of rows x (K, w) in its cheaper form. A dual N × N
        factor of a float32 block is factored in float32 (the work precision was chosen for it) with
        a float64 fallback for a breakdown or an overflowed Gram entry."""
        rho, sd = self.fisher.damping, self.solve_dtype
        k, w = x.shape
        if w < k:  # the w × w Gram in the block's work precision, factored in the solve dtype
            gram = outer_gram(x.T).to(sd).mul_(scale)
            primal = PSDInverse.of(gram, rho, overwrite=True, routes=self.routes).matrix()
            return FactorSide(x, scale, primal=primal)
        gram = outer_gram(x, mirror=rho == 0)  # a factorization at ρ > 0 reads the lower triangle only
        if rho > 0 and x.dtype.itemsize < sd.itemsize:
            low = gram.mul_(scale)
            low.diagonal().add_(rho)
            chol, info = torch.linalg.cholesky_ex(low)
            # a non-finite entry below the diagonal makes a later pivot -inf or NaN (info > 0), so with
            # info = 0 a finite diagonal means a finite factor: an N-element check, not N²
            if int(info) == 0 and bool(torch.isfinite(chol.diagonal()).all()):
                self.routes["cholesky"] += 1
                return FactorSide(x, scale, dual=PSDInverse(chol=chol))
            gram = outer_gram(x.to(sd), mirror=False)
        dual = PSDInverse.of(gram.to(sd).mul_(scale), rho, overwrite=True, routes=self.routes)
        return FactorSide(x, scale, dual=dual)

    def _rank_one_factors(self, blk: KronBlock) -> KronFactors:
        kr = self.row_signals[blk.layer].kronecker
        work = self.work_dtype(blk)
        a, d = kr.a[:, 0, blk.cols].to(work), kr.flat_delta(work)
        return KronFactors(a=self.factor_side(a, blk.a_scale / self.n), b=self.factor_side(d, blk.b_scale / self.n))

    def _position_factors(self, kr: AffineSignals) -> KronFactors:
        """KFC: A* = Σ_{n,t} a a^T / (N T) (p × p) and B* = Σ_{k,n,t} δ δ^T / N (M × M), primal."""
        sd, n, rho = self.solve_dtype, self.n, self.fisher.damping
        a2 = kr.a2
        d2 = kr.d.reshape(-1, kr.out_width)
        a_star = (a2.T @ a2).to(sd).div_(n * kr.positions)  # the Grams in the network's precision
        b_star = (d2.T @ d2).to(sd).div_(n)
        a_inv = PSDInverse.of(a_star, rho, overwrite=True, routes=self.routes).matrix()
        b_inv = PSDInverse.of(b_star, rho, overwrite=True, routes=self.routes).matrix()
        a_side = FactorSide(a2, 1.0 / (n * kr.positions), primal=a_inv)
        return KronFactors(a=a_side, b=FactorSide(d2, 1.0 / n, primal=b_inv))

    # ------------------------------------------------------------------ update
    def _updates(self, r: Tensor) -> list[list[Tensor]]:
        done: dict[int, list[Tensor]] = {}
        mats: dict[int, list[Tensor]] = {}
        for blk, fac in zip(self.blocks, self.factors):
            layer = self.row_signals[blk.layer]
            if blk.route is KronRoute.EXACT:
                v = fac.solve(r.reshape(-1, 1))[:, 0].reshape(r.shape) / self.n
                done[blk.layer] = layer.transpose(v)
            elif blk.route is KronRoute.POSITIONS:
                kr = layer.kronecker  # the gradient in the network's precision, as autograd's
                w = torch.einsum("nk,kntm->ntm", r.to(kr.dtype), kr.d)
                grad = (w.reshape(-1, kr.out_width).T @ kr.a2).to(self.solve_dtype).div_(self.n)
                done[blk.layer] = kr.to_params(fac.b.primal @ grad @ fac.a.primal)
            else:
                mats.setdefault(blk.layer, []).append(self._rank_one_update(fac, r))
        for l, m in mats.items():
            done[l] = self.row_signals[l].kronecker.to_params(torch.cat(m, dim=1) if len(m) > 1 else m[0])
        return [done[l] for l in range(self.depth)]

    def _rank_one_update(self, fac: KronFactors, r: Tensor) -> Tensor:
        """(B* + ρ)^{-1} G (A* + ρ)^{-1} = B_side R A_side / N with B_side = (B* + ρ)^{-1} Δ^T (M × N·R),
        A_side = a (A* + ρ)^{-1} (N × p) and R the residual as an (N·R × N) matrix, multiplied in the
        cheapest order (``KFAC.product_order``): input side first, output side first, or (both sides
        dual) the N·R × N middle X = Z R K_A^{-1} first. Everything after the factorizations runs in
        the block's work precision, so a float32 block's update costs float32 flops."""
        a, d = fac.a.x, fac.b.x
        (n, p), (nr, m) = a.shape, d.shape
        c, dtype = nr // n, a.dtype
        rr = r.to(dtype) / n  # the 1/N of the update folded into the residual
        a_primal, d_primal = fac.a.primal is not None, fac.b.primal is not None
        a_cost = 2 * n * p * p if a_primal else 2 * n * n * p
        d_cost = 2 * nr * m * m if d_primal else 2 * nr * nr * m
        costs = {  # flops of each order
            "input_first": a_cost + (2 * m * m * p if d_primal else 2 * nr * nr * p) + 2 * m * nr * p,
            "output_first": d_cost + (2 * p * p * m if a_primal else 2 * n * n * m) + 2 * m * n * p,
        }
        if not (a_primal or d_primal):
            costs["middle"] = (2 * nr**3) // 3 + 2 * n * n * nr + 2 * nr * n * min(m, p) + 2 * m * n * p
        order = self.fisher.product_order
        route = order if order in costs else min(costs, key=costs.get)
        if route == "input_first":
            u = (rr[:, :, None] * fac.a.signals_times_inverse()[:, None, :]).reshape(nr, p)  # R A_side
            if d_primal:
                return padded_mm(fac.b.primal.to(dtype), padded_mm(d.T, u))
            return padded_mm(d.T, fac.b.apply_dual(u))
        if route == "output_first":
            b_side = fac.b.signals_times_inverse()  # (N·R, M)
            v = torch.einsum("nkm,nk->nm", b_side.reshape(n, c, m), rr)  # (R^T B_side^T), (N, M)
            if a_primal:
                return padded_mm(padded_mm(v.T, a), fac.a.primal.to(dtype))
            return padded_mm(fac.a.apply_dual(v).T, a)
        z = fac.b.dual.matrix().to(dtype)  # (N·R, N·R)
        zr = torch.einsum("xnk,nk->xn", z.reshape(nr, n, c), rr)  # Z R, (N·R, N)
        x = fac.a.apply_dual(zr.T).T  # Z R K_A^{-1}, (N·R, N)
        if m <= p:
            return padded_mm(d.T @ x, a)
        return padded_mm(d.T, x @ a)

    def _precondition(self, grads: list[list[Tensor]]) -> list[list[Tensor]]:
        """(B* + ρ)^{-1} G (A* + ρ)^{-1} per block for any gradient G (Woodbury's identity on dual
        sides); an EXACT block (Θ_l + ρ)^{-1} through (g − Ĵ_l^T (Θ_l + ρ)^{-1} Ĵ_l g / N) / ρ."""
        rho, n = self.fisher.damping, self.n
        done: dict[int, list[Tensor]] = {}
        mats: dict[int, list[Tensor]] = {}
        for blk, fac in zip(self.blocks, self.factors):
            layer, g = self.row_signals[blk.layer], grads[blk.layer]
            if blk.route is KronRoute.EXACT:
                z = layer.jvp(g).to(self.solve_dtype) / n
                back = layer.transpose(fac.solve(z.reshape(-1, 1)).reshape(z.shape))
                done[blk.layer] = [(gi - bi.to(gi.dtype)) / rho for gi, bi in zip(g, back)]
                continue
            kr = layer.kronecker
            mat = kr.from_params(g).to(self.solve_dtype if blk.route is KronRoute.POSITIONS else fac.a.x.dtype)
            if blk.route is KronRoute.POSITIONS:
                done[blk.layer] = kr.to_params(fac.b.primal @ mat @ fac.a.primal)
            else:
                part = fac.a.right(mat[:, blk.cols], rho)
                mats.setdefault(blk.layer, []).append(fac.b.right(part.T, rho).T)
        for l, m in mats.items():
            done[l] = self.row_signals[l].kronecker.to_params(torch.cat(m, dim=1) if len(m) > 1 else m[0])
        return [done[l] for l in range(self.depth)]

    def curvature_blocks(self) -> list[LayerCurvature]:
        """This batch's Kronecker factors in parameter space, per layer (for curvature kept across
        mini-batches): A = a^T a / N (Σ over positions / (N T) for KFC) and B = b_scale Δ^T Δ / N; a
        module without Kronecker structure its exact block J_l^T J_l / N."""
        if self.fisher.bias == "block":
            raise ValueError(
                "bias: curvature kept across mini-batches holds one Kronecker block per layer: use bias='augment'"
            )
        n, out = self.n, []
        for blk in self.blocks:
            layer = self.row_signals[blk.layer]
            if blk.route is KronRoute.EXACT:
                j = layer.jacobian()
                out.append(LayerCurvature("blocks", ((j.T @ j / n)[None],)))
                continue
            kr = layer.kronecker
            if blk.route is KronRoute.POSITIONS:
                a, d, a_scale = kr.a2, kr.d.reshape(-1, kr.out_width), 1.0 / (n * kr.positions)
            else:
                a, d, a_scale = kr.a[:, 0], kr.flat_delta(), blk.a_scale / n
            out.append(LayerCurvature("kronecker", (a.T @ a * a_scale, d.T @ d * (blk.b_scale / n))))
        return out

    # ------------------------------------------------------------------ Θ̄
    def _coefficient(self, test: tuple[LayerSignals, ...]) -> Tensor:
        n, sd = self.n, self.solve_dtype
        total = 0.0
        for blk, fac in zip(self.blocks, self.factors):
            layer, tl = self.row_signals[blk.layer], test[blk.layer]
            if blk.route is KronRoute.EXACT:
                cross = layer.gram(dtype=sd) if tl is layer else tl.gram(layer, sd)
                total = total + cross / n @ fac.matrix()
            elif blk.route is KronRoute.POSITIONS:
                g = layer.units(sd).jac.transpose(0, 1)  # (N·R, M, p)
                gt = g if tl is layer else tl.units(sd).jac.transpose(0, 1)
                h = fac.b.primal @ g @ fac.a.primal
                total = total + gt.flatten(1) @ h.flatten(1).T / n
            else:
                kt = tl.kronecker
                a_part = kt.a[:, 0, blk.cols].to(sd) @ fac.a.signals_times_inverse().to(sd).T  # a′ (A* + ρ)^{-1} a^T
                b_part = kt.flat_delta(sd) @ fac.b.signals_times_inverse().to(sd).T  # Δ′ (B* + ρ)^{-1} Δ^T
                expand = a_part.repeat_interleave(kt.c, 0).repeat_interleave(layer.c, 1)
                total = total + b_part * expand / n
        return total


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
        product_order: the order of a one-position layer's update products, ``"auto"`` (fewest
            flops), ``"input_first"``, ``"output_first"`` or ``"middle"`` (both factors dual); all
            give the same update up to rounding.
        damping_split: with curvature kept across mini-batches (``nat.NGD(..., ema=…)``),
            ``"paper"`` damps each factor by ρ; ``"pi"`` by π √ρ and √ρ / π with
            π² = (tr A / p) / (tr B / M) (Martens and Grosse 2015), a different damping scale.

    A float32 network's N × N factors are factored and applied in float32 where the damping keeps
    them provably well conditioned (:meth:`KFACBatch.work_dtype`), in ``solve_dtype`` elsewhere.
    """

    bias: str = "augment"
    output_factor: str = "paper"
    warn: bool = True
    product_order: str = "auto"
    damping_split: str = "paper"

    name: ClassVar[str] = "kfac"
    label: ClassVar[str] = "K-FAC"
    aliases: ClassVar[tuple[str, ...]] = ("kfac", "k_fac")
    batch_type: ClassVar[type] = KFACBatch

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bias not in ("augment", "block"):
            raise ValueError(f"bias: expected 'augment' or 'block', got {self.bias!r}")
        if self.output_factor not in ("paper", "fisher"):
            raise ValueError(f"output_factor: expected 'paper' or 'fisher', got {self.output_factor!r}")
        if self.product_order not in _ORDERS:
            raise ValueError(f"product_order: expected one of {_ORDERS}, got {self.product_order!r}")
        if self.damping_split not in ("paper", "pi"):
            raise ValueError(f"damping_split: expected 'paper' or 'pi', got {self.damping_split!r}")

    def check_isotropy(self, sig) -> None:
        """Warn (:func:`warn_narrow_input`) for each layer whose input factor is narrower than N at
        ρ = 0 (Θ̄ not isotropic, (S.109)), unless the inputs are in radial isotropic position."""
        if not self.warn or self.damping > 0:
            return
        n = sig.n
        for l, layer in enumerate(sig.layers):
            kr = layer.kronecker
            if kr is None or not kr.rank_one:
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
