"""Full-batch training: natural gradient descent with any Fisher, plain gradient descent, and a
``train`` loop that records what the seed's figures plot.

    opt = nat.NGD(net, nat.fisher.BlockDiagonal(), lr="optimal")   # η = 1/α
    for _ in range(5):
        opt.step(x, y)

``NGD`` is a ``torch.optim.Optimizer``: ``zero_grad``, ``state_dict``/``load_state_dict`` and
parameter groups with their own learning rate work as usual, and :meth:`NGD.precondition` writes
the natural gradient into ``.grad`` so that any torch optimizer (SGD with momentum, Adam) can apply it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from . import fisher as _fisher
from . import losses as _losses
from .fisher.base import Fisher
from .kernels import model_factors
from .network import affine_layers

__all__ = ["NGD", "GD", "History", "train", "optimal_lr"]

_OPTIMAL = "optimal"


def optimal_lr(method: Fisher | str, model: nn.Module, x: Tensor) -> float:
    """η for ``lr="optimal"``: 1/α̂ for a Fisher (α̂ measured on the batch at the current
    parameters; one step then solves the linearized problem when Θ̄ = α I), and for ``"gd"``
    1/λ_max of Θ = J J^T / N: the largest rate at which every eigen-direction of the linearized
    residual contracts monotonically (1 − ηλ ∈ [0, 1)). Rates up to 2/λ_max are stable for the
    linear model only; at finite width they diverge once λ_max moves."""
    if isinstance(method, str) and method.lower() == "gd":
        from .kernels import layer_kernels

        fx = model_factors(model, x)
        theta = layer_kernels(fx, dtype=torch.float64).sum(0) / fx.n
        return 1.0 / float(torch.linalg.eigvalsh(theta)[-1])
    return 1.0 / _fisher.get(method).alpha_hat(model, x)


class NGD(torch.optim.Optimizer):
    """Full-batch natural gradient descent θ ← θ − η (G + ρI)^{-1} ∇L.

    Args:
        model: a :class:`~natural_tangents.MLP` or a supported ``nn.Sequential``.
        fisher: a :mod:`natural_tangents.fisher` instance or name (``"exact"``, ``"kfac"``, …).
        lr: a number, or ``"optimal"`` for η = 1/α̂ of this Fisher, measured once at the first step
            (stored in the parameter group as ``"alpha"`` and saved with ``state_dict``).
        param_groups: optional torch-style groups (dicts with ``"params"`` and optionally ``"lr"``)
            over ``model.parameters()``; parameters in no group are not updated. The natural
            gradient is always that of the whole model (the Fisher couples all parameters); a group
            applies its own block of it with its own rate.

    An unsupported model or layer is rejected here, before anything is computed (``TypeError`` or
    ``NotImplementedError`` naming the layer; see :mod:`natural_tangents.models`).
    """

    def __init__(
        self,
        model: nn.Module,
        fisher: Fisher | str = "exact",
        lr: float | str = 1.0,
        param_groups: list[dict] | None = None,
    ) -> None:
        _check_lr(lr)
        affine_layers(model)  # an unsupported model or layer fails here, before anything is computed
        self.model = model
        self.fisher = _fisher.get(fisher)
        groups = param_groups if param_groups is not None else [{"params": list(model.parameters())}]
        super().__init__(groups, {"lr": lr})

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the parameters must belong to the model and
        ``lr`` must be a positive number or ``"optimal"``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        owned = {id(p) for p in self.model.parameters()}
        if any(id(p) not in owned for p in group["params"]) or not _lr_ok(group["lr"]):
            self.param_groups.pop()
            _check_lr(group["lr"])
            raise ValueError("param_groups: every parameter must belong to `model`")

    def _lr(self, group: dict, x: Tensor) -> float:
        if group["lr"] != _OPTIMAL:
            return float(group["lr"])
        if group.get("alpha") is None:
            # one measurement of α̂ serves every group that has none yet (same model, same batch)
            alpha = self.fisher.alpha_hat(self.model, x)
            for g in self.param_groups:
                if g["lr"] == _OPTIMAL and g.get("alpha") is None:
                    g["alpha"] = alpha
        return 1.0 / group["alpha"]

    def natural_gradient(self, x, y) -> list[Tensor]:
        """(G + ρI)^{-1} ∇L at (x, y), aligned with ``model.parameters()``."""
        return self.fisher.natural_gradient(self.model, x, y)

    @torch.no_grad()
    def precondition(self, x, y) -> None:
        """Write the natural gradient into each parameter's ``.grad`` (for any torch optimizer)."""
        for p, g in zip(self.model.parameters(), self.natural_gradient(x, y), strict=True):
            p.grad = g.to(p.dtype).clone()

    @torch.no_grad()
    def step(self, x, y) -> None:  # type: ignore[override]
        """One full-batch NGD step on (x, y)."""
        ng = {id(p): g for p, g in zip(self.model.parameters(), self.natural_gradient(x, y), strict=True)}
        for group in self.param_groups:
            lr = self._lr(group, x)
            for p in group["params"]:
                p.add_(ng[id(p)].to(p.dtype), alpha=-lr)


