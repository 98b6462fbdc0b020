"""Synthetic data: unit-norm Gaussian inputs (the paper's C.3.1) and targets from a random teacher."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..validation import check_batch
from ._validate import check_dtype, check_int, torch_seed
from .dataset import Dataset, unit_rows

__all__ = ["Teacher", "gaussian", "synthetic"]


def gaussian(
    n: int,
    m0: int,
    *,
    seed: int = 0,
    normalize: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Synthetic inputs as in the paper's C.3.1: entries x_i ~ N(0, 1) i.i.d., rows scaled to unit norm.

    The samples are drawn in float64 and then cast, so the same seed gives the same points in
    every dtype.

    Args:
        n: number of samples N.
        m0: input width M_0.
        seed: seed of the draw.
        normalize: scale each row to ||x_n||_2 = 1 (Assumption 2); ``False`` keeps the raw
            N(0, 1) entries.
        dtype: floating dtype of the result.

    Returns:
        (n, m0) tensor.
    """
    n = check_int(n, "n", minimum=1)
    m0 = check_int(m0, "m0", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    dtype = check_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m0, generator=gen, dtype=torch.float64)
    if normalize:
        x = unit_rows(x)
    return x.to(dtype)


@functools.lru_cache(maxsize=1)
def _tanh_second_moment() -> float:
    """E[tanh(z)²] for z ~ N(0, 1), by 80-point Gauss–Hermite quadrature (≈ 0.3943)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    return float(np.sum(weights * np.tanh(nodes) ** 2) / math.sqrt(2 * math.pi))


@dataclass(frozen=True, eq=False, repr=False)
class Teacher:
    """A fixed random one-hidden-layer tanh network, the target function of :func:`synthetic`.

    f*(x) = W_2 tanh(W_1 x) / sqrt(H κ), with W_1 (H × M_0) and W_2 (C × H) of i.i.d. N(0, 1)
    entries and κ = E_{z~N(0,1)}[tanh(z)²]. For a unit-norm x each pre-activation (W_1 x)_h is
    N(0, 1) over the draw of W_1, so every target has mean 0 and variance 1 over teachers.
    """

    w1: Tensor
    w2: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        """Targets (n, C) for inputs x (n, M_0) (same dtype as x)."""
        x = check_batch(x, "x", features=self.w1.shape[1])
        scale = math.sqrt(self.w1.shape[0] * _tanh_second_moment())
        out = torch.tanh(x.to(torch.float64) @ self.w1.T) @ self.w2.T / scale
        return out.to(x.dtype if x.is_floating_point() else torch.float64)

    def __repr__(self) -> str:
        return f"Teacher(M_0={self.w1.shape[1]}, H={self.w1.shape[0]}, C={self.w2.shape[0]})"


def synthetic(
    n: int,
    m0: int,
    *,
    n_test: int = 100,
    c: int = 1,
    seed: int = 0,
    noise: float = 0.0,
    teacher_width: int = 100,
    dtype: torch.dtype = torch.float64,
) -> Dataset:
    """A synthetic regression task: unit-norm Gaussian inputs and targets from a random teacher.

    Inputs are drawn as in :func:`gaussian` (x_i ~ N(0, 1), rows scaled to unit norm; the paper's
    C.3.1 uses N = 80, M_0 = 100, C = 1). Targets are y = f*(x) + noise·ε with ε ~ N(0, 1) and
    f* the :class:`Teacher` f*(x) = W_2 tanh(W_1 x) / sqrt(H κ) of width H = ``teacher_width``
    (unit target variance over teachers; see :class:`Teacher`). The teacher is fixed by ``seed``
    and shared by train and test; it is stored as ``Dataset.teacher``. The teacher, the training
    inputs, the test inputs and the noise come from independent streams of ``seed``, so changing
    ``n_test`` leaves the training set unchanged.

    Args:
        n: number of training samples N.
        m0: input width M_0.
        n_test: number of test samples (≥ 0).
        c: number of outputs C.
        seed: seed of the draw.
        noise: standard deviation of Gaussian label noise (0 for noiseless targets).
        teacher_width: H, the teacher's hidden width.
        dtype: floating dtype of inputs and targets.

    Returns:
        A :class:`Dataset` with x_train (n, m0), y_train (n, c), x_test (n_test, m0), y_test (n_test, c).
    """
    n = check_int(n, "n", minimum=1)
    m0 = check_int(m0, "m0", minimum=1)
    n_test = check_int(n_test, "n_test", minimum=0)
    c = check_int(c, "c", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    width = check_int(teacher_width, "teacher_width", minimum=1)
    dtype = check_dtype(dtype)
    noise = float(noise)
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: expected a finite standard deviation >= 0, got {noise}")

    gens = [torch.Generator().manual_seed(torch_seed(seed, k)) for k in range(4)]
    teacher = Teacher(
        w1=torch.randn(width, m0, generator=gens[0], dtype=torch.float64),
        w2=torch.randn(c, width, generator=gens[0], dtype=torch.float64),
    )

    def inputs(count: int, gen: torch.Generator) -> Tensor:
        return unit_rows(torch.randn(count, m0, generator=gen, dtype=torch.float64))

    x_train, x_test = inputs(n, gens[1]), inputs(n_test, gens[2])
    y_train = teacher(x_train)
    y_test = teacher(x_test) if n_test else torch.zeros(0, c, dtype=torch.float64)
    if noise > 0:
        y_train = y_train + noise * torch.randn(n, c, generator=gens[3], dtype=torch.float64)
        y_test = y_test + noise * torch.randn(n_test, c, generator=gens[3], dtype=torch.float64)
    source = f"synthetic: x ~ N(0, I_{m0}) scaled to unit norm, y = tanh teacher (H={width}, C={c})"
    if noise > 0:
        source += f" + N(0, {noise:g}²) noise"
    return Dataset(
        x_train.to(dtype),
        y_train.to(dtype),
        x_test.to(dtype),
        y_test.to(dtype),
        source=source,
        teacher=teacher,
    )
