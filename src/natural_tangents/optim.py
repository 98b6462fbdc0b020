"""Natural gradient descent as a ``torch.optim.Optimizer``: :class:`NGD`, with any Fisher, full-batch or
on mini-batches, from the batch (``opt.step(x, y)``) or from the user's own ``loss.backward()``.

    opt = nat.NGD(net, nat.fisher.BlockDiagonal(), lr="optimal")   # η = 1/α
    for _ in range(5):
        opt.step(x, y)

``NGD`` works as any torch optimizer: ``zero_grad``, ``state_dict``/``load_state_dict``, parameter
groups with their own learning rate, schedulers; :meth:`NGD.precondition` writes the natural
gradient into ``.grad`` so that any torch optimizer (SGD with momentum, Adam) can apply it. With
``process_group=`` (torch.distributed, e.g. under torchrun) every rank passes its own shard of the
batch and the model's replicated parameters receive the whole batch's update on every rank.
Gradient descent and the full-batch ``train`` loop of the paper's experiments are in
:mod:`natural_tangents.training`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch
from torch import Tensor, nn

from . import fisher as _fisher
from .capture import Capture
from .curvature import ParamView, RunningCurvature
from .distributed import check_group
from .fisher.base import Fisher
from .fisher.bound import BoundFisher
from .models import check_model, has_training_batchnorm, parameterized_modules
from .validation import check_lr, check_update, warn

__all__ = ["NGD", "OPTIMAL"]

#: ``lr="optimal"``: lr = 1 in units of 1/α̂ (see :class:`NGD`)
OPTIMAL = "optimal"


class NGD(torch.optim.Optimizer):
    """Natural gradient descent θ ← θ − η (G + ρI)^{-1} ∇L, full-batch or on mini-batches.

    Two ways to use it::

        opt.step(x, y)                                   # the optimizer reads the batch itself

        loss = criterion(model(x), y); loss.backward()    # the usual PyTorch loop: the Fisher's rows are
        opt.step()                                        # read by hooks on that forward and backward

    Args:
        model: a :class:`~natural_tangents.MLP` or any supported ``nn.Module``.
        fisher: a :mod:`natural_tangents.fisher` instance or name (``"exact"``, ``"kfac"``, …).
        lr: a positive number, or ``"optimal"`` (the same as ``lr=1.0, lr_unit="alpha"``).
        param_groups: optional torch-style groups (dicts with ``"params"`` and optionally ``"lr"``
            and ``"lr_unit"``) over ``model.parameters()``; parameters in no group are not updated.
            The rule: the Fisher's coordinates are the model's trainable parameters
            (``requires_grad=True``), whether or not a group lists them, so the natural gradient is
            that of all trainable parameters together (the Fisher couples them); a group applies its
            own block of it with its own rate. Frozen parameters (``requires_grad=False``) are not
            coordinates and never move, even when a group lists them.
        process_group: a torch.distributed group for data parallelism (each rank passes its shard
            of the batch to ``step(x, y)``; every rank applies the whole batch's update), or ``None``.
        lr_unit: ``"absolute"`` (η = lr) or ``"alpha"``: η = lr / α̂ with α̂ this Fisher's isotropy
            constant measured once, at the first step (kept in the group as ``"alpha"`` and saved
            with ``state_dict``). The scale of the natural gradient differs between Fishers by α
            (1 for the exact Fisher, L block-diagonal, N·L K-FAC, …), so ``lr_unit="alpha"`` makes
            one value of ``lr`` mean the same for every Fisher; lr = 1 is the paper's one-step rate.
            ``group["lr"]`` is always a number, so torch's learning-rate schedulers scale it.
        nonfinite: what a step does when the model's outputs or the update are not finite (a
            diverged run, a NaN parameter): ``"raise"`` (default, FloatingPointError naming the
            cause) or ``"skip"`` (the parameters stay as they are and a RuntimeWarning says so).
            A non-finite update is never applied.
        curvature_every, inverse_every, ema: curvature kept across mini-batches
            (:mod:`natural_tangents.curvature`; K-FAC, unit-wise and the block-diagonal Fisher of
            small layers): the curvature is read every ``curvature_every`` steps into a running
            average with decay ``ema`` and inverted every ``inverse_every`` steps (default:
            ``curvature_every``); the steps between precondition the gradient with the inverses
            kept. With the defaults (1, 1, 0) every step uses its own batch's Fisher, in dual form.
        kl_clip: a trust region on the update: the step is scaled by
            min(1, sqrt(kl_clip / Σ η² u·g)) (u the natural gradient, g the gradient: η² u·g is
            the step's KL divergence to second order). None: no clipping.
        warmup: the rate grows linearly over the first ``warmup`` steps.
        loss_reduction: in the backward loop, how the loss sums its samples: ``"mean"`` (PyTorch's
            default; the observed residuals are N ∂loss/∂f) or ``"sum"``.
        seed: the seed of the Monte-Carlo labels (``fisher_type="mc"``); their generator's state is
            saved with ``state_dict``.

    In the backward loop the expectation and empirical Fishers precondition the loss's gradient
    J^T r / N, read at the model's output, as ``opt.step(x, y)`` does; the Monte-Carlo Fisher and the
    curvature kept across mini-batches precondition ``.grad``. A factorization that fails (a damped
    system not positive definite in its precision) is retried with ten times the damping, with a
    warning, up to five times.

    An unsupported model or layer is rejected here, before anything is computed (``TypeError`` or
    ``NotImplementedError`` naming the module; see :mod:`natural_tangents.models`).
    """

    def __init__(
        self,
        model: nn.Module,
        fisher: Fisher | str = "exact",
        lr: float | str = 1.0,
        param_groups: list[dict] | None = None,
        process_group=None,
        *,
        lr_unit: str = "absolute",
        nonfinite: str = "raise",
        curvature_every: int = 1,
        inverse_every: int | None = None,
        ema: float = 0.0,
        kl_clip: float | None = None,
        warmup: int = 0,
        loss_reduction: str = "mean",
        seed: int | None = None,
    ) -> None:
        lr, lr_unit = _lr_and_unit(lr, lr_unit)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite: expected 'raise' or 'skip', got {nonfinite!r}")
        inverse_every = curvature_every if inverse_every is None else inverse_every
        for name, value in (("curvature_every", curvature_every), ("inverse_every", inverse_every)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}: expected a positive number of steps, got {value!r}")
        if int(warmup) != warmup or warmup < 0:
            raise ValueError(f"warmup: expected a number of steps >= 0, got {warmup!r}")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip: expected a positive number or None, got {kl_clip!r}")
        fisher = _fisher.get(fisher)
        check_model(model, fisher.batch_statistics)  # an unsupported model or layer fails here, before anything runs
        fisher.check_batch_statistics(model)
        if process_group is not None:
            check_group(process_group)
        self.model = model
        self._params = list(model.parameters())  # the model's parameters, in order (read once)
        self.fisher = fisher
        self.process_group = process_group
        self.nonfinite = nonfinite
        self.curvature_every, self.inverse_every = int(curvature_every), int(inverse_every)
        self.kl_clip, self.warmup = kl_clip, int(warmup)
        self.amortized = self.curvature_every > 1 or self.inverse_every > 1 or ema > 0
        split = getattr(self.fisher, "damping_split", "paper")
        self.curvature = (
            RunningCurvature(ema, self.fisher.damping, split, self.fisher.solve_dtype) if self.amortized else None
        )
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,))))
        #: the solver routes of the last step (factorizations, refined or direct solves), a Counter
        self.last_routes: Counter = Counter()
        groups = param_groups if param_groups is not None else [{"params": list(model.parameters())}]
        super().__init__(groups, {"lr": lr, "lr_unit": lr_unit})
        self.state["ngd"] = {"step": 0}
        self._own_pass = False
        linear = self.fisher.fisher_type == "empirical"
        self.capture = Capture(
            model,
            self._cotangents,
            self._curvature_due,
            loss_reduction,
            linear_in_residual=linear,
            batch_statistics=self.fisher.batch_statistics,
        )
        if self.amortized:
            self.fisher.check_amortizable(len(parameterized_modules(model, self.fisher.batch_statistics)))

    @classmethod
    def recommended(
        cls,
        model: nn.Module,
        lr: float = 0.1,
        *,
        damping: float = 1e-2,
        loss: str = "cross_entropy",
        batch_statistics: str | None = None,
        **options,
    ) -> NGD:
        """The recommended settings for training on mini-batches in the loop
        ``loss.backward(); opt.step()``: K-FAC with the Monte-Carlo Fisher (one sampled label per
        input) and the Fisher's own output factor, curvature read every 10 steps into a running
        average (decay 0.95) and inverted every 10, the step clipped to a KL trust region of 10⁻³,
        lr in units of 1/α̂ (so the same lr serves another Fisher or model). ``options`` override any
        keyword of :class:`NGD` (e.g. ``seed``, ``process_group``, ``curvature_every``).
        ``batch_statistics``: None holds a training-mode BatchNorm's batch statistics constant for
        the curvature (``"constant"``, an approximation: docs/user_models.md) when the model has one.

        Every lr from 0.03 to 1 trained the benchmark's CNNs (docs/time_to_accuracy.md): the
        trust region, not lr, bounds the early steps; without it the same runs diverged.
        """
        if batch_statistics is None:
            batch_statistics = "constant" if has_training_batchnorm(model) else "refuse"
        fisher = _fisher.KFAC(
            damping=damping, loss=loss, fisher_type="mc", output_factor="fisher", batch_statistics=batch_statistics
        )
        settings = {"lr_unit": "alpha", "curvature_every": 10, "inverse_every": 10, "ema": 0.95, "kl_clip": 1e-3}
        settings.update(options)
        return cls(model, fisher, lr=lr, **settings)

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the parameters must belong to the model,
        ``lr`` must be a positive number or ``"optimal"`` and ``lr_unit`` ``"absolute"`` or ``"alpha"``."""
        group = dict(param_group)
        if "lr" in group:
            group["lr"], group["lr_unit"] = _lr_and_unit(group["lr"], group.get("lr_unit", self.defaults["lr_unit"]))
        owned = {id(p) for p in self.model.parameters()}
        params = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        if any(id(p) not in owned for p in params):
            raise ValueError("param_groups: every parameter must belong to `model`")
        super().add_param_group(group)
        last = self.param_groups[-1]
        _lr_and_unit(last["lr"], last["lr_unit"])

    # ------------------------------------------------------------------ batches
    @property
    def steps(self) -> int:
        """The number of steps taken (saved with ``state_dict``)."""
        return int(self.state["ngd"]["step"])

    def _curvature_due(self) -> bool:
        """Whether the next backward pass is to be read: not during the optimizer's own passes, and
        with curvature kept across mini-batches only on the steps that refresh it."""
        return not self._own_pass and (not self.amortized or self.steps % self.curvature_every == 0)

    def _cotangents(self, f: Tensor, r: Tensor) -> Tensor:
        return self.fisher.cotangents(f, r, self.generator)

    def bind(self, x, y=None) -> BoundFisher:
        """The Fisher bound to the batch ``x`` (this rank's shard when distributed); the sampled Fisher
        types read the targets ``y`` there too."""
        self._own_pass = True
        try:
            kw = {} if self.fisher.fisher_type == "expectation" else {"y": y, "generator": self.generator}
            return self.fisher.at(self.model, x, process_group=self.process_group, **kw)
        finally:
            self._own_pass = False

    def learning_rates(self, batch: BoundFisher | Tensor) -> list[float]:
        """Each group's η: ``lr``, or ``lr / α̂`` for ``lr_unit="alpha"``, with α̂ measured on
        ``batch`` (a bound Fisher or the inputs) once and kept in the group as ``"alpha"``."""
        if any(g["lr_unit"] == "alpha" and g.get("alpha") is None for g in self.param_groups):
            bound = batch if isinstance(batch, BoundFisher) else self.bind(batch)
            alpha = bound.alpha_hat()
            for g in self.param_groups:
                if g["lr_unit"] == "alpha" and g.get("alpha") is None:
                    g["alpha"] = alpha
        return [float(g["lr"]) / (g["alpha"] if g["lr_unit"] == "alpha" else 1.0) for g in self.param_groups]

    def natural_gradient(self, x, y) -> list[Tensor]:
        """(G + ρI)^{-1} ∇L at (x, y), aligned with ``model.parameters()``."""
        return self.bind(x, y).natural_gradient(y)

    @torch.no_grad()
    def precondition(self, x, y) -> None:
        """Write the natural gradient into each trainable parameter's ``.grad`` (for any torch
        optimizer); frozen parameters keep theirs. A non-finite natural gradient raises."""
        grads = self.natural_gradient(x, y)
        check_update(self.model, grads)
        for p, g in zip(self.model.parameters(), grads, strict=True):
            if g is not None:
                p.grad = g.to(p.dtype).clone()

    # ------------------------------------------------------------------ steps
    def step(self, x=None, y=None) -> bool:  # type: ignore[override]
        """One NGD step: on the batch (x, y), or — without arguments — from the ``.grad`` and the
        curvature read during the last ``loss.backward()``. Frozen parameters never move. Returns
        whether the step was applied (False only for a step skipped under ``nonfinite="skip"``)."""
        if x is not None and y is None:
            raise ValueError("y: step(x, y) needs the targets of the batch (or call step() after loss.backward())")
        try:
            if x is None:
                batch, updates = self._from_backward()
            elif self.amortized or has_training_batchnorm(self.model):
                batch, updates = self._through_backward(x, y)
            else:
                batch, updates = self._retrying(lambda damping: self._on_batch(x, y, damping))
            lrs = self.learning_rates(batch) if batch is not None else self._known_rates()
            check_update(self.model, updates)
            grads = None
            if self.kl_clip is not None:
                grads = self._gradients() if x is None or self.amortized else batch.loss_gradient()
        except FloatingPointError as err:
            if self.nonfinite == "raise":
                raise
            warn(f"NGD step skipped, the parameters are unchanged: {err}", RuntimeWarning)
            return False
        self._apply(updates, lrs, grads)
        return True

    def _with_damping(self, damping: float) -> Fisher:
        """The Fisher with another damping (a factorization retried), kept for the following steps."""
        if damping != self.fisher.damping:
            self.fisher = replace(self.fisher, damping=damping)
        return self.fisher

    def _on_batch(self, x, y, damping: float) -> tuple[BoundFisher, list[Tensor | None]]:
        """The batch bound and its natural gradient (its factorizations made here, where a failure is
        caught by :meth:`_retrying`)."""
        self._with_damping(damping)
        bound = self.bind(x, y)
        self.last_routes = bound.routes
        return bound, bound.natural_gradient(y)

    def _retrying(self, attempt):
        """``attempt(damping)``, retried with ten times the damping (five times at most, with a warning)
        when a damped system is not positive definite in its precision."""
        damping = self.fisher.damping
        for tries in range(6):
            try:
                return attempt(damping)
            except (ValueError, torch.linalg.LinAlgError) as err:
                if "positive definite" not in str(err) and not isinstance(err, torch.linalg.LinAlgError):
                    raise
                if tries == 5 or damping == 0:
                    raise
                new = damping * 10.0
                warn(
                    f"NGD: a factorization failed ({err}); retrying with damping {new:g} (was {damping:g})",
                    RuntimeWarning,
                )
                damping = new
        raise AssertionError  # unreachable

    def _gradients(self) -> list[Tensor | None]:
        grads = [p.grad if p.requires_grad else None for p in self._params]
        missing = [name for (name, p), g in zip(self.model.named_parameters(), grads) if p.requires_grad and g is None]
        if missing:
            raise ValueError(
                f"{missing[0]}: no gradient; call loss.backward() before opt.step() (or pass the batch: opt.step(x, y))"
            )
        return grads

    def _from_backward(self) -> tuple[BoundFisher | None, list[Tensor | None]]:
        """The update from ``.grad`` and the rows read during the last backward pass."""
        captured = self.capture.take()
        grads = self._gradients()
        if self.amortized:
            return self._amortized_step(captured, grads)
        if captured is None:
            raise ValueError(
                "loss: no backward pass through the model was read since the last step; run "
                "loss = criterion(model(x), y); loss.backward() (with grad enabled) before opt.step()"
            )

        def attempt(damping: float):
            fisher = self._with_damping(damping)
            batch = fisher.bind(captured.signals, self.model, observed=captured.residual)
            self.last_routes = batch.routes
            if fisher.fisher_type == "mc" or batch.coupled:  # .grad is outside the rows' span
                return batch, batch.precondition(grads)
            if batch.parameter_space and damping > 0:  # .grad is the rows' gradient: no need to rebuild it
                return batch, batch.precondition(grads)
            return batch, batch.natural_gradient()

        return self._retrying(attempt)

    def _through_backward(self, x, y) -> tuple[BoundFisher | None, list[Tensor | None]]:
        """``step(x, y)`` with curvature kept across batches, or of a model with BatchNorm in training
        mode (whose gradient is not a Gram's): an ordinary forward and backward of the Fisher's loss
        (read by the hooks), then the backward loop's step."""
        with torch.enable_grad():
            self.model.zero_grad(set_to_none=True)
            f = self.model(x)
            f = f if f.ndim == 2 else f[:, None]
            self.fisher.loss.value(f, self.fisher.loss.check_targets(y, f.detach())).backward()
        return self._from_backward()

    def _amortized_step(self, captured, grads) -> tuple[BoundFisher | None, list[Tensor | None]]:
        batch = None
        if self.steps % self.curvature_every == 0:
            if captured is None:
                raise ValueError(
                    "loss: this step refreshes the curvature, but no backward pass through the model was read since "
                    "the last step; run loss.backward() (with grad enabled) before opt.step()"
                )
            batch = self.fisher.bind(captured.signals, self.model, observed=captured.residual)
            self.curvature.update(batch.curvature_blocks(), batch.signals.layers)
        if self.steps % self.inverse_every == 0 or not self.curvature.ready:
            self._retrying(lambda damping: self.curvature.invert(damping))
        by_id = self.curvature.precondition({id(p): g for p, g in zip(self._params, grads) if g is not None})
        return batch, [by_id.get(id(p)) for p in self._params]

    def _known_rates(self) -> list[float]:
        if any(g["lr_unit"] == "alpha" and g.get("alpha") is None for g in self.param_groups):
            raise ValueError("lr_unit: α̂ is measured on a step that reads the curvature; the first step must")
        return [float(g["lr"]) / (g["alpha"] if g["lr_unit"] == "alpha" else 1.0) for g in self.param_groups]

    @torch.no_grad()
    def _apply(self, updates: list[Tensor | None], lrs: list[float], grads: list[Tensor | None] | None) -> None:
        """θ ← θ − η s u per group, s the warm-up and KL-clipping scale (``grads``: the gradient for the latter)."""
        t = self.steps
        scale = min(1.0, (t + 1) / self.warmup) if self.warmup else 1.0
        params = self._params
        ng = {id(p): u for p, u in zip(params, updates, strict=True)}
        if self.kl_clip is not None:
            gs = {id(p): g for p, g in zip(params, grads, strict=True)}
            vg = 0.0
            for group, lr in zip(self.param_groups, lrs):
                for p in group["params"]:
                    u, g = ng[id(p)], gs[id(p)]
                    if u is not None and g is not None:
                        vg += (lr * scale) ** 2 * float((u.double() * g.double()).sum())
            if vg > 0:
                scale *= min(1.0, (self.kl_clip / vg) ** 0.5)
        for group, lr in zip(self.param_groups, lrs):
            for p in group["params"]:
                if ng[id(p)] is not None:
                    p.add_(ng[id(p)].to(p.dtype), alpha=-lr * scale)
        self.state["ngd"]["step"] = t + 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """As torch's, with the step count, the Monte-Carlo generator's state and the curvature kept
        across mini-batches (running averages and inverses)."""
        self.state["ngd"]["generator"] = self.generator.get_state()
        if self.curvature is not None and self.curvature.stats:
            index = {id(p): i for i, p in enumerate(self.model.parameters())}
            self.state["ngd"]["curvature"] = {
                **self.curvature.state(),
                "views": [
                    ([index[id(p)] for p in v.params], v.rows, v.affine, v.has_weight, v.has_bias)
                    for v in self.curvature.views
                ],
            }
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        ngd = self.state["ngd"]
        if "generator" in ngd:
            self.generator.set_state(ngd["generator"])
        if "curvature" in ngd and self.curvature is not None:
            params = list(self.model.parameters())
            saved = ngd["curvature"]
            views = [ParamView(tuple(params[i] for i in idx), *rest) for idx, *rest in saved["views"]]
            self.curvature.load(saved, views)


def _lr_and_unit(lr, unit: str) -> tuple[float, str]:
    """``lr`` as a number and its unit; ``"optimal"`` is lr 1 in units of 1/α̂."""
    if unit not in ("absolute", "alpha"):
        raise ValueError(f"lr_unit: expected 'absolute' (η = lr) or 'alpha' (η = lr / α̂), got {unit!r}")
    lr = check_lr(lr)
    return (1.0, "alpha") if lr == OPTIMAL else (lr, unit)


def _lr_and_unit(lr, unit: str) -> tuple[float, str]:
    """``lr`` as a number and its unit; ``"optimal"`` is lr 1 in units of 1/α̂."""
    if unit not in ("absolute", "alpha"):
        raise ValueError(f"lr_unit: expected 'absolute' (η = lr) or 'alpha' (η = lr / α̂), got {unit!r}")
    lr = check_lr(lr)
    return (1.0, "alpha") if lr == OPTIMAL else (lr, unit)
