"""Reading a Fisher's rows during the user's own forward and backward passes (the
``loss = criterion(model(x), y); loss.backward(); opt.step()`` loop).

:class:`Capture` puts hooks on a model: forward hooks on the modules holding trainable parameters
record their inputs and outputs, and a forward hook on the model registers a hook on its output f.
When the user's backward pass reaches f, that hook receives ∂loss/∂f — from which the observed
residuals are r_n = N ∂loss/∂f_n for a loss that is the mean over the batch (PyTorch's default
reduction) — and, while the graph below f is still alive, runs one more backward pass from f batched
over the Fisher's rows (:func:`natural_tangents.models.read_layers`, ``retain_graph``): Λ^{1/2}
for the expectation (C rows), k sampled labels for Monte-Carlo, the observed residual for the
empirical Fisher. The layer kinds turn the recorded inputs and row gradients into
:class:`~natural_tangents.signals.Signals`, exactly as :func:`natural_tangents.models.signals` does
for ``opt.step(x, y)``; nothing is computed twice.

Forwards without grad (``torch.no_grad`` evaluation) are ignored; a forward whose backward never runs
is dropped at the next step; several forward/backward pairs before a step (gradient accumulation)
give one batch of all their samples.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import Tensor, nn

from .layers.batchnorm import BatchNormRows, in_rows_pass
from .models import hooked_modules, read_layers
from .signals import Signals

__all__ = ["Capture", "CapturedBatch"]


@dataclass
class CapturedBatch:
    """What one forward/backward pair left: the rows' signals and the observed residuals r (N, C)
    (``signals`` None for a pass whose outputs were not finite)."""

    signals: Signals | None
    residual: Tensor


@dataclass
class _Forward:
    """The records of one forward pass: each module's calls (args, kwargs, output), and the output f."""

    records: dict[int, list] = field(default_factory=dict)
    f: Tensor | None = None


class _Inert:
    """A hook that does nothing: what a copy or a pickle of the model gets in place of a capture hook."""

    def __call__(self, *args):
        return None


class _Hook:
    """A capture hook holding its :class:`Capture` weakly: the model's hooks do not keep an optimizer
    alive, and once the optimizer is gone they do nothing and are removed (:func:`weakref.finalize`).
    A deep copy or pickle of the model does not carry it (it becomes :class:`_Inert`): copying a
    model must not copy the optimizer reading it."""

    def __init__(self, fn) -> None:
        self.fn = weakref.WeakMethod(fn)

    def __call__(self, *args):
        fn = self.fn()
        return None if fn is None else fn(*args)

    def __deepcopy__(self, memo) -> _Inert:
        return _Inert()

    def __reduce__(self):
        return (_Inert, ())


