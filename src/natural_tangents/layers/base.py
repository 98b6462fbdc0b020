"""The layer-kind contract: what one parameterized module of a batch offers every Fisher.

A Fisher never looks at a concrete layer. It asks each :class:`LayerSignals` of a batch for

* ``gram(other)``: the per-layer kernel J_l(x) J_l(x′)^T, flat sample-major (N·C, N′·C′), no 1/N
  (the paper's (S.68); divide by N for its Θ_l);
* ``transpose(v)``: J_l^T v for a function-space vector v (N, C): the layer's parameter update, one
  tensor per parameter of the module (a weighted backward pass);
* ``jvp(u)``: J_l u for parameter tensors u (one per parameter): a function-space vector (N, C);
* ``jacobian()``: the per-sample Jacobian (N·C, P_l), for the routes that need it explicitly;
* ``units()``: the unit-wise view (which rows of the parameters form one unit);
* ``mix(m)``: the same layer with its output rows mixed per sample, J_n ↦ m_n J_n (the rows of a
  Fisher: Λ^{1/2} J for the expectation over the outputs, sampled or observed gradients);

and for two capabilities, which the Fishers read instead of inspecting the kind:

* ``kronecker``: the Kronecker (K-FAC) view, an :class:`~natural_tangents.layers.affine.AffineSignals`
  (forward signal a, backward signal δ), or ``None`` for a layer without that structure;
* ``rank_one``: whether each per-sample Jacobian is one outer product δ a^T (an affine layer at one
  position, as in an MLP), which opens the N × N dual routes of K-FAC and the unit-wise Fisher.

Three kinds implement it: :mod:`~natural_tangents.layers.linear` (rank-one factors, the paper's
MLP), :mod:`~natural_tangents.layers.conv` (patches and per-position output derivatives) and
:mod:`~natural_tangents.layers.generic` (any other module, through per-sample gradients). Adding a
kind is one subclass of :class:`LayerSignals` (Python names the abstract methods it still lacks) and
one :func:`natural_tangents.layers.register` call; docs/user_models.md has a worked example.
Distribution (``process_group``) only ever concatenates signals along the sample axis (:meth:`cat`).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LayerSignals", "Units", "mirror_lower", "outer_gram", "padded_empty", "padded_mm", "split_flat"]


@dataclass(frozen=True)
class Units:
    """The unit-wise view of a layer: ``jac`` (U, N·C, p) holds the per-sample Jacobian of each of the
    U units (rows sample-major), and ``to_params(w)`` maps per-unit parameter vectors w (U, p) back to
    the module's parameter tensors."""

    jac: Tensor
    to_params: Callable[[Tensor], list[Tensor]]


