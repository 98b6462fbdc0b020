"""Unit-wise Fisher in dual form (MATH.md §4; seed Appendix C, (S.129)–(S.141)).

Unit i of layer l owns θ_{l,i} = row i of [W_l | b_l]; its Jacobian is J_{l,i} = E_i a with
E_i[(n, k), n] = δ_{l,i}^{(k)}(x_n), so its Fisher block J_{l,i}^T Λ J_{l,i} / N + ρI is inverted
through N × N systems, batched over the M_l units of a layer. Writing K = a a^T (N × N, shared by
all units of the layer), s_n² = δ_n^T Λ_n δ_n and b_n = δ_n · r_n (δ_n the C-vector of unit i at
sample n), the push-through identity gives

    Δθ_{l,i} = a^T w / N,   w = (S² K / N + ρ)^{-1} b = S (S K S / N + ρ)^{-1} (b / s)

(one symmetric positive-definite solve per unit). Rows of a sample on which the unit is inactive
(s_n = 0, as for ReLU) decouple, so each solve is restricted to the unit's support, |S| × |S| —
about N/2 for ReLU, an eighth of the work. At ρ = 0 the limit is the pseudo-inverse (S.135):
w_S = N K_SS^{-1} (b / s²)_S. For one output, S K S / N is the seed's
Θ_{l,i} = diag(δ_{l,i}) (σ_w² A_{l−1} + σ_b²) diag(δ_{l,i}) / N (S.131), and on the training set
Θ̄ = Σ_{l,i} Θ_{l,i} Θ_{l,i}^+ = Σ_{l,i} diag(1[δ_{l,i} ≠ 0]) (S.137): α = Σ_{l<L} γ_l M_l (+ C).
Never a (M_{l−1} + 1)² block per unit, never J.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from ..network import Factors
from .base import Fisher, pinv_psd

__all__ = ["Unitwise"]

_CHUNK_ELEMENTS = 2**23  # units per batched solve: chunk · N² ≤ this (64 MiB in float64)


@dataclass(frozen=True, kw_only=True)
class Unitwise(Fisher):
    """Unit-wise Fisher: block diagonal over the units (l, i) (seed (S.129)).

    Args:
        rcond: at ρ = 0, the pseudo-inverse's relative cut-off: sample n counts as active for unit i
            when the diagonal entry s_n² K_nn / N of Θ_{l,i} exceeds ``rcond`` times the unit's largest
            one (exact zeros, as ReLU's, are always inactive).

    At finite width the ρ → 0 limit takes huge steps on units whose δ_{l,i}(x_n) is tiny but not zero
    (the step of u_{l,i}(x_n) is r_n / δ_{l,i}(x_n)), which leaves the linear regime; a small damping
    such as ρ = 1e-12 keeps Θ̄ close to α I and training in the regime of the theory.
    """

    rcond: float = 1e-12

    name: ClassVar[str] = "unitwise"
    label: ClassVar[str] = "Unit-wise"

    def _unit_scales(self, fx: Factors, layer: int, lam: Tensor | None) -> tuple[Tensor, Tensor]:
        """s (M, N) with s_n² = δ_n^T Λ_n δ_n, and δ itself as (M, N, C)."""
        d = fx.backward[layer].to(self.solve_dtype).permute(2, 1, 0)  # (M, N, C)
        if lam is None:
            s2 = (d * d).sum(-1)
        else:
            s2 = torch.einsum("mnk,nkj,mnj->mn", d, lam, d)
        return s2.clamp_min(0).sqrt(), d

    def _support(self, k: Tensor, s: Tensor) -> Tensor:
        """(M, N) bool: samples on which each unit is active (s_n > 0; at ρ = 0 also the diagonal
        entry s_n² K_nn / N of Θ_{l,i} above ``rcond`` times the unit's largest)."""
        if self.damping > 0:
            return s > 0
        diag = s * s * torch.diagonal(k)
        return diag > self.rcond * diag.amax(1, keepdim=True).clamp_min(torch.finfo(k.dtype).tiny)

    def _batches(self, k: Tensor, s: Tensor, width: int = 0):
        """Yield (units, idx, valid, chol, solve) for batches of units of similar support size.

        idx (u, m): each unit's active samples first (padded); valid (u, m) marks the real ones;
        chol: Cholesky factors of the support systems — K_SS at ρ = 0, S K_SS S / N + ρ I else —
        with identity rows on the padding (None where the pseudo-inverse stands in); solve(b): the
        systems' inverse applied to b (u, m, R). ``width`` is the number of right-hand sides to budget for.
        """
        n = k.shape[0]
        active = self._support(k, s)
        sizes = active.sum(1)
        order = torch.argsort(sizes)
        pos = torch.argsort((~active).to(torch.int8), dim=1, stable=True)  # active samples first
        biggest = max(1, int(sizes.max()))
        step = max(1, _CHUNK_ELEMENTS // (biggest * (biggest + width)))
        # padding slot j of a system points at row n + j of K ⊕ I (and s = 1 there): identity rows
        # and no coupling, so no masking of the gathered systems is needed
        k_ext = torch.block_diag(k, torch.eye(biggest, dtype=k.dtype, device=k.device))
        s_ext = torch.cat([s, torch.ones(s.shape[0], biggest, dtype=s.dtype, device=s.device)], 1)
        for lo in range(0, len(order), step):
            units = order[lo : lo + step]
            m = int(sizes[units].max())
            if m == 0:
                continue
            idx = pos[units, :m]
            slot = torch.arange(m, device=k.device)[None, :]
            valid = slot < sizes[units][:, None]
            sub_idx = torch.where(valid, idx, n + slot)
            sub = torch.take(k_ext, sub_idx[:, :, None] * k_ext.shape[0] + sub_idx[:, None, :])
            if self.damping > 0:
                si = torch.gather(s_ext[units], 1, sub_idx)
                sub.mul_(si[:, :, None] * si[:, None, :]).div_(n)
                sub.diagonal(dim1=1, dim2=2).add_(self.damping)
            chol, info = torch.linalg.cholesky_ex(sub)
            if not bool((info != 0).any()):
                yield units, idx, valid, chol, partial(_cholesky_solve, chol)
            elif self.damping == 0:  # singular K_SS (e.g. M_{l−1} < N): eigh pseudo-inverse
                yield units, idx, valid, None, pinv_psd(sub).matmul
            else:
                raise ValueError(
                    "damping: the unit-wise systems are not positive definite in this precision; "
                    "increase damping or use solve_dtype=torch.float64"
                )

    def _solve_units(self, k: Tensor, s: Tensor, rhs: Tensor) -> Tensor:
        """For each unit i: (S_i² K / N + ρ)^{-1} rhs_i = S_i (S_i K S_i / N + ρ)^{-1} S_i^+ rhs_i, for
        rhs (M, N, R) vanishing where s_i = 0. At ρ = 0, the pseudo-inverse limit (S.135):
        N K_SS^{-1} (rhs / s²)_S on the support S of unit i, 0 elsewhere."""
        n, r = k.shape[0], rhs.shape[2]
        out = torch.zeros(rhs.shape, dtype=rhs.dtype, device=rhs.device)
        for units, idx, valid, _, solve in self._batches(k, s, r):
            gidx = idx[:, :, None].expand(-1, -1, r)
            si = torch.gather(s[units], 1, idx)[:, :, None]
            si = torch.where(valid[:, :, None], si, 1.0)
            b = torch.gather(rhs[units], 1, gidx) * valid[:, :, None]
            w = solve(b * (n / si**2)) if self.damping == 0 else solve(b / si) * si
            out[units] = out[units].scatter(1, gidx, w * valid[:, :, None])
        return out

    def alpha_hat_from_factors(self, fx: Factors) -> float:
        """tr(Θ̄ Λ) / (N·C) without forming Θ̄: Σ_{l,i} tr(Θ_{l,i} (Θ_{l,i} + ρ)^{-1}) / (N·C). Each
        trace is |S_i| − ρ ||L_i^{-1}||_F² for the Cholesky factor L_i of the support system, and at
        ρ = 0 the number |S_i| of samples on which unit i is active (S.137)."""
        lam = self._metric(fx)
        total = 0.0
        for l in range(fx.depth):
            s, _ = self._unit_scales(fx, l, lam)
            a = fx.forward[l].to(self.solve_dtype)
            k = a @ a.T
            if self.damping == 0:
                total += float(self._support(k, s).sum())
                continue
            for _, _, valid, chol, _ in self._batches(k, s):
                eye = torch.eye(chol.shape[-1], dtype=k.dtype, device=k.device).expand_as(chol)
                inv = torch.linalg.solve_triangular(chol, eye, upper=False) * valid[:, :, None]
                total += float(valid.sum() - self.damping * (inv**2).sum())
        return total / (fx.n * fx.c)

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
            eye = torch.eye(n, dtype=k.dtype, device=k.device)
            for lo in range(0, s.shape[0], step):
                sl = slice(lo, lo + step)
                m = s[sl].shape[0]
                # (S²K/N + ρ)^{-1} restricted to the columns it meets (δ vanishes elsewhere), (m, N, N)
                r_i = self._solve_units(k, s[sl], eye.expand(m, n, n) * (s[sl] > 0)[:, :, None])
                t_i = k_cross @ r_i  # (m, N′, N)
                total += torch.einsum("ipk,ipn,inj->pknj", dt[sl], t_i, d[sl]).reshape(nt * c, n * c)
        return total


def _cholesky_solve(chol: Tensor, b: Tensor) -> Tensor:
    return torch.cholesky_solve(b, chol)
