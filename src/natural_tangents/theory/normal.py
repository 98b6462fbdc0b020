"""Standard normal helpers shared by the Gaussian-expectation routes (:mod:`.closed_forms`,
:mod:`.quadrature`, :mod:`.hermite_series`): density, CDF, the Gauss–Legendre rule, chunking of
large temporaries, and the clipped correlation. All float64."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["CHUNK", "legendre", "pdf", "cdf", "chunks", "correlation"]

CHUNK = 1 << 19
"""Elements of the largest temporary in the quadrature loops (4 MiB in float64)."""


@lru_cache(maxsize=16)
def legendre(order: int) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre nodes and weights on [−1, 1]."""
    x, w = np.polynomial.legendre.leggauss(order)
    return torch.from_numpy(x).to(torch.float64), torch.from_numpy(w).to(torch.float64)


def pdf(x: Tensor) -> Tensor:
    """Standard normal density."""
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def cdf(x: Tensor) -> Tensor:
    """Standard normal CDF Φ (accurate in both tails)."""
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def chunks(n: int, per_item: int):
    """Slices of ``range(n)`` so that a chunk holds about :data:`CHUNK` elements of size ``per_item`` each."""
    step = max(1, CHUNK // max(1, per_item))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def correlation(q1: Tensor, q2: Tensor, cov: Tensor) -> Tensor:
    """ρ = Q / √(q q′), clipped to [−1, 1] (rounding can push it past ±1 on the diagonal)."""
    return (cov / torch.sqrt(q1 * q2)).clamp(-1.0, 1.0)
