"""The interface every Fisher approximation shares, the Fisher bound to a batch, and the dual-form
linear algebra they use.

Notation (docs/conventions.md). N samples, C outputs; function-space vectors are (N, C) and flatten
sample-major to length N·C. J is the (N·C, P) Jacobian, never formed; Θ = J J^T / N and the
per-layer Θ_l = J_l J_l^T / N come from the layers' signals (:mod:`natural_tangents.layers`). The
loss enters through r (∇L = J^T r / N) and the output metric Λ (G = J^T Λ J / N + ρ I; Λ = I for MSE).

A Fisher is a small frozen configuration (damping, loss, options). ``fisher.at(model, x)`` binds it
to a batch: the :class:`BoundFisher` computes the batch's signals once, the output metric once and
each factorization once, and answers every question about that batch:

* ``natural_gradient(y)``: (G + ρ I)^{-1} ∇L as a list aligned with ``model.parameters()``;
* ``coefficient(x_test=None)``: Θ̄(x′, x) = J(x′) G^{-1} J(x)^T / N (S.4);
* ``alpha_hat()`` and ``isotropy()``: α̂ and how close Θ̄(x, x) is to α I (Condition 1).

The Fisher's own methods (``fisher.natural_gradient(model, x, y)`` …) bind and ask in one call.
``damping = 0`` is the zero-damping limit ρ → 0⁺, computed with pseudo-inverses (S.90, S.135).
With ``process_group=`` the batch is sharded over the ranks (see :mod:`natural_tangents.distributed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .. import losses as _losses
from .._checks import check_damping
from ..distributed import agree, all_reduce_sum, check_group, gather_rows, gather_signals
from ..kernels import _public_shape
from ..models import signals as _signals
from ..signals import Signals

__all__ = ["Fisher", "BoundFisher", "Isotropy", "isotropy", "flatten_coefficient"]


@dataclass(frozen=True)
class Isotropy:
    """How close Θ̄(x, x) is to α I (the paper's Condition 1).

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


def not_positive_definite(m: Tensor | None = None, chol: Tensor | None = None) -> ArithmeticError | ValueError:
    """The error for a damped system ``m`` that failed to factor: FloatingPointError when it (or its
    attempted factor ``chol``) holds NaN or inf entries (kernels of a diverged model overflow), else
    ValueError naming the fix."""
    if any(t is not None and not bool(torch.isfinite(t).all()) for t in (m, chol)):
        return FloatingPointError(
            "damping: the system to solve has NaN or inf entries (the model's outputs or derivatives overflowed, "
            "as in a diverged run); lower the learning rate or raise the damping, and restart from finite parameters"
        )
    double = m is not None and m.dtype == torch.float64
    fix = "increase damping" if double else "increase damping or use solve_dtype=torch.float64"
    return ValueError(f"damping: the damped system is not positive definite in this precision; {fix}")


def cholesky_pd(m: Tensor) -> Tensor:
    """The Cholesky factor of a positive definite matrix (or batch), else :func:`not_positive_definite`."""
    chol, info = torch.linalg.cholesky_ex(m)
    if not bool((info == 0).all()):
        raise not_positive_definite(m, chol)
    return chol


def cholesky_if_nonsingular(a: Tensor) -> Tensor | None:
    """The Cholesky factor of A when A^{-1} equals the pseudo-inverse A^+ (a single matrix whose
    eigenvalues all lie far above pinv_psd's cut-off n·eps·λ_max); None otherwise.

    λ_max ≤ ||A||_1, and 1/λ_min ≤ ||A^{-1}||_1 is estimated by Hager's method (a few solves with
    the factor, as LAPACK's condition estimators); the factor is kept when the estimated condition
    number is 10⁴ times below 1/(n·eps). About N³/3 flops against about 9 N³ for the
    eigendecomposition."""
    if a.ndim != 2:
        return None
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return None
    n = a.shape[0]
    x = torch.full((n, 1), 1.0 / n, dtype=a.dtype, device=a.device)
    inv_norm = 0.0
    for _ in range(5):
        y = torch.cholesky_solve(x, chol)
        inv_norm = float(y.abs().sum())
        z = torch.cholesky_solve(torch.sign(y), chol)
        j = int(z.abs().argmax())
        if float(z[j].abs()) <= float((z * x).sum()):
            break
        x = torch.zeros_like(x)
        x[j] = 1.0
    cond = float(a.abs().sum(0).max()) * inv_norm
    if not (math.isfinite(cond) and cond * 1e4 * n * torch.finfo(a.dtype).eps < 1.0):
        return None
    return chol


def damped_cholesky(k: Tensor, damping: float) -> Tensor | None:
    """Cholesky factor of K + ρ I for a symmetric PSD K, of which only the lower triangle is read
    (K is changed in place); at ρ = 0 the factor of K when K is far from singular
    (:func:`cholesky_if_nonsingular`, which reads K whole), else None."""
    if damping == 0:
        return cholesky_if_nonsingular(k)
    k.diagonal(dim1=-2, dim2=-1).add_(damping)
    return cholesky_pd(k)


def inverse_psd(a: Tensor, damping: float) -> Tensor:
    """(A + ρ I)^{-1} for a symmetric PSD A (Cholesky and its inverse, about N³ flops); at ρ = 0 the
    pseudo-inverse A^+ (the zero-damping limit; by Cholesky when A is far from singular)."""
    chol = damped_cholesky(0.5 * (a + a.mT) if damping > 0 else a, damping)
    return pinv_psd(a) if chol is None else torch.cholesky_inverse(chol)


def solve_psd(a: Tensor, b: Tensor, shift: Tensor | float = 0.0) -> Tensor:
    """(A + shift)^{-1} B for symmetric PSD A (or a batch) and a PD shift (a number ρ > 0 or a
    matrix); with a zero shift, A^+ B (the zero-damping limit)."""
    if isinstance(shift, Tensor):
        m = a + shift
        chol = cholesky_pd(0.5 * (m + m.mT))
    else:  # Cholesky reads one triangle: no symmetrizing copy
        chol = damped_cholesky(a.clone(), shift) if shift > 0 else damped_cholesky(a, 0.0)
    return pinv_psd(a) @ b if chol is None else torch.cholesky_solve(b, chol)


def block_diag_metric(lam: Tensor) -> Tensor:
    """Per-sample (N, C, C) blocks → the (N·C, N·C) block-diagonal output metric (sample-major)."""
    return torch.block_diag(*lam)


@dataclass(frozen=True)
class Whitening:
    """The output metric's square roots: ``root`` Λ_n^{1/2} and ``pinv_root`` (Λ_n^{1/2})^+, (N, C, C).

    A Fisher with an output metric, G = J^T Λ J / N, is the Λ = I Fisher of the whitened Jacobian
    Λ^{1/2} J: its kernels are Λ^{1/2} Θ Λ^{1/2} and, since every residual r of the loss lies in the
    range of Λ (r_n ⊥ 1 for the softmax, whose Λ_n 1 = 0 without output damping),
    J^T r = (Λ^{1/2} J)^T (Λ^{1/2})^+ r. So (Λ Θ + ρ)^{-1} r = Λ^{1/2} (Λ^{1/2} Θ Λ^{1/2} + ρ)^{-1} (Λ^{1/2})^+ r
    for every ρ > 0, and its ρ → 0⁺ limit is Λ^{1/2} (Λ^{1/2} Θ Λ^{1/2})^+ (Λ^{1/2})^+ r, which equals
    Θ^+ Λ^{-1} r only when Θ is nonsingular. Singular Λ (``output_damping=0``) needs no inverse."""

    root: Tensor
    pinv_root: Tensor

    @staticmethod
    def of(lam: Tensor) -> Whitening:
        ev, vec = torch.linalg.eigh(0.5 * (lam + lam.mT))
        cut = ev.shape[-1] * torch.finfo(ev.dtype).eps * ev.abs().amax(-1, keepdim=True)
        keep = ev > cut
        sq = torch.where(keep, ev.clamp_min(0).sqrt(), 0.0)
        inv = torch.where(keep, 1.0 / sq.where(keep, 1.0), 0.0)
        return Whitening((vec * sq.unsqueeze(-2)) @ vec.mT, (vec * inv.unsqueeze(-2)) @ vec.mT)

    @staticmethod
    def _left(blocks: Tensor, m: Tensor) -> Tensor:
        """blockdiag(blocks) @ m for m (…, N·C, R)."""
        n, c = blocks.shape[0], blocks.shape[1]
        lead, r = m.shape[:-2], m.shape[-1]
        out = torch.einsum("nab,...nbr->...nar", blocks, m.reshape(*lead, n, c, r))
        return out.reshape(*lead, n * c, r)

    def kernel(self, k: Tensor) -> Tensor:
        """Λ^{1/2} K Λ^{1/2} for kernels K (…, N·C, N·C)."""
        return self._left(self.root, self._left(self.root, k).mT).mT

    def rhs(self, b: Tensor) -> Tensor:
        """(Λ^{1/2})^+ b for b (…, N·C, R)."""
        return self._left(self.pinv_root, b)

    def out(self, v: Tensor) -> Tensor:
        """Λ^{1/2} v for v (…, N·C, R)."""
        return self._left(self.root, v)

    def dual(self, x: Tensor) -> Tensor:
        """Λ^{1/2} X (Λ^{1/2})^+ for a whitened dual matrix X (…, N·C, N·C)."""
        return self._left(self.pinv_root, self._left(self.root, x).mT).mT


def solve_with_metric(k: Tensor, lam: Tensor | None, damping: float, rhs: Tensor | None = None) -> Tensor:
    """(Λ K + ρ I)^{-1} for a symmetric PSD kernel K (N·C, N·C) and the per-sample output metric Λ
    (N, C, C), ``None`` for Λ = I, through the whitened kernel (:class:`Whitening`):
    Λ^{1/2} (Λ^{1/2} K Λ^{1/2} + ρ)^{-1} (Λ^{1/2})^+; at ρ = 0 its limit on the range of Λ (where
    every residual lies), with the pseudo-inverse. With ``rhs`` (N·C, R), that matrix applied to it
    (one factorization, no inverse)."""
    if lam is None:
        return inverse_psd(k, damping) if rhs is None else solve_psd(k, rhs, damping)
    w = Whitening.of(lam)
    kt = w.kernel(k)
    if rhs is None:
        return w.dual(inverse_psd(kt, damping))
    return w.out(solve_psd(kt, w.rhs(rhs), damping))


class BoundFisher:
    """A Fisher bound to one batch (see the module docstring). Made by :meth:`Fisher.at`.

    Attributes: ``fisher`` (the configuration), ``signals`` (the whole batch's, gathered over the
    ranks when distributed), ``model``, ``process_group``, ``cache`` (factorizations computed so far).
    """

    def __init__(self, fisher: Fisher, signals: Signals, model=None, process_group=None, local: Signals | None = None):
        self.fisher = fisher
        self.signals = signals
        self.model = model
        self.process_group = process_group
        self.local = signals if local is None else local
        self.local_n = self.local.n
        self.cache: dict = {}

    @property
    def n(self) -> int:
        return self.signals.n

    @property
    def c(self) -> int:
        return self.signals.c

    @property
    def metric(self) -> Tensor | None:
        """The output metric Λ (N, C, C) in the solve dtype, ``None`` for Λ = I (MSE)."""
        if "metric" not in self.cache:
            lam = self.fisher.loss.output_fisher(self.signals.f)
            self.cache["metric"] = None if lam is None else lam.to(self.fisher.solve_dtype)
        return self.cache["metric"]

    def residual(self, y) -> Tensor:
        """r (N, C) for this rank's targets ``y`` (gathered over the ranks), in the solve dtype."""
        f = self.signals.f
        if self.process_group is None:
            y = self.fisher.loss.check_targets(y, f)
        else:
            y = self.fisher.loss.check_targets(y, f[self._local_rows()])
            y = gather_rows(y, self.process_group)
        return self.fisher.loss.residual(f, y).to(self.fisher.solve_dtype)

    def _local_rows(self) -> slice:
        start = self.cache.get("offset", 0)
        return slice(start, start + self.local_n)

    def natural_gradient(self, y) -> list[Tensor]:
        """(G + ρI)^{-1} ∇L of the whole batch, aligned with ``model.parameters()``: ``None`` in the
        place of a frozen parameter (``requires_grad=False``, not a coordinate of the Fisher). Bound
        to signals without a model, the trainable parameters' updates in layer order.

        y: targets of this rank's samples, (N_r, C) (MSE) or one-hot / class indices (cross-entropy).
        """
        updates = self.fisher._layer_updates(self, self.residual(y))
        by_param = {}
        for layer, upd in zip(self.signals.layers, updates):
            by_param.update({id(p): u.to(p.dtype) for u, p in zip(upd, layer.params, strict=True)})
        if self.model is None:
            return list(by_param.values())
        return [by_param.get(id(p)) for p in self.model.parameters()]

    def test_signals(self, x_test) -> Signals:
        if self.model is None:
            raise ValueError("x_test: this bound Fisher has no model; bind with fisher.at(model, x)")
        return _signals(self.model, x_test, "x_test")

    def coefficient(self, x_test=None) -> Tensor:
        """Θ̄(x_test, x) = J(x_test) G^{-1} J(x)^T / N (S.4), Θ̄(x, x) without ``x_test``.

        Returns (N′, N) for one output, (N′, N, C, C) for C > 1, in ``solve_dtype``. ``x_test`` may be
        a batch or precomputed :class:`~natural_tangents.signals.Signals`; when distributed, the same
        test points on every rank (x is the sharded batch).
        """
        st = self.signals
        if x_test is not None:
            st = x_test if isinstance(x_test, Signals) else self.test_signals(x_test)
        t = self.fisher._coefficient(self, st)
        return _public_shape(t, st.n, self.n, self.c)

    def alpha_hat(self) -> float:
        """Empirical α̂ = tr(Θ̄(x, x) Λ) / (N·C) (Λ = I for MSE): the mean eigenvalue of Θ̄ for MSE,
        and the α of (S.167) for cross-entropy. ``lr="optimal"`` steps use η = 1/α̂."""
        if "alpha" not in self.cache:
            self.cache["alpha"] = self.fisher._alpha_hat(self)
        return self.cache["alpha"]

    def isotropy(self) -> Isotropy:
        """Isotropy diagnostics of Θ̄(x, x): α̂ (mean eigenvalue), condition number, ||Θ̄/α̂ − I||₂."""
        return isotropy(self.coefficient())

    def layer_kernels(self) -> Tensor:
        """Θ_l = J_l J_l^T / N of the batch, (L, N·C, N·C) in the solve dtype (computed once).

        The Grams are formed in the network's precision (the O(N² M) work) and only the N·C × N·C
        results are cast to the solve dtype."""
        if "thetas" not in self.cache:
            if self.process_group is None:  # one layer at a time, cast into the result
                layers, nc = self.signals.layers, self.n * self.c
                grams = torch.empty(len(layers), nc, nc, dtype=self.fisher.solve_dtype, device=self.signals.f.device)
                for l, layer in enumerate(layers):
                    grams[l].copy_(layer.gram())
            else:  # this rank's rows against the whole batch, then the rows of every rank
                rows = self.local.layer_kernels(self.signals).transpose(0, 1)  # (N_r·C, L, N·C)
                grams = gather_rows(rows, self.process_group).transpose(0, 1).to(self.fisher.solve_dtype)
            self.cache["thetas"] = grams.div_(self.n)
        return self.cache["thetas"]


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
    aliases: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "damping", check_damping(self.damping))
        object.__setattr__(self, "loss", _losses.get(self.loss))
        if self.solve_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solve_dtype: expected torch.float32 or torch.float64, got {self.solve_dtype}")

    # ----------------------------------------------------------------- binding
    def at(self, model, x, *, process_group=None) -> BoundFisher:
        """This Fisher bound to the batch ``x`` of ``model`` (signals computed once).

        With ``process_group`` (torch.distributed), ``x`` is this rank's shard; the bound Fisher holds
        the whole batch (the shards concatenated in rank order) and every answer is the whole batch's,
        identical on every rank.
        """
        if process_group is None:
            return BoundFisher(self, _signals(model, x), model)
        check_group(process_group)
        local, error = None, None
        try:
            local = _signals(model, x)
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
            error = err
        agree(model, x, process_group, error)
        full, offset = gather_signals(local, model, process_group)
        bound = BoundFisher(self, full, model, process_group, local=local)
        bound.cache["offset"] = offset
        return bound

    def bind(self, signals: Signals, model=None) -> BoundFisher:
        """This Fisher bound to precomputed signals of a batch."""
        return BoundFisher(self, signals, model)

    # ----------------------------------------------------------------- one-call interface
    def natural_gradient(self, model, x, y, *, process_group=None) -> list[Tensor]:
        """(G + ρI)^{-1} ∇L at the batch (x, y), aligned with ``model.parameters()``.

        x: (N, …) inputs; y: (N, C) targets (MSE) or one-hot / class indices (cross-entropy).
        """
        return self.at(model, x, process_group=process_group).natural_gradient(y)

    def coefficient(self, model, x, x_test=None, *, process_group=None) -> Tensor:
        """Θ̄(x_test, x) = J(x_test) G^{-1} J(x)^T / N (S.4), Θ̄(x, x) without ``x_test``.

        Returns (N′, N) for one output, (N′, N, C, C) for C > 1, in ``solve_dtype``.
        """
        return self.at(model, x, process_group=process_group).coefficient(x_test)

    def alpha_hat(self, model, x, *, process_group=None) -> float:
        """Empirical α̂ = tr(Θ̄(x, x) Λ) / (N·C) (see :meth:`BoundFisher.alpha_hat`)."""
        return self.at(model, x, process_group=process_group).alpha_hat()

    def isotropy(self, model, x, *, process_group=None) -> Isotropy:
        """Isotropy diagnostics of Θ̄(x, x): α̂ (mean eigenvalue), condition number, ||Θ̄/α̂ − I||₂."""
        return self.at(model, x, process_group=process_group).isotropy()

    def natural_gradient_from_factors(self, fx: Signals, y) -> list[Tensor]:
        """As :meth:`natural_gradient`, from precomputed signals of the batch."""
        return self.bind(fx).natural_gradient(y)

    def coefficient_from_factors(self, fx: Signals, ft: Signals | None = None) -> Tensor:
        """As :meth:`coefficient`, from precomputed signals of the batch (and of the test points)."""
        return self.bind(fx).coefficient(ft)

    # ----------------------------------------------------------------- for subclasses
    def _layer_updates(self, bound: BoundFisher, r: Tensor) -> list[list[Tensor]]:
        """Per layer, the parameter updates (one tensor per parameter of the layer)."""
        raise NotImplementedError

    def _coefficient(self, bound: BoundFisher, test: Signals) -> Tensor:
        """Θ̄(x_test, x) flat, (N′·C, N·C)."""
        raise NotImplementedError

    def _alpha_hat(self, bound: BoundFisher) -> float:
        tb = self._coefficient(bound, bound.signals)
        lam = bound.metric
        if lam is not None:
            tb = tb @ block_diag_metric(lam)
        return float(torch.diagonal(tb).mean())


