"""Full-batch training as in the paper's experiments: plain gradient descent (:class:`GD`), the
``lr="optimal"`` rates (:func:`optimal_lr`), and a :func:`train` loop that records what the paper's
figures plot (:class:`History`), for NGD (:class:`~natural_tangents.optim.NGD`) or GD.

    history = nat.train(net, x, y, nat.fisher.BlockDiagonal(), lr="optimal", steps=3)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from . import fisher as _fisher
from . import losses as _losses
from .distributed import check_group, mean_gradient, whole_batch_mean
from .fisher.base import Fisher
from .optim import NGD, OPTIMAL
from .validation import check_lr, check_update

__all__ = ["GD", "History", "train", "optimal_lr"]


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
        if self.lr == OPTIMAL:
            self.lr = optimal_lr("gd", self.model, x, process_group=self.process_group)
        params = list(self.model.parameters())
        f = self.model(x)
        value = self.loss.value(f, self.loss.check_targets(y, f.detach()))
        grads = torch.autograd.grad(value, params)
        if self.process_group is not None:  # one all-reduce for the whole batch's mean gradient
            grads = mean_gradient(list(grads), f.shape[0], self.process_group)
        check_update(self.model, list(grads))  # a diverged loss is never applied
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g.to(p.dtype), alpha=-float(self.lr))


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
        value = whole_batch_mean(float(loss_fn.value(f, yt)), n, process_group)
        acc = whole_batch_mean(loss_fn.accuracy(f, yt), n, process_group)
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
        hist.lr = float(opt.lr) if opt.lr != OPTIMAL else optimal_lr("gd", model, x, process_group=process_group)
    else:
        hist.lr = opt.learning_rates(x)[0]
    return hist
