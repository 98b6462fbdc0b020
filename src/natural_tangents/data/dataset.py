"""The dataset type and the unit-norm rule every input follows (the paper's Assumption 2).

:class:`Dataset` holds a supervised task, inputs as rows (N, M_0) and targets (N, C);
:func:`normalize` scales rows to unit L2 norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..validation import check_batch

__all__ = ["Dataset", "normalize"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A supervised task: training and test inputs with their targets.

    Attributes:
        x_train: (N, M_0) training inputs, rows of unit norm (Assumption 2).
        y_train: (N, C) training targets.
        x_test: (N_test, M_0) test inputs, rows of unit norm; N_test may be 0.
        y_test: (N_test, C) test targets.
        digits: the two MNIST digits of a two-digit task, in target order, else ``None``.
        source: where the data came from, in words.
        teacher: for synthetic tasks, the noiseless target function x (n, M_0) -> (n, C);
            else ``None``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    digits: tuple[int, ...] | None = None
    source: str = ""
    teacher: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for x, y, split in ((self.x_train, self.y_train, "train"), (self.x_test, self.y_test, "test")):
            if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"Dataset: x_{split} must be (N, M_0) and y_{split} (N, C) with the same N, got "
                    f"{tuple(x.shape)} and {tuple(y.shape)}"
                )
        if self.x_train.shape[1] != self.x_test.shape[1] or self.y_train.shape[1] != self.y_test.shape[1]:
            raise ValueError(
                "Dataset: train and test must share the input width M_0 and the output width C, got "
                f"x {tuple(self.x_train.shape)} / {tuple(self.x_test.shape)}, "
                f"y {tuple(self.y_train.shape)} / {tuple(self.y_test.shape)}"
            )

    @property
    def n_train(self) -> int:
        """N, the number of training samples."""
        return self.x_train.shape[0]

    @property
    def n_test(self) -> int:
        """N_test, the number of test samples."""
        return self.x_test.shape[0]

    @property
    def input_dim(self) -> int:
        """M_0, the input width."""
        return self.x_train.shape[1]

    @property
    def output_dim(self) -> int:
        """C, the number of outputs (1 for ±1 targets, 2 for one-hot two-digit targets)."""
        return self.y_train.shape[1]

    def __repr__(self) -> str:
        return (
            f"Dataset(x_train={tuple(self.x_train.shape)}, y_train={tuple(self.y_train.shape)}, "
            f"x_test={tuple(self.x_test.shape)}, y_test={tuple(self.y_test.shape)}, "
            f"dtype={self.x_train.dtype}, digits={self.digits}, source={self.source!r})"
        )


def unit_rows(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def normalize(x: Tensor | np.ndarray) -> Tensor:
    """Scale every row to unit L2 norm, x_n / ||x_n||_2 (the paper's Assumption 2).

    Args:
        x: (N, M_0) inputs, tensor or numpy array; integer inputs are converted to float64.

    Returns:
        (N, M_0) tensor of the same floating dtype and device with ||x_n||_2 = 1 for every row.

    Raises:
        ValueError: ``x`` is not a finite 2-D batch, or a row is all zeros (it has no direction).
    """
    x = check_batch(x, "x")
    if not x.is_floating_point():
        x = x.to(torch.float64)
    norms = torch.linalg.vector_norm(x, dim=1)
    zero = torch.nonzero(norms == 0).flatten().tolist()
    if zero:
        shown = ", ".join(str(i) for i in zero[:5]) + (", ..." if len(zero) > 5 else "")
        raise ValueError(
            f"x: {len(zero)} row(s) are all zeros (rows {shown}) and cannot be scaled to unit norm; drop them first"
        )
    return x / norms[:, None]
