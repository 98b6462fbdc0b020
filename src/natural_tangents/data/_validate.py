"""Argument checks shared by the data modules (private)."""

from __future__ import annotations

import numpy as np
import torch


def check_int(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise ValueError(f"dtype: expected a real floating-point torch dtype such as torch.float64, got {dtype!r}")
    return dtype


def check_digits(digits: object) -> tuple[int, int]:
    try:
        pair = tuple(digits)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"digits: expected two distinct digits such as (0, 7), got {digits!r}") from None
    if len(pair) != 2 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in pair):
        raise ValueError(f"digits: expected two distinct integer digits such as (0, 7), got {digits!r}")
    d0, d1 = int(pair[0]), int(pair[1])
    if not (0 <= d0 <= 9 and 0 <= d1 <= 9):
        raise ValueError(f"digits: MNIST digits are 0 to 9, got {digits!r}")
    if d0 == d1:
        raise ValueError(f"digits: the two digits must differ, got {digits!r}; pick e.g. (0, 7)")
    return d0, d1


def torch_seed(seed: int, stream: int) -> int:
    """An independent 63-bit torch seed for ``stream`` of ``seed`` (numpy's SeedSequence)."""
    state = np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(1, np.uint64)[0]
    return int(state) >> 1
