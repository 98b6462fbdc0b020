"""Unit-wise Fisher in dual form (MATH.md §4; seed Appendix C, (S.129)–(S.141)).

Unit i of layer l owns θ_{l,i} = row i of [W_l | b_l]; its Jacobian is J_{l,i} = E_i a with
E_i[(n, k), n] = δ_{l,i}^{(k)}(x_n), so its Fisher block J_{l,i}^T Λ J_{l,i} / N + ρI is inverted
through N × N systems, batched over the M_l units of a layer. Writing K = a a^T (N × N, shared by
all units of the layer), s_n² = δ_n^T Λ_n δ_n and b_n = δ_n · r_n (δ_n the C-vector of unit i at
sample n), the push-through identity gives

    Δθ_{l,i} = a^T w / N,   w = (S² K / N + ρ)^{-1} b = S (S K S / N + ρ)^{-1} (b / s)

(one symmetric positive-definite solve per unit). At ρ = 0 the limit is the pseudo-inverse
(S.135): on the support of s, w = N K_SS^{-1} (b / s²). For one output, S K S / N is the seed's
Θ_{l,i} = diag(δ_{l,i}) (σ_w² A_{l−1} + σ_b²) diag(δ_{l,i}) / N (S.131), and on the training set
Θ̄ = Σ_{l,i} Θ_{l,i} Θ_{l,i}^+ = Σ_{l,i} diag(1[δ_{l,i} ≠ 0]) (S.137): α = Σ_{l<L} γ_l M_l (+ C).
Never a (M_{l−1} + 1)² block per unit, never J.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..network import Factors
from .base import Fisher, pinv_psd

__all__ = ["Unitwise"]

_CHUNK_ELEMENTS = 2**23  # units per batched solve: chunk · N² ≤ this (64 MiB in float64)


@dataclass(frozen=True, kw_only=True)
class Unitwise(Fisher):
    """Unit-wise Fisher: block diagonal over the units (l, i) (seed (S.129))."""

    name: ClassVar[str] = "unitwise"
    label: ClassVar[str] = "Unit-wise"

    def _unit_scales(self, fx: Factors, layer: int, lam: Tensor | None) -> tuple[Tensor, Tensor]:
        """s (M, N) with s_n² = δ_n^T Λ_n δ_n, and δ itself as (M, N, C)."""
        d = fx.backward[layer].to(self.solve_dtype).permute(2, 1, 0)  # (M, N, C)
        if lam is None:
            s2 = (d * d).sum(-1)
        else:
            s2 = torch.einsum("mnk,nkj,mnj->mn", d, lam, d)
        s = s2.clamp_min(0).sqrt()
        return s, d

    def _unit_matrices(self, k: Tensor, s: Tensor) -> Tensor:
        """S K S / N + ρ I for a chunk of units, (m, N, N)."""
        mats = torch.mul(s[:, :, None], s[:, None, :]).mul_(k / k.shape[0])
        mats.diagonal(dim1=1, dim2=2).add_(self.damping)
        return mats

    def alpha_hat_from_factors(self, fx: Factors) -> float:
        """tr(Θ̄ Λ) / (N·C) without forming Θ̄: Σ_{l,i} tr(Θ_{l,i} (Θ_{l,i} + ρ)^{-1}) / (N·C), where each
        trace is N − ρ ||L_i^{-1}||_F² for the Cholesky factor L_i of S K S / N + ρ I, and at ρ = 0 the
        number of samples on which unit i is active (S.137)."""
        lam = self._metric(fx)
        n, total = fx.n, 0.0
        for l in range(fx.depth):
            s, _ = self._unit_scales(fx, l, lam)
            if self.damping == 0:
                total += float((s > 0).sum())
                continue
            a = fx.forward[l].to(self.solve_dtype)
            k = a @ a.T
            step = max(1, _CHUNK_ELEMENTS // (n * n))
            for lo in range(0, s.shape[0], step):
                chol = torch.linalg.cholesky(self._unit_matrices(k, s[lo : lo + step]))
                eye = torch.eye(n, dtype=k.dtype, device=k.device).expand_as(chol)
                inv = torch.linalg.solve_triangular(chol, eye, upper=False)
                total += float(n * chol.shape[0] - self.damping * (inv**2).sum())
        return total / (n * fx.c)

    def _solve_units(self, k: Tensor, s: Tensor, rhs: Tensor) -> Tensor:
        """For each unit i: S_i (S_i K S_i / N + ρ)^{-1} S_i^+ rhs_i, with rhs (M, N, R).

        At ρ = 0 this is the pseudo-inverse limit (S.135), restricted to the support of s_i.
        """
        n = k.shape[0]
        inv_s = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
        out = torch.empty_like(rhs)
        step = max(1, _CHUNK_ELEMENTS // (n * n))
        for lo in range(0, s.shape[0], step):
            sl = slice(lo, lo + step)
            si, ri = s[sl], rhs[sl] * inv_s[sl, :, None]
            if self.damping > 0:
                chol, info = torch.linalg.cholesky_ex(self._unit_matrices(k, si))
                z = torch.cholesky_solve(ri, chol)
                bad = info != 0
            else:
                # pseudo-inverse on the support: (S K S / N)^+ = S^+ (N K_SS^{-1}) S^+ when K_SS is PD
                m = (si > 0).to(k.dtype)
                mats = torch.mul(m[:, :, None], m[:, None, :]).mul_(k)
                mats.diagonal(dim1=1, dim2=2).add_(1.0 - m)
                chol, info = torch.linalg.cholesky_ex(mats)
                # w = N m K_m^{-1}(b / s²); z = w / s so that the common line below returns w
                z = torch.cholesky_solve(ri * inv_s[sl, :, None], chol) * (n * inv_s[sl, :, None])
                bad = info != 0
            if bool(bad.any()):  # singular K_SS (e.g. M_{l-1} < N at ρ = 0): eigh pseudo-inverse
                sb = si[bad]
                z[bad] = pinv_psd(sb[:, :, None] * k * sb[:, None, :] / n) @ ri[bad]
            out[sl] = z * si[:, :, None]
        return out

    def _layer_updates(self, fx: Factors, r: Tensor, lam: Tensor | None) -> list[Tensor]:
        out = []
        for l in range(fx.depth):
            a = fx.forward[l]
            k = a.to(self.solve_dtype) @ a.to(self.solve_dtype).T
            s, d = self._unit_scales(fx, l, lam)
            b = torch.einsum("mnk,nk->mn", d, r)  # δ_n · r_n
            w = self._solve_units(k, s, b[:, :, None])[:, :, 0]  # (M, N)
            out.append(w.to(a.dtype) @ a / fx.n)
        return out

    def _coefficient(self, fx: Factors, ft: Factors, lam: Tensor | None) -> Tensor:
        n, c, nt = fx.n, fx.c, ft.n
        total = torch.zeros(nt * c, n * c, dtype=self.solve_dtype, device=fx.f.device)
        for l in range(fx.depth):
            a = fx.forward[l].to(self.solve_dtype)
            k = a @ a.T
            k_cross = ft.forward[l].to(self.solve_dtype) @ a.T / n  # (N′, N)
            s, d = self._unit_scales(fx, l, lam)
            dt = ft.backward[l].to(self.solve_dtype).permute(2, 1, 0)  # (M, N′, C)
            step = max(1, _CHUNK_ELEMENTS // (n * max(n, nt)))
            eye = torch.eye(n, dtype=k.dtype, device=k.device).expand(min(step, s.shape[0]), n, n)
            for lo in range(0, s.shape[0], step):
                sl = slice(lo, lo + step)
                r_i = self._solve_units(k, s[sl], eye[: s[sl].shape[0]])  # (S²K/N + ρ)^{-1}, (m, N, N)
                t_i = k_cross @ r_i  # (m, N′, N)
                total += torch.einsum("ipk,ipn,inj->pknj", dt[sl], t_i, d[sl]).reshape(nt * c, n * c)
        return total
