"""The interface every Fisher approximation shares: a frozen configuration (:class:`Fisher`), bound
to a batch as a :class:`~natural_tangents.fisher.bound.BoundFisher` subclassed by each Fisher.

Notation (docs/conventions.md). N samples, C outputs; function-space vectors are (N, C) and flatten
sample-major to length N·C. J is the (N·C, P) Jacobian, never formed; Θ = J J^T / N and the
per-layer Θ_l = J_l J_l^T / N come from the layers' signals (:mod:`natural_tangents.layers`). The
loss enters through r (∇L = J^T r / N) and the output metric Λ (G = J^T Λ J / N + ρ I; Λ = I for
MSE), and every Fisher works on the rows Ĵ = Λ^{1/2} J (:mod:`.rows`), so that Λ never needs an
inverse.

A Fisher is a small frozen configuration (damping, loss, options). ``fisher.at(model, x)`` binds it
to a batch: the bound Fisher (:mod:`natural_tangents.fisher.bound`) computes the batch's signals
once and each factorization once, as typed cached properties, and answers ``natural_gradient(y)``,
``coefficient(x_test=None)``, ``alpha_hat()`` and ``isotropy()`` from them, in any order.

The Fisher's own methods (``fisher.natural_gradient(model, x, y)`` …) bind and ask in one call.
``damping = 0`` is the zero-damping limit ρ → 0⁺, computed with pseudo-inverses (S.90, S.135).
With ``process_group=`` the batch is sharded over the ranks (see :mod:`natural_tangents.distributed`).
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from .. import losses as _losses
from ..distributed import gather_batch
from ..linalg.options import SolverOptions
from ..models import has_training_batchnorm
from ..models import signals as model_signals
from ..signals import Signals
from ..validation import check_damping
from .bound import BoundFisher, Isotropy
from .rows import Rows

__all__ = ["Fisher", "FISHER_TYPES"]

#: the Fisher types every Fisher offers (see :class:`Fisher`)
FISHER_TYPES = ("expectation", "mc", "empirical")


@dataclass(frozen=True, kw_only=True)
class Fisher(ABC):
    """Base class of the Fisher approximations (see the module docstring).

    Args:
        damping: ρ ≥ 0 added as ρ I (for K-FAC, to each Kronecker factor). 0 is the ρ → 0⁺ limit.
        loss: ``"mse"`` (default), ``"cross_entropy"`` or a :class:`natural_tangents.losses.Loss`.
        solve_dtype: precision of the N × N (dual) algebra; float64 by default, float32 for speed.
            The O(N P) products stay in the model's dtype.
        options: the routes and sizes of the fast linear algebra
            (:class:`~natural_tangents.linalg.SolverOptions`); none changes the result beyond rounding.
        fisher_type: which Fisher of the loss (docs/fisher_types.md). ``"expectation"`` (default):
            the paper's, the expectation over the model's output distribution, G = J^T Λ J / N; its
            theory (α, Θ̄, the closed-form dynamics) is the paper's. ``"mc"``: a Monte-Carlo estimate,
            ``mc_samples`` labels drawn per input from the model's predictive distribution, rows
            r̂^T J (k backward passes instead of C); needs damping > 0, since the gradient has a
            component outside the sampled rows that (G + ρ I)^{-1} scales by 1/ρ. ``"empirical"``:
            the observed labels' gradients, rows r^T J (no extra backward pass); it estimates G only
            at a well-fitted model.
        mc_samples: k, the labels drawn per input for ``fisher_type="mc"``.
        batch_statistics: a model with BatchNorm in training mode has no per-sample Jacobian (the
            batch statistics couple the samples): ``"refuse"`` it (default), or hold the statistics
            ``"constant"`` for the curvature — the approximation of the K-FAC libraries
            (:mod:`natural_tangents.layers.batchnorm`), for the Fishers with a parameter-space form
            and the sampled types; the gradient preconditioned stays the true one (damping > 0).
    """

    damping: float = 0.0
    loss: _losses.Loss | str = field(default="mse")
    solve_dtype: torch.dtype = torch.float64
    options: SolverOptions = field(default_factory=SolverOptions, repr=False)
    fisher_type: str = "expectation"
    mc_samples: int = 1
    batch_statistics: str = "refuse"

    name: ClassVar[str] = "fisher"
    label: ClassVar[str] = "Fisher"
    aliases: ClassVar[tuple[str, ...]] = ()
    #: the class of this Fisher bound to a batch
    batch_type: ClassVar[type[BoundFisher]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "damping", check_damping(self.damping))
        object.__setattr__(self, "loss", _losses.get(self.loss))
        if self.solve_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solve_dtype: expected torch.float32 or torch.float64, got {self.solve_dtype}")
        if not isinstance(self.options, SolverOptions):
            raise ValueError(f"options: expected a nat.linalg.SolverOptions, got {type(self.options).__name__}")
        if self.fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type: expected one of {FISHER_TYPES}, got {self.fisher_type!r}")
        if int(self.mc_samples) != self.mc_samples or self.mc_samples < 1:
            raise ValueError(f"mc_samples: expected a positive integer, got {self.mc_samples!r}")
        if self.batch_statistics not in ("refuse", "constant"):
            raise ValueError(f"batch_statistics: expected 'refuse' or 'constant', got {self.batch_statistics!r}")
        if self.batch_statistics == "constant" and self.damping == 0:
            raise ValueError(
                "damping: batch_statistics='constant' preconditions the true gradient, which lies outside the rows "
                "with constant statistics: use damping > 0"
            )
        if self.fisher_type == "mc" and self.damping == 0:
            raise ValueError(
                "damping: fisher_type='mc' needs damping > 0: the gradient has a component outside the sampled "
                "rows, which (G + ρI)^{-1} scales by 1/ρ (no zero-damping limit); use damping > 0 or "
                "fisher_type='expectation'"
            )

    #: whether the Fisher has a parameter-space form that can be kept across mini-batches
    amortizable: ClassVar[bool] = True

    def check_amortizable(self, depth: int) -> None:
        """Raise ValueError, saying why and what to use, if this Fisher cannot keep its curvature
        across mini-batches for a model of ``depth`` layers."""
        if not self.amortizable:
            raise ValueError(
                f"{self.label}: its dual system belongs to one batch and has no parameter-space form to keep across "
                "mini-batches; it stays per-batch: use curvature_every=1, inverse_every=1, ema=0, or nat.fisher.KFAC"
            )

    # ----------------------------------------------------------------- binding
    def at(self, model, x, *, y=None, process_group=None, generator: torch.Generator | None = None) -> BoundFisher:
        """This Fisher bound to the batch ``x`` of ``model`` (signals computed once).

        ``y``: the targets, needed here by the sampled Fisher types (``"mc"`` and ``"empirical"``, whose
        rows and gradient are read in the same pass); the expectation takes them in
        :meth:`BoundFisher.natural_gradient`. ``generator`` draws the Monte-Carlo labels.

        With ``process_group`` (torch.distributed), ``x`` is this rank's shard; the bound Fisher holds
        the whole batch (the shards concatenated in rank order) and every answer is the whole batch's,
        identical on every rank.
        """
        self.check_batch_statistics(model)
        if self.fisher_type == "expectation":
            read = partial(model_signals, batch_statistics=self.batch_statistics)
        else:
            read = self._sampled_reader(y, generator)
        if process_group is None:
            return self.batch_type(self, read(model, x), model, inputs=x)
        local, full, offset = gather_batch(model, x, process_group, read)
        return self.batch_type(self, full, model, process_group, local=local, offset=offset, inputs=x)

    def _sampled_reader(self, y, generator):
        """Reads the rows of a sampled Fisher type in one pass: for ``"empirical"`` the row r_n^T J_n
        of the observed residual; for ``"mc"`` the k rows r̂_{n,s}^T J_n / √k of sampled labels and,
        last, the observed row (which gives the gradient J^T r / N)."""
        if y is None:
            raise ValueError(
                f"y: fisher_type={self.fisher_type!r} reads its rows with the targets; pass fisher.at(model, x, y=y)"
            )
        loss, k = self.loss, int(self.mc_samples)

        def cotangents(f: Tensor) -> Tensor:
            r = loss.residual(f, loss.check_targets(y, f))[:, None, :]  # (N, 1, C)
            if self.fisher_type == "empirical":
                return r
            return torch.cat([loss.sample_residuals(f, k, generator) / k**0.5, r], 1)

        return lambda model, x: model_signals(model, x, cotangents=cotangents, batch_statistics=self.batch_statistics)

    def check_batch_statistics(self, model) -> None:
        """Refuse a training-mode BatchNorm unless ``batch_statistics="constant"`` and this Fisher has a
        parameter-space form or samples its rows (the exact per-batch Fisher of a coupled batch is not
        a Gram of per-sample rows)."""
        if self.batch_statistics != "constant" or not has_training_batchnorm(model):
            return
        if not self.amortizable and self.fisher_type == "expectation":
            raise NotImplementedError(
                f"{self.label}: the model has BatchNorm in training mode; the batch statistics held constant are an "
                "approximation for the Fishers with a parameter-space form (KFAC, Unitwise, BlockDiagonal) and the "
                "sampled types (fisher_type='mc' or 'empirical'), not for this exact per-batch Fisher"
            )

    def bind(self, signals: Signals, model=None, *, observed: Tensor | None = None) -> BoundFisher:
        """This Fisher bound to precomputed signals of a batch; with ``observed`` (the residuals r (N, C)),
        the signals are this Fisher's rows already (read by :class:`~natural_tangents.capture.Capture`)."""
        return self.batch_type(self, signals, model, observed=observed)

    def cotangents(self, f: Tensor, r: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The rows' per-sample cotangents m (N, R, C) from the outputs f and the observed residuals r:
        Λ^{1/2} (the expectation), k sampled residuals r̂ / √k (Monte-Carlo), r (empirical)."""
        if self.fisher_type == "empirical":
            return r[:, None, :]
        if self.fisher_type == "mc":
            return self.loss.sample_residuals(f, int(self.mc_samples), generator) / int(self.mc_samples) ** 0.5
        lam = self.loss.output_fisher(f)
        if lam is None:
            return torch.eye(f.shape[1], dtype=f.dtype, device=f.device).expand(f.shape[0], -1, -1)
        return Rows.expectation(lam).mixing

    # ----------------------------------------------------------------- one-call interface
    def natural_gradient(self, model, x, y, *, process_group=None) -> list[Tensor | None]:
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
