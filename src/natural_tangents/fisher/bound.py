"""The Fisher bound to a batch: :class:`BoundFisher`, the state every Fisher subclasses with its own
factorizations as cached properties (``ExactBatch``, ``LayerwiseBatch``, ``KFACBatch``,
``UnitwiseBatch``), and :class:`DualBatch`, the common part of the dual-form Fishers.

A bound Fisher computes the batch's signals once and each factorization once, and answers every
question about that batch from them, in any order:

* ``natural_gradient(y)``: (G + ρ I)^{-1} ∇L as a list aligned with ``model.parameters()``;
* ``precondition(grads)``: (G + ρ I)^{-1} g for any gradient g (e.g. ``.grad``);
* ``coefficient(x_test=None)``: Θ̄(x′, x) = J(x′) G^{-1} J(x)^T / N (S.4);
* ``alpha_hat()`` and ``isotropy()``: α̂ and how close Θ̄(x, x) is to α I (Condition 1).

Notation as in :mod:`natural_tangents.fisher.base` and docs/conventions.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ..distributed import all_reduce_tensors, gather_rows, mean_gradient
from ..layers.base import LayerSignals
from ..linalg.options import SolverOptions
from ..models import has_training_batchnorm
from ..models import signals as model_signals
from ..signals import Signals, public_shape
from .rows import Rows

if TYPE_CHECKING:
    from .base import Fisher

__all__ = ["BoundFisher", "DualBatch", "Isotropy", "isotropy", "flatten_coefficient"]


def _regroup(flat: list[Tensor], like: list[list[Tensor]]) -> list[list[Tensor]]:
    """A flat list back into the per-layer lists of ``like``."""
    it = iter(flat)
    return [[next(it) for _ in group] for group in like]


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


class BoundFisher(ABC):
    """A Fisher bound to one batch (see the module docstring). Made by :meth:`Fisher.at` or
    :meth:`Fisher.bind`; each Fisher subclasses it with its factorizations as cached properties.

    Attributes:
        fisher: the configuration. signals: the whole batch's (gathered over the ranks when
            distributed). local: this rank's. offset: the first sample of this rank in the batch.
        model, process_group: as given. routes: a Counter of the solver routes taken so far
            (factorizations, refined or direct solves), for diagnostics and tests.
    """

    #: whether each rank's update covers only its own samples (summed over the ranks); the Fishers
    #: whose factors are Grams of the gathered signals compute the whole update on every rank
    partial_updates: ClassVar[bool] = False

    def __init__(
        self,
        fisher: Fisher,
        signals: Signals,
        model=None,
        process_group=None,
        *,
        local: Signals | None = None,
        offset: int = 0,
        inputs=None,
        observed: Tensor | None = None,
    ) -> None:
        self.fisher = fisher
        self.signals = signals
        self.model = model
        self.process_group = process_group
        self.local = signals if local is None else local
        self.offset = offset
        self.inputs = inputs
        #: rows read elsewhere (the backward loop): ``signals`` are the rows already, and ``observed``
        #: the observed residuals r (N, C)
        self.observed = observed
        self.routes: Counter = Counter()

    # ---------------------------------------------------------------- the batch
    @property
    def n(self) -> int:
        return self.signals.n

    @property
    def c(self) -> int:
        return self.signals.c

    @property
    def depth(self) -> int:
        return self.signals.depth

    @property
    def options(self) -> SolverOptions:
        return self.fisher.options

    @property
    def solve_dtype(self) -> torch.dtype:
        return self.fisher.solve_dtype

    @property
    def sampled(self) -> bool:
        """Whether the rows are sampled or observed gradients (``fisher_type`` "mc" or "empirical")."""
        return self.fisher.fisher_type != "expectation"

    @cached_property
    def rows(self) -> Rows:
        """The per-sample row maps of the expectation (Λ^{1/2} and its pseudo-inverse; identity for MSE;
        and for the sampled types, whose signals are their rows already)."""
        if self.sampled:
            return Rows()
        if self.observed is not None:  # the rows are Λ^{1/2} J already: only the coordinates are needed
            lam = self.fisher.loss.output_fisher(self.signals.f)
            return Rows(coords=None if lam is None else Rows.expectation(lam.to(self.solve_dtype)).coords)
        lam = self.fisher.loss.output_fisher(self.signals.f)
        return Rows.expectation(None if lam is None else lam.to(self.solve_dtype))

    def _curvature_rows(self, layers: tuple[LayerSignals, ...], start: int = 0) -> tuple[LayerSignals, ...]:
        if self.observed is not None:  # read as rows already
            return layers
        if self.fisher.fisher_type == "mc":  # the k sampled rows, without the observed one
            k = int(self.fisher.mc_samples)
            keep = torch.eye(k, k + 1, dtype=self.signals.f.dtype, device=self.signals.f.device)
            return tuple(layer.mix(keep.expand(layer.n, k, k + 1)) for layer in layers)
        return self.rows.rows(layers, start)

    @cached_property
    def row_signals(self) -> tuple[LayerSignals, ...]:
        """Ĵ_l of the whole batch, per layer (the signals themselves for MSE)."""
        return self._curvature_rows(self.signals.layers)

    @cached_property
    def local_rows(self) -> tuple[LayerSignals, ...]:
        """Ĵ_l of this rank's samples."""
        if self.process_group is None:
            return self.row_signals
        return self._curvature_rows(self.local.layers, self.offset)

    @cached_property
    def gradient(self) -> list[list[Tensor]]:
        """∇L = J^T r / N per layer (one tensor per parameter), of a Monte-Carlo batch: the transpose
        of its observed row (this rank's part when distributed; summed over the ranks by
        :meth:`natural_gradient`)."""
        k = int(self.fisher.mc_samples)
        v = torch.zeros(self.local.n, k + 1, dtype=self.solve_dtype, device=self.signals.f.device)
        v[:, k] = 1.0 / self.n
        return [layer.transpose(v) for layer in self.local.layers]

    @property
    def r(self) -> int:
        """Rows per sample R (C for the expectation over the outputs)."""
        return self.row_signals[0].c if self.row_signals else self.c

    @cached_property
    def layer_kernels(self) -> Tensor:
        """Θ_l = Ĵ_l Ĵ_l^T / N of the batch's rows, (L, N·R, N·R) in the solve dtype (Λ^{1/2} Θ_l Λ^{1/2}
        with an output metric). The Grams are formed in the network's precision (the O(N² M) work)
        and only the N·R × N·R results are cast to the solve dtype."""
        nr = self.n * self.r
        if self.process_group is None:  # one layer at a time, cast into the result
            grams = torch.empty(self.depth, nr, nr, dtype=self.solve_dtype, device=self.signals.f.device)
            for l, layer in enumerate(self.row_signals):
                grams[l].copy_(layer.gram())
        else:  # this rank's rows against the whole batch, then the rows of every rank
            rows = torch.stack([mine.gram(full) for mine, full in zip(self.local_rows, self.row_signals)])
            grams = gather_rows(rows.transpose(0, 1), self.process_group).transpose(0, 1).to(self.solve_dtype)
        return grams.div_(self.n)

    def residual(self, y) -> Tensor:
        """r (N, C) for this rank's targets ``y`` (gathered over the ranks), in the solve dtype."""
        f, loss = self.signals.f, self.fisher.loss
        if self.process_group is None:
            y = loss.check_targets(y, f)
        else:
            y = gather_rows(loss.check_targets(y, f[self.offset : self.offset + self.local.n]), self.process_group)
        return loss.residual(f, y).to(self.solve_dtype)

    # ---------------------------------------------------------------- the questions
    def natural_gradient(self, y=None) -> list[Tensor | None]:
        """(G + ρI)^{-1} ∇L of the whole batch, aligned with ``model.parameters()``: ``None`` in the
        place of a frozen parameter (``requires_grad=False``, not a coordinate of the Fisher). Bound
        to signals without a model, the trainable parameters' updates in layer order.

        y: targets of this rank's samples, (N_r, C) (MSE) or one-hot / class indices (cross-entropy);
        the sampled Fisher types read them in :meth:`Fisher.at` and need none here.
        """
        fisher_type = self.fisher.fisher_type
        if self.observed is None and self.coupled:  # the true gradient, through the batch statistics
            return self.precondition(self._true_gradient(y))
        if fisher_type == "expectation":
            if y is None and self.observed is None:
                raise ValueError("y: the targets of the batch are needed for its gradient")
            r = self.observed.to(self.solve_dtype) if y is None else self.residual(y)
            self._last_residual = r
            updates = self._updates(self.rows.rhs(r))
        elif fisher_type == "empirical":  # the gradient is Ĵ^T 1 / N: in the rows' span
            updates = self._updates(torch.ones(self.n, 1, dtype=self.solve_dtype, device=self.signals.f.device))
        else:
            grads = self.gradient
            if self.process_group is not None:
                grads = _regroup(all_reduce_tensors([t for g in grads for t in g], self.process_group), grads)
            updates = self._precondition(grads)
        params = [p for layer in self.signals.layers for p in layer.params]
        flat = [u.to(p.dtype) for upd, layer in zip(updates, self.signals.layers) for u, p in zip(upd, layer.params)]
        if self.process_group is not None and self.partial_updates and fisher_type != "mc":
            flat = all_reduce_tensors(flat, self.process_group)
        if self.model is None:
            return flat
        by_param = {id(p): u for p, u in zip(params, flat, strict=True)}
        return [by_param.get(id(p)) for p in self.model.parameters()]

    @property
    def parameter_space(self) -> bool:
        """Whether this Fisher's update of a given gradient is cheaper in parameter space than through
        its rows (Kronecker factors, unit blocks): then the backward loop preconditions ``.grad``
        (ρ > 0) instead of rebuilding the gradient from the rows, which costs two products per layer."""
        return False

    @property
    def coupled(self) -> bool:
        """Whether the model has BatchNorm in training mode (read with its batch statistics constant)."""
        return self.model is not None and has_training_batchnorm(self.model)

    def _true_gradient(self, y) -> list[Tensor | None]:
        """∇L of this rank's batch through autograd (an ordinary forward and backward pass), mean over
        the whole batch when distributed."""
        if self.inputs is None or y is None:
            raise ValueError("y: the gradient of a model with BatchNorm in training mode needs the batch's targets")
        params = [p for p in self.model.parameters() if p.requires_grad]
        with torch.enable_grad():
            f = self.model(self.inputs)
            f = f if f.ndim == 2 else f[:, None]
            loss = self.fisher.loss.value(f, self.fisher.loss.check_targets(y, f.detach()))
            grads = list(torch.autograd.grad(loss, params))
        if self.process_group is not None:
            grads = mean_gradient(grads, f.shape[0], self.process_group)
        by_id = {id(p): g for p, g in zip(params, grads)}
        return [by_id.get(id(p)) for p in self.model.parameters()]

    def loss_gradient(self) -> list[Tensor | None]:
        """∇L = J^T r / N of the batch's observed targets (after :meth:`natural_gradient`, or read by the
        backward loop), aligned with ``model.parameters()`` like :meth:`natural_gradient`."""
        if self.fisher.fisher_type == "mc":
            per_layer = self.gradient
        else:
            if self.fisher.fisher_type == "empirical":
                r = torch.ones(self.n, 1, dtype=self.solve_dtype, device=self.signals.f.device)
            elif self.observed is not None:
                r = self.rows.rhs(self.observed.to(self.solve_dtype))
            else:
                r = self.rows.rhs(self._last_residual)
            rows = slice(self.offset, self.offset + self.local.n)
            per_layer = [layer.transpose(r[rows] / self.n) for layer in self.local_rows]
        flat = [u for upd in per_layer for u in upd]
        if self.process_group is not None:
            flat = all_reduce_tensors(flat, self.process_group)
        pairs = zip((p for layer in self.signals.layers for p in layer.params), flat)
        by_param = {id(p): u for p, u in pairs}
        if self.model is None:
            return flat
        return [by_param.get(id(p)) for p in self.model.parameters()]

    def precondition(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """(G + ρI)^{-1} g for a gradient g aligned with ``model.parameters()`` (``None`` for frozen
        parameters), e.g. the ``.grad`` of a backward pass: needs ρ > 0 (Woodbury's identity in dual
        form) unless g lies in the rows' span. Returns the update aligned the same way."""
        if self.fisher.damping == 0:
            raise ValueError(
                "damping: preconditioning an arbitrary gradient needs damping > 0 (the zero-damping limit exists "
                "only for the loss's own gradient: use natural_gradient(y))"
            )
        by_param = {id(p): g for p, g in zip(self.model.parameters(), grads, strict=True)} if self.model else None
        per_layer = []
        for layer in self.signals.layers:
            if by_param is None:
                raise ValueError("precondition: this bound Fisher has no model; bind with fisher.at(model, x)")
            missing = [p for p in layer.params if by_param.get(id(p)) is None]
            if missing:
                raise ValueError(f"grads: {layer.name} has no gradient; call loss.backward() first")
            per_layer.append([by_param[id(p)].to(self.solve_dtype) for p in layer.params])
        updates = self._precondition(per_layer)
        pairs = ((p, u) for layer, upd in zip(self.signals.layers, updates) for p, u in zip(layer.params, upd))
        out = {id(p): u.to(p.dtype) for p, u in pairs}
        return [out.get(id(p)) for p in self.model.parameters()]

    def test_signals(self, x_test) -> Signals:
        if self.model is None:
            raise ValueError("x_test: this bound Fisher has no model; bind with fisher.at(model, x)")
        return model_signals(self.model, x_test, "x_test")

    def coefficient(self, x_test=None) -> Tensor:
        """Θ̄(x_test, x) = J(x_test) G^{-1} J(x)^T / N (S.4), Θ̄(x, x) without ``x_test``.

        Returns (N′, N) for one output, (N′, N, C, C) for C > 1, in ``solve_dtype``. ``x_test`` may be
        a batch or precomputed :class:`~natural_tangents.signals.Signals`; when distributed, the same
        test points on every rank (x is the sharded batch). With a singular output metric (no output
        damping) the columns are those of the range of Λ, where every residual lies.
        """
        if self.sampled:
            raise NotImplementedError(
                f"coefficient: Θ̄ is the paper's, of the expectation Fisher; fisher_type={self.fisher.fisher_type!r} "
                "estimates it. Bind the same Fisher with fisher_type='expectation' for Θ̄ and isotropy"
            )
        st = self.signals
        if x_test is not None:
            st = x_test if isinstance(x_test, Signals) else self.test_signals(x_test)
        t = self.rows.columns(self._coefficient(st.layers))
        return public_shape(t, st.n, self.n, self.c)

    def alpha_hat(self) -> float:
        """Empirical α̂ = tr(Θ̄(x, x) Λ) / (N·C) (Λ = I for MSE): the mean eigenvalue of Θ̄ for MSE,
        and the α of (S.167) for cross-entropy. ``lr="optimal"`` steps use η = 1/α̂. A sampled Fisher
        type estimates the expectation Fisher, whose scale it shares: its α̂ is the expectation's, on
        the same batch (C backward passes, once); read from its rows alone (in the backward loop), the
        sampled rows' own trace estimates it."""
        return self._alpha

    @cached_property
    def _alpha(self) -> float:
        if self.sampled and self.model is not None and self.inputs is not None:
            expectation = replace(self.fisher, fisher_type="expectation", damping=self.fisher.damping)
            return expectation.at(self.model, self.inputs, process_group=self.process_group).alpha_hat()
        return self._trace() / (self.n * self.c)  # tr(G^{-1} F) / (N·C) whatever the rows: the same estimate

    def isotropy(self) -> Isotropy:
        """Isotropy diagnostics of Θ̄(x, x): α̂ (mean eigenvalue), condition number, ||Θ̄/α̂ − I||₂."""
        return isotropy(self.coefficient())

    # ---------------------------------------------------------------- for subclasses
    @abstractmethod
    def _updates(self, r: Tensor) -> list[list[Tensor]]:
        """Per layer, the parameter updates for the rows' residual r̃ (N, R) (one tensor per parameter
        of the layer); with :attr:`partial_updates`, this rank's samples' part."""

    @abstractmethod
    def _precondition(self, grads: list[list[Tensor]]) -> list[list[Tensor]]:
        """(G + ρ I)^{-1} g for any gradient g (per layer, one tensor per parameter), ρ > 0: what the
        Monte-Carlo rows need, whose span does not hold the gradient (Woodbury's identity in dual form)."""

    @abstractmethod
    def _coefficient(self, test: tuple[LayerSignals, ...]) -> Tensor:
        """J(x′) (G + ρ I)^{-1} Ĵ^T / N for the test layers' signals, flat (N′·C′, N·R)."""

    def curvature_blocks(self) -> list:
        """This batch's curvature in parameter space, per layer
        (:class:`~natural_tangents.curvature.LayerCurvature`), for curvature kept across mini-batches."""
        raise ValueError(
            f"{self.fisher.label}: its dual system belongs to one batch and has no parameter-space form to keep across "
            "mini-batches; it stays per-batch: use curvature_every=1, inverse_every=1, ema=0, or nat.fisher.KFAC"
        )

    def _trace(self) -> float:
        """tr(Ĵ (G + ρ I)^{-1} Ĵ^T / N) = tr(Θ̄ Λ), for α̂."""
        return float(torch.diagonal(self._coefficient(self.row_signals)).sum())


class DualBatch(BoundFisher):
    """A batch of a Fisher whose update is Δθ_l = Ĵ_l^T X_l r̃ / N for per-layer N·R × N·R matrices
    X_l (the exact and layer-wise Fishers): Θ̄(x′, x) = Σ_l J_l(x′) Ĵ_l^T X_l / N. Distributed, each
    rank applies Ĵ_l^T to its own rows and the parts are summed (one fused all-reduce)."""

    partial_updates = True

    @abstractmethod
    def _dual_vectors(self, r: Tensor) -> list[Tensor]:
        """The per-layer dual vectors v_l = X_l r̃ (N·R,) for r̃ (N·R,), by solves."""

    @abstractmethod
    def _make_dual_matrices(self) -> list[Tensor]:
        """The X_l, (N·R, N·R) each (for Θ̄; from the same factorizations as the solves)."""

    @cached_property
    def dual_matrices(self) -> list[Tensor]:
        """The X_l of the batch, computed once (see :meth:`_make_dual_matrices`)."""
        return self._make_dual_matrices()

    def _updates(self, r: Tensor) -> list[list[Tensor]]:
        vs = self._dual_vectors(r.reshape(-1))
        rows = slice(self.offset, self.offset + self.local.n)
        out, last = [], (None, None)
        for layer, v_l in zip(self.local_rows, vs):
            v = last[1] if v_l is last[0] else v_l.reshape(self.n, self.r)[rows] / self.n
            last = (v_l, v)
            out.append(layer.transpose(v))
        return out

    def _row_products(self, grads: list[list[Tensor]]) -> list[Tensor]:
        """z_l = Ĵ_l g_l / N (N·R,) per layer."""
        return [(layer.jvp(g).to(self.solve_dtype) / self.n).reshape(-1) for layer, g in zip(self.row_signals, grads)]

    def _woodbury(self, grads: list[list[Tensor]], vs: list[Tensor]) -> list[list[Tensor]]:
        """u_l = (g_l − Ĵ_l^T v_l) / ρ, the last step of Woodbury's identity
        (ρ I + S^T W S / N)^{-1} g = (g − S^T v) / ρ with v = (W K + ρ I)^{-1} W S g / N."""
        rho = self.fisher.damping
        out = []
        for layer, g, v in zip(self.row_signals, grads, vs):
            back = layer.transpose(v.reshape(self.n, self.r))
            out.append([(gi - bi.to(gi.dtype)) / rho for gi, bi in zip(g, back)])
        return out

    def _coefficient(self, test: tuple[LayerSignals, ...]) -> Tensor:
        xs = self.dual_matrices
        if test is self.row_signals:
            cross = self.layer_kernels
        else:
            cross = [t.gram(row, self.solve_dtype) / self.n for t, row in zip(test, self.row_signals)]
        return sum(c @ x for c, x in zip(cross, xs))