class GD:
    """Full-batch gradient descent θ ← θ − η ∇L through autograd (the baseline).

    ``lr="optimal"``: 1/λ_max of Θ = J J^T / N at the first step (see :func:`optimal_lr`).
    """

    def __init__(self, model: nn.Module, lr: float | str = 1.0, loss: _losses.Loss | str = "mse") -> None:
        _check_lr(lr)
        self.model, self.lr, self.loss = model, lr, _losses.get(loss)

    def step(self, x, y) -> None:
        if self.lr == _OPTIMAL:
            self.lr = optimal_lr("gd", self.model, x)
        params = list(self.model.parameters())
        f = self.model(x)
        value = self.loss.value(f, self.loss.check_targets(y, f.detach()))
        grads = torch.autograd.grad(value, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=-float(self.lr))


def _lr_ok(lr) -> bool:
    if isinstance(lr, str):
        return lr == _OPTIMAL
    try:
        value = float(lr)
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and value > 0


def _check_lr(lr) -> None:
    if not _lr_ok(lr):
        raise ValueError(f"lr: expected a positive number or 'optimal', got {lr!r}")


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

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("f_train", "f_test")}
        return out


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
) -> History:
    """Train ``model`` full-batch for ``steps`` steps and record a :class:`History`.

    Args:
        method: ``"gd"`` for gradient descent, or a Fisher (instance or name) for NGD.
        lr: a number or ``"optimal"`` (1/α̂ for NGD, 1/λ_max of Θ for GD).
        loss: the loss for GD (default MSE); NGD uses its Fisher's loss.
    """
    if int(steps) < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    is_gd = isinstance(method, str) and method.lower() == "gd"
    if is_gd:
        loss_fn = _losses.get(loss or "mse")
        opt = GD(model, lr, loss_fn)
        name = "gd"
    else:
        fisher = _fisher.get(method)
        if loss is not None:
            raise ValueError("loss: set the loss on the Fisher for NGD, e.g. nat.fisher.Exact(loss='cross_entropy')")
        loss_fn = fisher.loss
        opt = NGD(model, fisher, lr)
        name = fisher.name
    fx = model_factors(model, x)
    y = loss_fn.check_targets(y, fx.f)
    if x_test is not None:
        ft = model_factors(model, x_test, "x_test")
        if y_test is None:
            raise ValueError("y_test: required when x_test is given")
        y_test = loss_fn.check_targets(y_test, ft.f)
    if is_gd and opt.lr == _OPTIMAL:
        opt.lr = optimal_lr("gd", model, x)
    hist = History(method=name, lr=float(opt.lr) if is_gd else opt._lr(opt.param_groups[0], x))
    theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    def record(t: int) -> None:
        with torch.no_grad():
            f = model(x)
            hist.steps.append(t)
            hist.train_loss.append(float(loss_fn.value(f, y)))
            hist.train_accuracy.append(loss_fn.accuracy(f, y))
            hist.f_train.append(f.detach().cpu().numpy())
            theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            hist.distance.append(float((theta - theta0).norm()))
            if x_test is not None:
                ft = model(x_test)
                hist.test_loss.append(float(loss_fn.value(ft, y_test)))
                hist.test_accuracy.append(loss_fn.accuracy(ft, y_test))
                hist.f_test.append(ft.detach().cpu().numpy())

    record(0)
    for t in range(1, int(steps) + 1):
        start = time.perf_counter()
        opt.step(x, y)
        hist.seconds.append(time.perf_counter() - start)
        record(t)
    return hist