class Capture:
    """Hooks reading a Fisher's rows from the user's forward and backward passes (module docstring).

    Args:
        model: the model (its modules holding trainable parameters are read).
        cotangents: (f, r) ↦ the rows' per-sample cotangents m (N, R, C), from the detached outputs
            f (N, C) and the observed residuals r (N, C).
        active: whether the next forward is to be read (e.g. only on the steps that refresh curvature).
        reduction: ``"mean"`` (r = N ∂loss/∂f, N all the samples read before the step: a loss that is
            the mean over them, also when accumulated over micro-batches as Σ_b mean_b / B) or
            ``"sum"`` (r = ∂loss/∂f).
        linear_in_residual: whether the cotangents are proportional to r (the empirical Fisher's): then
            the rows of a micro-batch are rescaled with r once the whole batch is known.
    """

    def __init__(
        self,
        model: nn.Module,
        cotangents: Callable[[Tensor, Tensor], Tensor],
        active: Callable[[], bool],
        reduction: str = "mean",
        linear_in_residual: bool = False,
        batch_statistics: str = "refuse",
    ) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction: expected 'mean' or 'sum', got {reduction!r}")
        self.model, self.cotangents, self.active, self.reduction = model, cotangents, active, reduction
        self.linear_in_residual = linear_in_residual
        self.modules = hooked_modules(model, batch_statistics)
        self.batches: list[CapturedBatch] = []
        self._pending: _Forward | None = None
        self._awaiting: list[_Forward] = []  # forwards whose backward pass has not reached f yet
        self._busy = False
        # training-mode BatchNorms first: their output while read is BatchNormRows (layers/batchnorm.py)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._handles = [m.register_forward_hook(_Hook(self._on_batchnorm)) for m in norms]
        self._handles += [m.register_forward_hook(_Hook(self._on_module), with_kwargs=True) for _, m in self.modules]
        self._handles.append(model.register_forward_hook(_Hook(self._on_output)))
        weakref.finalize(self, _remove, list(self._handles))

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> CapturedBatch | None:
        """The batch read since the last call (the micro-batches concatenated), or None. Forwards whose
        backward pass has not run by now are dropped."""
        batches, self.batches = self.batches, []
        for stale in self._awaiting:
            stale.f, stale.records = None, {}
        self._awaiting = []
        if not batches:
            return None
        if any(b.signals is None for b in batches):
            raise FloatingPointError(
                "model: its outputs (or the loss's gradient) were NaN or inf in the last backward pass (a diverged "
                "run: lower the learning rate or raise the damping, and restart from finite parameters)"
            )
        if len(batches) == 1:
            return batches[0]
        total = sum(b.residual.shape[0] for b in batches)
        if self.reduction == "mean":  # each micro-batch's r was N_b ∂loss/∂f: rescale to N ∂loss/∂f
            batches = [self._rescaled(b, total / b.residual.shape[0]) for b in batches]
        return CapturedBatch(Signals.cat([b.signals for b in batches]), torch.cat([b.residual for b in batches]))

    def _rescaled(self, batch: CapturedBatch, factor: float) -> CapturedBatch:
        signals = batch.signals
        if self.linear_in_residual:
            r = signals.layers[0].c if signals.layers else 1
            m = torch.eye(r, dtype=signals.f.dtype, device=signals.f.device).mul_(factor).expand(signals.n, r, r)
            signals = replace(signals, layers=tuple(layer.mix(m) for layer in signals.layers))
        return CapturedBatch(signals, batch.residual * factor)

    # ------------------------------------------------------------------ hooks
    def _reading(self) -> bool:
        """Whether this forward is read: grad enabled, not inside a torch.func transform (jacrev, vmap:
        the user's own derivatives), not during the rows' backward pass of any capture, and due."""
        return (
            not self._busy
            and not in_rows_pass()
            and torch.is_grad_enabled()
            and not torch._C._are_functorch_transforms_active()
            and self.active()
        )

    def _on_batchnorm(self, module, args, out):
        if module.training and self._reading():
            return BatchNormRows.apply(args[0], module.weight, module.bias, module.eps)
        return None

    def _on_module(self, module, args, kwargs, out) -> None:
        if not self._reading():
            return
        if self._pending is None or self._pending.f is not None:
            self._pending = _Forward()
        self._pending.records.setdefault(id(module), []).append((args, kwargs, out))

    def _on_output(self, model, args, f) -> None:
        pending, self._pending = self._pending, None
        if pending is None or not self._reading() or not isinstance(f, Tensor) or not f.requires_grad:
            return
        pending.f = f
        # The hook lives on f's autograd node, out of the garbage collector's sight, and holds the
        # forward (and this capture) weakly: a strong reference would close a cycle f → node →
        # hook → forward → f that is never collected, leaking every forward's activations. The
        # forwards awaiting their backward pass are held here instead, and dropped at the step.
        self._awaiting.append(pending)
        f.register_hook(partial(_fire, weakref.ref(self), weakref.ref(pending)))

    def _on_grad(self, pending: _Forward, grad: Tensor) -> None:
        if self._busy or in_rows_pass():  # the hook fires again for a rows' own backward pass from f
            return
        self._busy = True
        try:
            f = pending.f
            if f is None:  # a forward dropped at a step before its backward pass ran
                return
            if not (bool(torch.isfinite(f).all()) and bool(torch.isfinite(grad).all())):
                self.batches.append(CapturedBatch(None, grad.detach()))  # refused (or skipped) by the step
            else:
                self.batches.append(self._read(pending, grad))
        finally:
            self._busy = False
            pending.f, pending.records = None, {}
            self._awaiting = [p for p in self._awaiting if p is not pending]

    def _read(self, pending: _Forward, grad: Tensor) -> CapturedBatch:
        f = pending.f
        f2 = f if f.ndim == 2 else f[:, None]
        g2 = grad if grad.ndim == 2 else grad[:, None]
        n = f2.shape[0]
        residual = g2.detach() * (n if self.reduction == "mean" else 1.0)
        cotangents = self.cotangents(f2.detach(), residual)
        layers = read_layers(self.model, pending.records, f2, cotangents, retain_graph=True)
        last = list(self.model.parameters())[-1]
        signals = Signals(f=f2.detach(), layers=layers, frozen_output=not last.requires_grad)
        return CapturedBatch(signals, residual)


def _fire(capture: weakref.ref, pending: weakref.ref, grad: Tensor) -> None:
    """The hook on a read forward's output f: hands ∂loss/∂f to the capture, if both still exist."""
    cap, forward = capture(), pending()
    if cap is not None and forward is not None:
        cap._on_grad(forward, grad)


def _remove(handles: list) -> None:
    for h in handles:
        h.remove()
