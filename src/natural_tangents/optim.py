"""Full-batch training: natural gradient descent with any Fisher, plain gradient descent, and a
``train`` loop that records what the paper's figures plot.

    opt = nat.NGD(net, nat.fisher.BlockDiagonal(), lr="optimal")   # η = 1/α
    for _ in range(5):
        opt.step(x, y)

``NGD`` is a ``torch.optim.Optimizer``: ``zero_grad``, ``state_dict``/``load_state_dict`` and
parameter groups with their own learning rate work as usual, and :meth:`NGD.precondition` writes
the natural gradient into ``.grad`` so that any torch optimizer (SGD with momentum, Adam) can apply it.
Each step binds the Fisher to the batch once (:meth:`natural_tangents.fisher.Fisher.at`): one
computation of the signals and one factorization serve both α̂ (for ``lr="optimal"``) and the update.

With ``process_group=`` (torch.distributed, e.g. under torchrun) every rank passes its own shard of
the batch and the model's replicated parameters receive the whole batch's update on every rank.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import fisher as _fisher
from . import losses as _losses
from .distributed import check_group
from .fisher.base import BoundFisher, Fisher
from .models import check_model
from .validation import check_lr, check_update, warn

__all__ = ["NGD", "GD", "History", "train", "optimal_lr"]

_OPTIMAL = "optimal"


def optimal_lr(method: Fisher | str, model: nn.Module, x: Tensor, *, process_group=None) -> float:
    """η for ``lr="optimal"``: 1/α̂ for a Fisher (α̂ measured on the batch at the current
    parameters; one step then solves the linearized problem when Θ̄ = α I), and for ``"gd"``
    1/λ_max of Θ = J J^T / N: the largest rate at which every eigen-direction of the linearized
    residual contracts monotonically (1 − ηλ ∈ [0, 1)). Rates up to 2/λ_max are stable for the
    linear model only; at finite width they diverge once λ_max moves."""
    if isinstance(method, str) and method.lower() == "gd":
        theta = _fisher.Exact().at(model, x, process_group=process_group).layer_kernels.sum(0)
        return 1.0 / float(torch.linalg.eigvalsh(theta)[-1])
    return 1.0 / _fisher.get(method).alpha_hat(model, x, process_group=process_group)


class NGD(torch.optim.Optimizer):
    """Full-batch natural gradient descent θ ← θ − η (G + ρI)^{-1} ∇L.

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
            of the batch; every rank applies the whole batch's update), or ``None`` (one process).
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
    ) -> None:
        lr, lr_unit = _lr_and_unit(lr, lr_unit)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite: expected 'raise' or 'skip', got {nonfinite!r}")
        check_model(model)  # an unsupported model or layer fails here, before anything is computed
        if process_group is not None:
            check_group(process_group)
        self.model = model
        self.fisher = _fisher.get(fisher)
        self.process_group = process_group
        self.nonfinite = nonfinite
        #: the solver routes of the last step (factorizations, refined or direct solves), a Counter
        self.last_routes: Counter = Counter()
        groups = param_groups if param_groups is not None else [{"params": list(model.parameters())}]
        super().__init__(groups, {"lr": lr, "lr_unit": lr_unit})

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

    def bind(self, x) -> BoundFisher:
        """The Fisher bound to the batch ``x`` (this rank's shard when distributed)."""
        return self.fisher.at(self.model, x, process_group=self.process_group)

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
        return self.bind(x).natural_gradient(y)

    @torch.no_grad()
    def precondition(self, x, y) -> None:
        """Write the natural gradient into each trainable parameter's ``.grad`` (for any torch
        optimizer); frozen parameters keep theirs. A non-finite natural gradient raises."""
        grads = self.natural_gradient(x, y)
        check_update(self.model, grads)
        for p, g in zip(self.model.parameters(), grads, strict=True):
            if g is not None:
                p.grad = g.to(p.dtype).clone()

    @torch.no_grad()
    def step(self, x, y) -> bool:  # type: ignore[override]
        """One NGD step on the batch (x, y): signals and factorizations computed once. Frozen
        parameters (``requires_grad=False``) never move. Returns whether the step was applied
        (False only for a step skipped under ``nonfinite="skip"``)."""
        try:
            bound = self.bind(x)
            grads = bound.natural_gradient(y)
            lrs = self.learning_rates(bound)
            self.last_routes = bound.routes
            check_update(self.model, grads)
        except FloatingPointError as err:
            if self.nonfinite == "raise":
                raise
            warn(f"NGD step skipped, the parameters are unchanged: {err}", RuntimeWarning)
            return False
        ng = {id(p): g for p, g in zip(self.model.parameters(), grads, strict=True)}
        for group, lr in zip(self.param_groups, lrs):
            for p in group["params"]:
                if ng[id(p)] is not None:
                    p.add_(ng[id(p)].to(p.dtype), alpha=-lr)
        return True


def _lr_and_unit(lr, unit: str) -> tuple[float, str]:
    """``lr`` as a number and its unit; ``"optimal"`` is lr 1 in units of 1/α̂."""
    if unit not in ("absolute", "alpha"):
        raise ValueError(f"lr_unit: expected 'absolute' (η = lr) or 'alpha' (η = lr / α̂), got {unit!r}")
    lr = check_lr(lr)
    return (1.0, "alpha") if lr == _OPTIMAL else (lr, unit)