class LayerSignals(ABC):
    """Signals of one parameterized module for a batch of N inputs with C output rows (abstract).

    Attributes every kind has: ``name`` (the module's path in the model) and ``params`` (its
    trainable parameters, in ``model.parameters()`` order). Subclasses are frozen dataclasses.
    """

    name: str
    params: tuple[Tensor, ...]

    # ---------------------------------------------------------------- shape
    @property
    @abstractmethod
    def n(self) -> int:
        """The number of samples N."""

    @property
    @abstractmethod
    def c(self) -> int:
        """Output rows per sample: C, or R after :meth:`mix`."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The precision of the signals (the model's)."""

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    # ---------------------------------------------------------------- capabilities
    @property
    def kronecker(self):
        """The Kronecker view (:class:`~natural_tangents.layers.affine.AffineSignals`), or ``None``."""
        return None

    @property
    def rank_one(self) -> bool:
        """Whether every per-sample Jacobian is one outer product δ a^T (the N × N dual routes)."""
        return False

    # ---------------------------------------------------------------- the contract
    @abstractmethod
    def gram(self, other: LayerSignals | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """J_l(x) J_l(x′)^T, (N·C, N′·C′) sample-major, no 1/N; ``other`` defaults to ``self``."""

    @abstractmethod
    def transpose(self, v: Tensor) -> list[Tensor]:
        """J_l^T v for v (N, C): the update of each parameter of the module, in the model's dtype."""

    @abstractmethod
    def jvp(self, update: list[Tensor]) -> Tensor:
        """J_l u for tensors u shaped like :attr:`params`: (N, C) in the model's dtype."""

    @abstractmethod
    def jacobian(self, dtype: torch.dtype | None = None) -> Tensor:
        """The per-sample Jacobian (N·C, P_l), rows sample-major, columns the flattened parameters."""

    @abstractmethod
    def units(self, dtype: torch.dtype | None = None) -> Units:
        """The unit-wise view (see :class:`Units`)."""

    @abstractmethod
    def mix(self, m: Tensor) -> LayerSignals:
        """The same layer with output rows m_n J_n for per-sample matrices m (N, R, C)."""

    @abstractmethod
    def to(self, dtype: torch.dtype) -> LayerSignals:
        """The same signals cast to ``dtype``."""

    @classmethod
    @abstractmethod
    def cat(cls, parts: list[LayerSignals]) -> LayerSignals:
        """The signals of the concatenated batch (parts in order)."""

    @abstractmethod
    def tensors(self) -> list[Tensor]:
        """The per-sample tensors (sample axis first), for gathering across processes."""

    @abstractmethod
    def with_tensors(self, tensors: list[Tensor]) -> LayerSignals:
        """The same kind of signals holding ``tensors`` (as returned by :meth:`tensors`)."""


def split_flat(flat: Tensor, params: tuple[Tensor, ...]) -> list[Tensor]:
    """A flat (…, P_l) vector → one tensor per parameter (views), shaped like the parameters."""
    out, start = [], 0
    for p in params:
        k = p.numel()
        out.append(flat[..., start : start + k].reshape(*flat.shape[:-1], *p.shape))
        start += k
    return out


_SYM_BLOCK = 512  # block side of the symmetric Gram products
_ALIGN = 16  # row strides of wide signals and updates are rounded up to this many elements


def padded_empty(shape: tuple[int, ...], *, like: Tensor) -> Tensor:
    """An uninitialized tensor of ``shape`` (dtype and device of ``like``) whose rows are stored with
    a stride rounded up to a multiple of 16 elements (a view into a slightly wider buffer).

    A width such as 4097 (4096 features and a bias column) otherwise puts every row at an odd offset,
    and BLAS products reading or writing such rows ran up to 1.5× slower on our machines."""
    width = shape[-1]
    pad = -width % _ALIGN
    if pad == 0 or width < 4 * _ALIGN:
        return like.new_empty(shape)
    return like.new_empty((*shape[:-1], width + pad))[..., :width]


def padded_mm(x: Tensor, y: Tensor) -> Tensor:
    """x @ y (M, K) · (K, p), written into rows with an aligned stride (see :func:`padded_empty`)."""
    return torch.mm(x, y, out=padded_empty((x.shape[0], y.shape[1]), like=x))


def outer_gram(x: Tensor, y: Tensor | None = None, *, mirror: bool = True) -> Tensor:
    """x y^T for rows x (N1, D) and y (N2, D); with ``y`` None the symmetric x x^T, of which only
    the blocks on and below the diagonal are multiplied (about half the work for large N).
    ``mirror=False`` (symmetric case only) returns just the lower triangle, zeros above it, for
    products of Grams mirrored once with :func:`mirror_lower`."""
    if y is not None:
        return x @ y.T
    n = x.shape[0]
    if n <= _SYM_BLOCK:
        full = x @ x.T
        return full if mirror else full.tril_()
    out = x.new_zeros(n, n)
    cuts = [*range(0, n, _SYM_BLOCK), n]
    for lo, hi in itertools.pairwise(cuts):
        block = x[lo:hi] @ x[:hi].T  # this row block up to the diagonal
        out[lo:hi, :lo] = block[:, :lo]
        out[lo:hi, lo:hi] = block[:, lo:].tril_()
    return mirror_lower(out) if mirror else out


def mirror_lower(m: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is that of ``m`` (whose upper triangle is zero); in place."""
    return m.add_(m.tril(-1).mT)