class DualFisher(Fisher):
    """Fishers whose update is Δθ_l = J_l^T X_l r / N for per-layer N·C × N·C matrices X_l
    (exact and layer-wise): then Θ̄(x′, x) = Σ_l Θ_l(x′, x) X_l."""

    def _dual(self, bound: BoundFisher) -> list[Tensor]:
        """The list of X_l for the bound batch (computed once per batch)."""
        raise NotImplementedError

    def _duals(self, bound: BoundFisher) -> list[Tensor]:
        if "dual" not in bound.cache:
            bound.cache["dual"] = self._dual(bound)
        return bound.cache["dual"]

    def _dual_vectors(self, bound: BoundFisher, r: Tensor) -> list[Tensor]:
        """The per-layer dual vectors v_l = X_l r (N·C), by solves with the one right-hand side r
        (subclasses), or from the X_l when the batch has them already."""
        rf = r.reshape(-1)
        return [x_l @ rf for x_l in self._duals(bound)]

    def _layer_updates(self, bound: BoundFisher, r: Tensor) -> list[list[Tensor]]:
        """Δθ_l = J_l^T v_l / N. Distributed, each rank applies J_l^T to its own rows of v_l and the
        parts are summed over the ranks (one all-reduce of the P update entries)."""
        vs = self._dual_vectors(bound, r)
        rows = slice(None) if bound.process_group is None else bound._local_rows()
        out, last = [], (None, None)
        for layer, v_l in zip(bound.local.layers, vs):
            v = last[1] if v_l is last[0] else v_l.reshape(bound.n, bound.c)[rows] / bound.n
            last = (v_l, v)
            out.append(layer.transpose(v))
        if bound.process_group is not None:
            out = [[all_reduce_sum(t, bound.process_group) for t in upd] for upd in out]
        return out

    def _coefficient(self, bound: BoundFisher, test: Signals) -> Tensor:
        xs = self._duals(bound)
        if test is bound.signals:
            cross = bound.layer_kernels()
        else:
            cross = test.layer_kernels(bound.signals, self.solve_dtype) / bound.n
        return sum(c @ x for c, x in zip(cross, xs))