class GD:
    """Full-batch gradient descent θ ← θ − η ∇L through autograd (the baseline).

    ``lr="optimal"``: 1/λ_max of Θ = J J^T / N at the first step (see :func:`optimal_lr`). With
    ``process_group=`` each rank passes its shard and the gradients of the whole batch are summed
    over the ranks (all-reduce), as in data-parallel training.
    """

    def __init__(
        self, model: nn.Module, lr: float | str = 1.0, loss: _losses.Loss | str = "mse", process_group=None
    ) -> None:
        check_lr(lr)
        if process_group is not None:
            check_group(process_group)
        self.model, self.lr, self.loss = model, lr, _losses.get(loss)
        self.process_group = process_group

    def step(self, x, y) -> None:
        if self.lr == _OPTIMAL:
            self.lr = optimal_lr("gd", self.model, x, process_group=self.process_group)
        params = list(self.model.parameters())
        f = self.model(x)
        value = self.loss.value(f, self.loss.check_targets(y, f.detach()))
        if self.process_group is None:
            grads = torch.autograd.grad(value, params)
        else:  # one all-reduce: the shards' summed gradients N_r ∇L_r and sizes N_r, then ÷ N
            grads = torch.autograd.grad(value * f.shape[0], params)
            flat = torch.cat([*(g.reshape(-1) for g in grads), grads[0].new_tensor([float(f.shape[0])])])
            dist.all_reduce(flat, group=self.process_group)
            parts = flat[:-1].div_(flat[-1]).split([g.numel() for g in grads])
            grads = [v.view_as(g) for v, g in zip(parts, grads)]
        check_update(self.model, list(grads))  # a diverged loss is never applied
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g.to(p.dtype), alpha=-float(self.lr))


def _whole_batch_mean(value: float, n_local: int, group) -> float:
    if group is None:
        return value
    buf = torch.tensor([value * n_local, float(n_local)], dtype=torch.float64)
    dist.all_reduce(buf, group=group)
    return float(buf[0] / buf[1])


@dataclass
class History:
    """What :func:`train` records at steps t = 0 … T (t = 0 is the initialization).

    Losses use the training loss ((1/2N) Σ ||f − y||² for MSE); ``distance`` is ||θ_t − θ_0||₂;
    ``seconds`` is the wall time of each step (length T); ``f_train``/``f_test`` are the outputs
    (T+1, N, C) for comparing with closed-form dynamics.
    """

    method: str
    lr: float
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    distance: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    f_train: list[np.ndarray] = field(default_factory=list)
    f_test: list[np.ndarray] = field(default_factory=list)


def train(
    model: nn.Module,
    x,
    y,
    method: Fisher | str = "exact",
    lr: float | str = "optimal",
    steps: int = 10,
    x_test=None,
    y_test=None,
    loss: _losses.Loss | str | None = None,
    process_group=None,
) -> History:
    """Train ``model`` full-batch for ``steps`` steps and record a :class:`History`.

    Args:
        method: ``"gd"`` for gradient descent, or a Fisher (instance or name) for NGD.
        lr: a number or ``"optimal"`` (1/α̂ for NGD, 1/λ_max of Θ for GD).
        loss: the loss for GD (default MSE); NGD uses its Fisher's loss.
        process_group: data parallelism (x, y, x_test, y_test are this rank's shards); the recorded
            losses and accuracies are the whole batch's, the outputs this rank's.
    """
    if int(steps) < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    is_gd = isinstance(method, str) and method.lower() == "gd"
    if is_gd:
        loss_fn = _losses.get(loss or "mse")
        opt = GD(model, lr, loss_fn, process_group=process_group)
        name = "gd"
    else:
        fisher = _fisher.get(method)
        if loss is not None:
            raise ValueError("loss: set the loss on the Fisher for NGD, e.g. nat.fisher.Exact(loss='cross_entropy')")
        loss_fn = fisher.loss
        opt = NGD(model, fisher, lr, process_group=process_group)
        name = fisher.name
    if x_test is not None and y_test is None:
        raise ValueError("y_test: required when x_test is given")
    targets: dict[str, Tensor] = {}
    hist = History(method=name, lr=float("nan"))
    theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    def measure(xs, ys, key: str) -> tuple[float, float, np.ndarray]:
        f = model(xs)
        if key not in targets:  # checked once, against the first outputs
            targets[key] = loss_fn.check_targets(ys, f)
        yt = targets[key]
        n = f.shape[0]
        value = _whole_batch_mean(float(loss_fn.value(f, yt)), n, process_group)
        acc = _whole_batch_mean(loss_fn.accuracy(f, yt), n, process_group)
        return value, acc, f.detach().cpu().numpy()

    def record(t: int) -> None:
        with torch.no_grad():
            value, acc, f = measure(x, y, "train")
            hist.steps.append(t)
            hist.train_loss.append(value)
            hist.train_accuracy.append(acc)
            hist.f_train.append(f)
            theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            hist.distance.append(float((theta - theta0).norm()))
            if x_test is not None:
                value, acc, f = measure(x_test, y_test, "test")
                hist.test_loss.append(value)
                hist.test_accuracy.append(acc)
                hist.f_test.append(f)

    record(0)
    for t in range(1, int(steps) + 1):
        start = time.perf_counter()
        opt.step(x, targets["train"])
        hist.seconds.append(time.perf_counter() - start)
        record(t)
    if is_gd:
        hist.lr = float(opt.lr) if opt.lr != _OPTIMAL else optimal_lr("gd", model, x, process_group=process_group)
    else:
        hist.lr = opt.learning_rates(x)[0]
    return hist
