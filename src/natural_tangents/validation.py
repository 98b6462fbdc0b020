"""Input validation shared by every module: each error names the argument and the fix."""

from __future__ import annotations

import math
import os
import sys
import warnings

import numpy as np
import torch
from torch import Tensor


def as_tensor(
    x: Tensor | np.ndarray,
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Convert ``x`` to a tensor (keeping its dtype unless ``dtype`` is given)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name}: expected a real tensor (floating point or integer), got dtype {x.dtype}")
    if dtype is not None or device is not None:
        x = x.to(dtype=dtype or x.dtype, device=device)
    return x


def check_batch(
    x: Tensor | np.ndarray,
    name: str,
    *,
    features: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A batch of inputs of shape (N, features): 2-D, non-empty, finite, right width."""
    x = as_tensor(x, name, dtype=dtype, device=device)
    if x.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D batch of shape (N, {features or 'M_0'}), got shape "
            f"{tuple(x.shape)}; reshape with {name}.reshape(len({name}), -1)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty (shape {tuple(x.shape)}); pass at least one sample")
    if features is not None and x.shape[1] != features:
        raise ValueError(
            f"{name}: expected {features} features per sample (the network's input width M_0), got {x.shape[1]}"
        )
    check_finite(x, name)
    return x


def check_finite(x: Tensor, name: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: contains {bad} NaN or inf entries; clean or impute them first")


def check_damping(damping: float, name: str = "damping") -> float:
    damping = float(damping)
    if not np.isfinite(damping) or damping < 0:
        raise ValueError(f"{name}: must be a finite number >= 0 (0 means the zero-damping limit), got {damping}")
    return damping


def check_widths(widths) -> tuple[int, ...]:
    try:
        ws = tuple(int(w) for w in widths)
    except TypeError:
        raise ValueError(f"widths: expected a sequence [M_0, M_1, ..., M_L], got {widths!r}") from None
    if len(ws) < 2:
        raise ValueError(f"widths: need at least [M_0, M_L] (input and output widths), got {list(ws)}")
    if any(w != float(v) for w, v in zip(ws, widths)) or any(w <= 0 for w in ws):
        raise ValueError(f"widths: every width must be a positive integer, got {list(widths)}")
    return ws


def lr_ok(lr, allow_optimal: bool = True) -> bool:
    """Whether ``lr`` is a positive finite number (or, when allowed, the string ``"optimal"``)."""
    if isinstance(lr, str):
        return allow_optimal and lr == "optimal"
    try:
        value = float(lr)
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and value > 0


def check_lr(lr, allow_optimal: bool = True):
    """``lr`` checked by :func:`lr_ok` (a float, or ``"optimal"``); ValueError naming it otherwise."""
    if not lr_ok(lr, allow_optimal):
        what = "a positive number or 'optimal'" if allow_optimal else "a positive finite number"
        raise ValueError(f"lr: expected {what} for the learning rate η, got {lr!r}")
    return lr if isinstance(lr, str) else float(lr)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_STDLIB = os.path.dirname(os.path.abspath(os.__file__))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line: the first frame outside natural_tangents
    (and outside torch's decorators, such as ``torch.no_grad`` around an optimizer's step, and the
    standard library's, such as ``functools.cached_property``)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE, _TORCH, _STDLIB)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def check_outputs(model, f: Tensor) -> None:
    """FloatingPointError if the model's outputs f are not finite, naming the first non-finite
    parameter when there is one (else the outputs overflowed for finite parameters and inputs)."""
    if bool(torch.isfinite(f).all()):
        return
    bad = int((~torch.isfinite(f)).sum())
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise FloatingPointError(
                f"model: parameter {name!r} has {int((~torch.isfinite(p)).sum())} NaN or inf entries, so {bad} "
                "outputs are not finite (a diverged run: lower the learning rate or raise the damping, and "
                "restart from finite parameters)"
            )
    raise FloatingPointError(
        f"model: {bad} outputs are NaN or inf for finite inputs and parameters (overflow, e.g. after a "
        "diverging step: lower the learning rate or raise the damping)"
    )


def check_update(model, update: list[Tensor | None]) -> None:
    """FloatingPointError if an update (aligned with ``model.parameters()``) has a non-finite entry."""
    parts = [u for u in update if u is not None]
    if not parts:
        return
    # one reduction and one synchronization: a NaN or inf anywhere makes the sum of the squares non-finite
    # (an overflow of finite entries too: then the entries are looked at one by one)
    if bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(u) for u in parts]).sum())):
        return
    for (name, _), u in zip(model.named_parameters(), update):
        if u is not None and not bool(torch.isfinite(u).all()):
            raise FloatingPointError(
                f"update: the natural gradient of {name!r} is not finite (the damped system is too "
                "ill-conditioned, or the loss diverged); raise the damping or lower the learning rate"
            )
