"""K-FAC in dual form (MATH.md §4; seed Appendix B.3, (S.95)–(S.111), (S.123)–(S.124)).

Per layer the Fisher block is a Kronecker product of an output factor B*_l (M_l × M_l) and an
input factor A*_{l−1} (p × p, p = M_{l−1} [+ 1 for the bias column]):

    A*_{l−1} = a^T a / N   (= σ_w² h^T h / (N M_{l−1}) with the bias column σ_b appended)   (S.95)
    B*_l     = Δ_l^T Λ Δ_l / N  (summed over outputs),   B*_L = mean_n Λ_n / N  (seed convention)

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
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..network import Factors
from .base import Fisher, block_diag_metric, solve_psd, solve_with_metric

__all__ = ["KFAC"]


@dataclass(frozen=True)
class _KronBlock:
    """One Kronecker-factored block: rows of layer ``layer``, columns ``cols`` of [W_l | b_l]."""

    layer: int
    cols: slice
    a_scale: float  # A* = a_scale · a^T a / N
    b_scale: float  # B* = b_scale · Δ^T Λ Δ / N


@dataclass(frozen=True, kw_only=True)
class KFAC(Fisher):
    """Block-diagonal K-FAC (seed (S.95)) with factored damping (B* + ρI) ⊗ (A* + ρI).

    Args:
        bias: ``"augment"`` (default; σ_b appended to the forward signal, B.3.3) or ``"block"``
            (a separate bias block, (S.123)).
        output_factor: ``"seed"`` (default; B*_L = mean Λ / N, i.e. I_C / N for MSE, giving
            α = N L) or ``"fisher"`` (B*_L = mean Λ, the plain K-FAC factor: α = N (L − 1) + 1).
        warn: warn when a layer's input factor is narrower than N and the inputs are not in
            radial isotropic position, where the isotropic condition fails (S.109).
    """

    bias: str = "augment"
    output_factor: str = "seed"
    warn: bool = True

    name: ClassVar[str] = "kfac"
    label: ClassVar[str] = "K-FAC"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bias not in ("augment", "block"):
            raise ValueError(f"bias: expected 'augment' or 'block', got {self.bias!r}")
        if self.output_factor not in ("seed", "fisher"):
            raise ValueError(f"output_factor: expected 'seed' or 'fisher', got {self.output_factor!r}")

    # ------------------------------------------------------------------ structure
    def _blocks(self, fx: Factors) -> list[_KronBlock]:
        out = []
        for l, (a, has_bias) in enumerate(zip(fx.forward, fx.has_bias)):
            b_scale = 1.0 / fx.n if (l == fx.depth - 1 and self.output_factor == "seed") else 1.0
            p = a.shape[1]
            if has_bias and self.bias == "block" and l < fx.depth - 1:
                out.append(_KronBlock(l, slice(0, p - 1), 1.0, b_scale))
                out.append(_KronBlock(l, slice(p - 1, p), 1.0 / fx.n, b_scale))
            else:
                out.append(_KronBlock(l, slice(0, p), 1.0, b_scale))
        return out

    def _check_isotropy(self, fx: Factors) -> None:
        if not self.warn or self.damping > 0:
            return
        n = fx.n
        for l, a in enumerate(fx.forward):
            p = a.shape[1] - (fx.has_bias[l] and self.bias == "block")
            if p >= n:
                continue
            if l == 0:
                x = a[:, :p].to(torch.float64)
                x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
                gram = x.T @ x * (p / n)
                if float(torch.linalg.matrix_norm(gram - torch.eye(p, dtype=gram.dtype), 2)) < 1e-6:
                    continue
                hint = (
                    "put the inputs in radial isotropic position with nat.data.forster(x)"
                    if not (fx.has_bias[0] and self.bias == "augment")
                    else "use KFAC(bias='block') and nat.data.forster(x): the appended bias column "
                    "keeps the augmented inputs out of radial isotropic position"
                )
            else:
                hint = "widen the layer to at least N units"
            warnings.warn(
                f"K-FAC: layer {l + 1} has an input factor of width {p} < N = {n}, so Θ̄ is not "
                f"isotropic (seed (S.109)) and η = 1/α is not one-step optimal; {hint}",
                RuntimeWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------ factor inverses
    def _input_side(self, blk: _KronBlock, fx: Factors) -> tuple[Tensor, Tensor]:
        """(a, R_A) with R_A = a (A* + ρI)^{-1}, both (N, p), in solve dtype."""
        a = fx.forward[blk.layer][:, blk.cols].to(self.solve_dtype)
        n, p = a.shape
        t = blk.a_scale / n
        if p < n:  # primal p × p (S.108)
            r = solve_psd(t * (a.T @ a), a.T, self.damping).T
        else:  # dual N × N
            r = solve_psd(t * (a @ a.T), a, self.damping)
        return a, r

    def _output_dual(self, blk: _KronBlock, fx: Factors, lam: Tensor | None) -> Tensor | None:
        """Z = (b_scale Λ β / N + ρ)^{-1} (N·C × N·C) with β = Δ Δ^T, or None to go primal."""
        d = _flat_delta(fx, blk.layer, self.solve_dtype)
        nf, m = d.shape
        if m < nf:
            return None
        beta = d @ d.T * (blk.b_scale / fx.n)
        return solve_with_metric(beta, lam, self.damping)

    def _output_primal(self, blk: _KronBlock, fx: Factors, lam: Tensor | None) -> Tensor:
        """B* = b_scale Δ^T Λ Δ / N, (M_l, M_l)."""
        d = _flat_delta(fx, blk.layer, self.solve_dtype)
        ld = d if lam is None else block_diag_metric(lam) @ d
        return d.T @ ld * (blk.b_scale / fx.n)

    # ------------------------------------------------------------------ interface
    def _layer_updates(self, fx: Factors, r: Tensor, lam: Tensor | None) -> list[Tensor]:
        self._check_isotropy(fx)
        parts: dict[int, list[Tensor]] = {}
        n, c = fx.n, fx.c
        for blk in self._blocks(fx):
            _, ra = self._input_side(blk, fx)
            d = _flat_delta(fx, blk.layer, self.solve_dtype)  # (NC, M)
            z = self._output_dual(blk, fx, lam)
            if z is not None:
                # Zr[(m, j), n] = Σ_k Z[(m, j), (n, k)] r[n, k];  update = Δ^T Zr R_A / N
                zr = torch.einsum("ank,nk->an", z.reshape(n * c, n, c), r)
                dtype = fx.f.dtype  # the O(M p N) product in the model's precision
                upd = (d.T @ zr).to(dtype) @ ra.to(dtype) / n
            else:
                g = torch.einsum("am,an,np->mp", d, _expand(r), ra)  # Σ_{n,k} r δ R_A^T
                upd = solve_psd(self._output_primal(blk, fx, lam), g, self.damping) / n
            parts.setdefault(blk.layer, []).append(upd)
        return [parts[l][0] if len(parts[l]) == 1 else torch.cat(parts[l], dim=1) for l in range(fx.depth)]

    def _coefficient(self, fx: Factors, ft: Factors, lam: Tensor | None) -> Tensor:
        self._check_isotropy(fx)
        n, c = fx.n, fx.c
        total = 0.0
        for blk in self._blocks(fx):
            _, ra = self._input_side(blk, fx)
            at = ft.forward[blk.layer][:, blk.cols].to(self.solve_dtype)
            a_part = at @ ra.T  # a′ (A* + ρ)^{-1} a^T, (N′, N)
            d = _flat_delta(fx, blk.layer, self.solve_dtype)
            dt = _flat_delta(ft, blk.layer, self.solve_dtype)
            z = self._output_dual(blk, fx, lam)
            if z is not None:
                b_part = (dt @ d.T) @ z  # Δ′ (B* + ρ)^{-1} Δ^T, (N′C, NC)
            else:
                b_part = dt @ solve_psd(self._output_primal(blk, fx, lam), d.T, self.damping)
            expand = a_part.repeat_interleave(c, 0).repeat_interleave(c, 1)
            total = total + b_part * expand / n
        return total


def _flat_delta(fx: Factors, layer: int, dtype: torch.dtype) -> Tensor:
    """Δ_l as an (N·C, M_l) matrix, rows sample-major (n, k)."""
    d = fx.backward[layer].to(dtype)
    return d.permute(1, 0, 2).reshape(fx.n * fx.c, d.shape[2])


def _expand(r: Tensor) -> Tensor:
    """(N, C) → (N·C, N) with entry [(n, k), n] = r[n, k] (zero elsewhere)."""
    n, c = r.shape
    out = torch.zeros(n, c, n, dtype=r.dtype, device=r.device)
    idx = torch.arange(n, device=r.device)
    out[idx, :, idx] = r
    return out.reshape(n * c, n)
