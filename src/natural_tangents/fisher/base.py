"""The interface every Fisher approximation shares, and the dual-form linear algebra they use.

Notation (MATH.md §3–4). N samples, C outputs; function-space vectors are (N, C) and flatten
sample-major to length N·C. J is the (N·C, P) Jacobian, never formed; Θ = J J^T / N and the
per-layer Θ_l = J_l J_l^T / N come from :func:`natural_tangents.kernels.layer_kernels`. The loss
enters through r (∇L = J^T r / N) and the output metric Λ (G = J^T Λ J / N + ρ I; Λ = I for MSE).

Every Fisher offers:

* ``natural_gradient(model, x, y)``: (G + ρ I)^{-1} ∇L as a list aligned with ``model.parameters()``;
* ``coefficient(model, x, x_test=None)``: Θ̄(x′, x) = J(x′) G^{-1} J(x)^T / N (S.4);
* ``isotropy(model, x)``: α̂, condition number and ||Θ̄/α̂ − I||₂ of Θ̄(x, x) (Condition 1).

``damping = 0`` is the zero-damping limit ρ → 0⁺, computed with pseudo-inverses (S.90, S.135).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .. import losses as _losses
from .._checks import check_damping
from ..kernels import _public_shape, model_factors
from ..network import Factors

__all__ = ["Fisher", "Isotropy", "isotropy", "flatten_coefficient"]


@dataclass(frozen=True)
class Isotropy:
    """How close Θ̄(x, x) is to α I (the seed's Condition 1).

    alpha: mean eigenvalue α̂ = tr Θ̄ / (N·C); condition_number: λ_max / λ_min (inf if λ_min ≤ 0);
    deviation: ||Θ̄/α̂ − I||₂; eigenvalues: ascending, float64.
    """

    alpha: float
    condition_number: float
    deviation: float
    eigenvalues: Tensor


def flatten_coefficient(theta_bar: Tensor) -> Tensor:
    """(N′, N) or (N′, N, C, C) → the flat sample-major (N′·C, N·C) matrix."""
    if theta_bar.ndim == 2:
        return theta_bar
    if theta_bar.ndim == 4:
        n1, n2, c, _ = theta_bar.shape
        return theta_bar.movedim(2, 1).reshape(n1 * c, n2 * c)
    raise ValueError(f"theta_bar: expected shape (N', N) or (N', N, C, C), got {tuple(theta_bar.shape)}")


def isotropy(theta_bar: Tensor) -> Isotropy:
    """Isotropy diagnostics of a coefficient matrix Θ̄(x, x) on the training set (float64)."""
    t = flatten_coefficient(theta_bar).to(torch.float64)
    if t.shape[0] != t.shape[1]:
        raise ValueError(f"theta_bar: isotropy needs the square Θ̄(x, x), got shape {tuple(t.shape)}")
    ev = torch.linalg.eigvalsh(0.5 * (t + t.T))
    alpha = float(ev.mean())
    lo, hi = float(ev[0]), float(ev[-1])
    cond = hi / lo if lo > 0 else float("inf")
    dev = float((ev / alpha - 1.0).abs().max()) if alpha != 0 else float("inf")
    return Isotropy(alpha=alpha, condition_number=cond, deviation=dev, eigenvalues=ev)


def pinv_psd(a: Tensor) -> Tensor:
    """Moore–Penrose pseudo-inverse of a symmetric PSD matrix (or batch), by eigh with the usual
    cut-off n·eps·λ_max. This is the ρ → 0⁺ limit of (A + ρI)^{-1} restricted to the range of A."""
    a = 0.5 * (a + a.mT)
    ev, vec = torch.linalg.eigh(a)
    cut = ev.shape[-1] * torch.finfo(a.dtype).eps * ev.abs().amax(-1, keepdim=True)
    inv = torch.where(ev > cut, 1.0 / ev, torch.zeros_like(ev))
    return (vec * inv.unsqueeze(-2)) @ vec.mT


def solve_psd(a: Tensor, b: Tensor, shift: Tensor | float = 0.0) -> Tensor:
    """(A + shift)^{-1} B for symmetric PSD A and a PD shift (a number ρ > 0 or a matrix);
    with a zero shift, A^+ B (the zero-damping limit)."""
    if isinstance(shift, Tensor) or shift > 0:
        if not isinstance(shift, Tensor):
            shift = shift * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        m = a + shift
        m = 0.5 * (m + m.mT)
        chol, info = torch.linalg.cholesky_ex(m)
        if not bool((info == 0).all()):
            raise ValueError(
                "damping: the damped system is not positive definite in this precision; "
                "increase damping or use solve_dtype=torch.float64"
            )
        return torch.cholesky_solve(b, chol)
    return pinv_psd(a) @ b


def solve_with_metric(k: Tensor, lam: Tensor | None, damping: float) -> Tensor:
    """(Λ K + ρ I)^{-1} = (K + ρ Λ^{-1})^{-1} Λ^{-1} for a symmetric PSD kernel K (N·C, N·C) and the
    per-sample output metric Λ (N, C, C), ``None`` for Λ = I; at ρ = 0, K^+ Λ^{-1}."""
    if lam is None:
        return solve_psd(k, torch.eye(k.shape[0], dtype=k.dtype, device=k.device), damping)
    lam_inv = block_diag_metric(inverse_blocks(lam))
    return solve_psd(k, lam_inv, damping * lam_inv if damping > 0 else 0.0)


def block_diag_metric(lam: Tensor) -> Tensor:
    """Per-sample (N, C, C) blocks → the (N·C, N·C) block-diagonal output metric (sample-major)."""
    return torch.block_diag(*lam)


def inverse_blocks(lam: Tensor) -> Tensor:
    """Inverse of each (C, C) block of the output metric; (N, C, C)."""
    return torch.linalg.inv(lam)


@dataclass(frozen=True, kw_only=True)
class Fisher:
    """Base class of the Fisher approximations (see the module docstring).

    Args:
        damping: ρ ≥ 0 added as ρ I (for K-FAC, to each Kronecker factor). 0 is the ρ → 0⁺ limit.
        loss: ``"mse"`` (default), ``"cross_entropy"`` or a :class:`natural_tangents.losses.Loss`.
        solve_dtype: precision of the N × N (dual) algebra; float64 by default, float32 for speed.
            The O(N P) products stay in the model's dtype.
    """

    damping: float = 0.0
    loss: _losses.Loss | str = field(default="mse")
    solve_dtype: torch.dtype = torch.float64

    name: ClassVar[str] = "fisher"
    label: ClassVar[str] = "Fisher"

    def __post_init__(self) -> None:
        object.__setattr__(self, "damping", check_damping(self.damping))
        object.__setattr__(self, "loss", _losses.get(self.loss))
        if self.solve_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solve_dtype: expected torch.float32 or torch.float64, got {self.solve_dtype}")

    # ----------------------------------------------------------------- public interface
    def natural_gradient(self, model, x, y) -> list[Tensor]:
        """(G + ρI)^{-1} ∇L at the batch (x, y), aligned with ``model.parameters()``.

        x: (N, M_0); y: (N, C) targets (MSE) or one-hot / class indices (cross-entropy).
        """
        return self.natural_gradient_from_factors(model_factors(model, x), y)

    def natural_gradient_from_factors(self, fx: Factors, y) -> list[Tensor]:
        """As :meth:`natural_gradient`, from precomputed factors of the batch."""
        y = self.loss.check_targets(y, fx.f)
        r = self.loss.residual(fx.f, y).to(self.solve_dtype)
        lam = self._metric(fx)
        mats = self._layer_updates(fx, r, lam)
        return split_parameters(mats, fx)

    def coefficient(self, model, x, x_test=None) -> Tensor:
        """Θ̄(x_test, x) = J(x_test) G^{-1} J(x)^T / N (S.4), Θ̄(x, x) without ``x_test``.

        Returns (N′, N) for one output, (N′, N, C, C) for C > 1, in ``solve_dtype``.
        """
        fx = model_factors(model, x)
        ft = fx if x_test is None else model_factors(model, x_test, "x_test")
        return self.coefficient_from_factors(fx, ft)

    def coefficient_from_factors(self, fx: Factors, ft: Factors | None = None) -> Tensor:
        ft = fx if ft is None else ft
        t = self._coefficient(fx, ft, self._metric(fx))
        return _public_shape(t, ft.n, fx.n, fx.c)

    def alpha_hat(self, model, x) -> float:
        """Empirical α̂ = tr(Θ̄(x, x) Λ) / (N·C) (Λ = I for MSE): the mean eigenvalue of Θ̄ for MSE,
        and the α of (S.167) for cross-entropy. ``lr="optimal"`` steps use η = 1/α̂."""
        return self.alpha_hat_from_factors(model_factors(model, x))

    def alpha_hat_from_factors(self, fx: Factors) -> float:
        lam = self._metric(fx)
        tb = self._coefficient(fx, fx, lam)
        if lam is not None:
            tb = tb @ block_diag_metric(lam)
        return float(torch.diagonal(tb).mean())

    def isotropy(self, model, x) -> Isotropy:
        """Isotropy diagnostics of Θ̄(x, x): α̂ (mean eigenvalue), condition number, ||Θ̄/α̂ − I||₂."""
        return isotropy(self.coefficient(model, x))

    # ----------------------------------------------------------------- for subclasses
    def _metric(self, fx: Factors) -> Tensor | None:
        lam = self.loss.output_fisher(fx.f)
        return None if lam is None else lam.to(self.solve_dtype)

    def _layer_updates(self, fx: Factors, r: Tensor, lam: Tensor | None) -> list[Tensor]:
        raise NotImplementedError

    def _coefficient(self, fx: Factors, ft: Factors, lam: Tensor | None) -> Tensor:
        raise NotImplementedError


def split_parameters(mats: list[Tensor], fx: Factors) -> list[Tensor]:
    """Per-layer [W_l | b_l] updates → the list W_1, b_1, W_2, … aligned with ``parameters()``."""
    out = []
    for m, bias in zip(mats, fx.has_bias):
        m = m.to(fx.f.dtype)
        if bias:
            out.extend([m[:, :-1], m[:, -1]])  # views: no copy of a model-sized update
        else:
            out.append(m)
    return out


class DualFisher(Fisher):
    """Fishers whose update is Δθ_l = J_l^T X_l r / N for per-layer N·C × N·C matrices X_l
    (exact and layer-wise): then Θ̄(x′, x) = Σ_l Θ_l(x′, x) X_l."""

    def _dual(self, fx: Factors, lam: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """Return (Θ_l for the training batch, shape (L, NC, NC); the list of X_l)."""
        raise NotImplementedError

    def _layer_updates(self, fx: Factors, r: Tensor, lam: Tensor | None) -> list[Tensor]:
        _, xs = self._dual(fx, lam)
        rf = r.reshape(-1)
        out = []
        for l, x_l in enumerate(xs):
            v = (x_l @ rf).reshape(fx.n, fx.c)
            out.append(fx.gradient(v, l) / fx.n)
        return out

    def _coefficient(self, fx: Factors, ft: Factors, lam: Tensor | None) -> Tensor:
        from ..kernels import layer_kernels

        thetas, xs = self._dual(fx, lam)
        cross = thetas if ft is fx else layer_kernels(ft, fx, self.solve_dtype) / fx.n
        return sum(c @ x for c, x in zip(cross, xs))
