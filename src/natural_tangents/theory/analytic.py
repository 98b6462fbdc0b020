"""Infinite-width kernels of the NTK-parameterized MLP (the paper's Appendix E, (S.168)–(S.178)).

The network is the one of :class:`natural_tangents.MLP`:
u_1 = (σ_w/√M_0) W_1 x + σ_b b_1, u_l = (σ_w/√M_{l−1}) W_l φ(u_{l−1}) + σ_b b_l, f = u_L. As the
hidden widths grow, for two batches x1 (N1 samples) and x2 (N2 samples):

    A_0(x, x′) = x·x′ / M_0                                          (input Gram, S.66)
    Q_l = σ_w² A_{l−1} + σ_b²                                        (covariance of u_l, S.174)
    A_l = E[φ(u) φ(u′)],  Ξ_l = E[φ′(u) φ′(u′)],  l = 1 … L−1         (S.170), (S.172)
          (u, u′) ~ N(0, [[q_l(x), Q_l(x, x′)], [Q_l(x, x′), q_l(x′)]])
    B_L = 1 1^T,  B_l = σ_w² Ξ_l ⊙ B_{l+1}                           (S.171)
    Θ_l = σ_w² B_l ⊙ A_{l−1} + σ_b² B_l = B_l ⊙ Q_l                  (S.68)
    Θ_ana = Σ_{l=1}^{L} Θ_l                                          (S.169)

Here q_l(x) = Q_l(x, x) is the variance of u_l for the sample x: q_0(x) = ||x||²/M_0 and
q_l(x) = σ_w² E_{u~N(0, q_{l−1}(x))}[φ(u)²] + σ_b² (S.175). The paper assumes ||x|| = 1 for every
sample (its Assumption 2), so that q_l is one number per layer (S.178) and only the correlation
Q̄_l = Q_l/q_l varies (S.173); this module accepts inputs of any norm and keeps q_l per sample.

Normalization: Θ_l and Θ_ana here are the limits of the empirical J_l(x1) J_l(x2)^T and
J(x1) J(x2)^T *without* the 1/N of the paper's Θ = J J^T / N, i.e. the convention of
:func:`natural_tangents.empirical_ntk`; the paper's NTK is Θ(x′, x) = I_C ⊗ Θ_ana(x′, x)/N (S.168).
The finite-width fluctuations around these limits are O(1/√M).

Large N: every function here computes its kernels tile by tile (:mod:`natural_tangents.tiling`):
``batch_size=`` is the tile side, ``out=`` writes the result into a ``.npy`` file (returned as a
tensor backed by it), ``process_group=`` shares the tiles among the ranks of a ``torch.distributed``
group, ``progress=`` controls the progress bar. The per-sample variances q_l(x) are computed once
per sample, and ReLU and erf use a fused closed-form recursion per tile (:mod:`.analytic_tiles`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import activations as _act
from ..tiling import default_batch_size, fingerprint, intra_op_threads, tiled
from ..validation import as_tensor, check_batch
from . import analytic_tiles
from .architecture import Architecture, check_depth, check_variances, resolve

__all__ = ["AnalyticKernels", "kernels", "ntk", "check_depth", "check_variances", "check_pair"]

_F64 = torch.float64


@dataclass(frozen=True, eq=False)
class AnalyticKernels:
    """The infinite-width signals and kernels of an L-layer MLP on two batches (float64).

    Layer indices follow the paper (l = 1 … L); the stacked tensors are 0-based as noted.

    Attributes:
        q1: (L+1, N1) per-sample variances of x1: ``q1[0]`` = ||x||²/M_0, ``q1[l]`` = q_l = Q_l(x, x).
        q2: (L+1, N2) the same for x2.
        A: (L, N1, N2) forward kernels, ``A[l]`` = A_l for l = 0 … L−1 (A_0 = x1 x2^T / M_0).
        Q: (L, N1, N2) pre-activation covariances, ``Q[l-1]`` = Q_l = σ_w² A_{l−1} + σ_b².
        Xi: (L−1, N1, N2) derivative kernels, ``Xi[l-1]`` = Ξ_l for l = 1 … L−1.
        B: (L, N1, N2) backward kernels, ``B[l-1]`` = B_l (``B[L-1]`` is all ones).
        per_layer: (L, N1, N2) ``per_layer[l-1]`` = Θ_l = σ_w² B_l ⊙ A_{l−1} + σ_b² B_l (no 1/N).
        ntk: (N1, N2) Θ_ana = Σ_l Θ_l (S.169), no 1/N.
        depth, activation, sigma_w2, sigma_b2, method: the settings that produced them.
    """

    q1: Tensor
    q2: Tensor
    A: Tensor
    Q: Tensor
    Xi: Tensor
    B: Tensor
    per_layer: Tensor
    ntk: Tensor
    depth: int
    activation: _act.Activation
    sigma_w2: float
    sigma_b2: float
    method: str

    @property
    def shape(self) -> tuple[int, int]:
        """(N1, N2)."""
        return tuple(self.ntk.shape)


# --------------------------------------------------------------------------------- checks
def check_pair(x1, x2, names: tuple[str, str] = ("x1", "x2")) -> tuple[Tensor, Tensor | None]:
    """Both batches as finite float64 (N, M_0) tensors with the same M_0 (``names`` for messages)."""
    n1, n2 = names
    x1 = check_batch(x1, n1, dtype=_F64)
    if x2 is None:
        return x1, None
    x2 = as_tensor(x2, n2)
    if x2.ndim == 2 and x2.shape[1] != x1.shape[1]:
        raise ValueError(
            f"{n2}: has {x2.shape[1]} features per sample but {n1} has {x1.shape[1]}; both batches must "
            "have the same input width M_0"
        )
    return x1, check_batch(x2, n2, features=x1.shape[1], dtype=_F64)


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected torch.float32 or torch.float64 (the stored kernel), got {dtype!r}")
    return dtype


# ----------------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class _Problem:
    """The checked inputs, their per-sample variances (L+1, N) and the settings."""

    x1: Tensor
    x2: Tensor
    q1: Tensor
    q2: Tensor
    symmetric: bool
    arch: Architecture
    method: str
    order: int | None

    def signature(self, what: str) -> tuple[str, str]:
        """What identifies the kernel: a SHA-256 of the data's bytes and of the settings, with the
        activation by its values and derivatives on a grid (two callables with the same label differ)."""
        act = self.arch.activation
        grid = torch.cat([torch.linspace(-6.0, 6.0, 97, dtype=_F64), torch.tensor(act.kinks, dtype=_F64)])
        probe = (act(grid), act.derivative(grid))
        settings = (repr(self.arch), self.method, self.order, self.symmetric)
        return what, fingerprint(self.x1, self.x2, probe, settings)


def _problem(x1, x2, arch: Architecture, method: str, order: int | None) -> _Problem:
    x1, x2 = check_pair(x1, x2)
    q1 = analytic_tiles.per_sample_variances(x1, arch, method, order, "x1")
    if x2 is None:
        return _Problem(x1, x1, q1, q1, True, arch, method, order)
    q2 = analytic_tiles.per_sample_variances(x2, arch, method, order, "x2")
    return _Problem(x1, x2, q1, q2, False, arch, method, order)


def _run(problem: _Problem, block, what, *, lead, dtype, threads, **tiling) -> Tensor:
    n1, n2 = problem.x1.shape[0], problem.x2.shape[0]
    needed = tiling["out"] is not None or tiling["process_group"] is not None
    return tiled(
        block,
        n1,
        None if problem.symmetric else n2,
        dtype=dtype,
        lead=lead,
        signature=problem.signature(what) if needed else (),
        desc=f"analytic {what}",
        threads=threads,
        **tiling,
    )


# ---------------------------------------------------------------------------------- public
def kernels(
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    arch: Architecture | None = None,
    depth: int | None = None,
    activation: str | _act.Activation | Callable[[Tensor], Tensor] | None = None,
    sigma_w2: float | None = None,
    sigma_b2: float | None = None,
    method: str = "auto",
    order: int | None = None,
    batch_size: int | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    process_group=None,
    progress: bool | None = None,
    on_tile: Callable[[int, slice, slice], None] | None = None,
) -> AnalyticKernels:
    """All infinite-width signals of an L-layer MLP (the paper's (S.168)–(S.178)); see :class:`AnalyticKernels`.

    Args:
        x1: (N1, M_0) inputs; x2: (N2, M_0) inputs, default ``x1`` (then only the tiles on and above
            the diagonal are computed). Any norms: q_0 = ||x||²/M_0 per sample (the paper assumes ||x|| = 1).
        arch: an :class:`~natural_tangents.theory.Architecture`, or else the four keywords:
        depth: L, the number of weight layers (``len(widths) - 1`` of the matching
            :class:`~natural_tangents.MLP`); L = 1 is the linear model Θ = σ_w² A_0 + σ_b².
        activation: a name, an :class:`~natural_tangents.activations.Activation` or a callable.
        sigma_w2, sigma_b2: σ_w², σ_b² of the network (σ_b² = 0: no bias).
        method, order: how the Gaussian expectations are computed (closed form for ReLU,
            ShiftedReLU, erf and identity; quadrature otherwise), see
            :mod:`natural_tangents.theory.gaussian`.
        batch_size: the tile side (default: about 512²/(5L) entries per tile and signal).
        out: a ``.npy`` path: the (5L, N1, N2) stack [A_0 … A_{L−1}, Q_1 … Q_L, Ξ_1 … Ξ_{L−1},
            B_1 … B_L, Θ_1 … Θ_L, Θ_ana] is written there and the fields are views of it. An
            interrupted run into ``out`` with the same inputs and settings is resumed.
        overwrite: replace an existing ``out`` and discard an unfinished run of other arguments
            (default False: refuse both, ``FileExistsError``).
        process_group, progress, on_tile: see :func:`natural_tangents.tiling.tiled`.

    Returns:
        An :class:`AnalyticKernels` in float64; ``.ntk`` is J J^T without the 1/N, comparable with
        ``nat.empirical_ntk(net, x1, x2)``, and ``.per_layer[l-1]`` with
        ``nat.empirical_ntk(net, x1, x2, per_layer=True)[l-1]``.
    """
    arch = resolve(arch, depth, activation, sigma_w2, sigma_b2)
    with intra_op_threads(1) as threads:  # tiles in parallel; the setup on one thread
        p = _problem(x1, x2, arch, method, order)
        L = arch.depth

        def block(rows: slice, cols: slice) -> Tensor:
            diag = p.symmetric and rows == cols
            return analytic_tiles.kernels_tile(
                p.x1[rows], p.x2[cols], p.q1[:, rows], p.q2[:, cols], arch, diag, method, order
            )

        if batch_size is None:
            batch_size = default_batch_size(p.x1.shape[0], p.x2.shape[0], stack=5 * L)
        stack = _run(
            p, block, "kernels", lead=(5 * L,), batch_size=batch_size, out=out, overwrite=overwrite,
            process_group=process_group, progress=progress, dtype=_F64, threads=threads, on_tile=on_tile,
        )  # fmt: skip
        lay = analytic_tiles.stack_layout(L)
        return AnalyticKernels(
            q1=p.q1,
            q2=p.q2,
            A=stack[lay["A"]],
            Q=stack[lay["Q"]],
            Xi=stack[lay["Xi"]],
            B=stack[lay["B"]],
            per_layer=stack[lay["per_layer"]],
            ntk=stack[lay["ntk"]][0],
            depth=L,
            activation=arch.activation,
            sigma_w2=arch.sigma_w2,
            sigma_b2=arch.sigma_b2,
            method=method,
        )


def ntk(
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    arch: Architecture | None = None,
    depth: int | None = None,
    activation: str | _act.Activation | Callable[[Tensor], Tensor] | None = None,
    sigma_w2: float | None = None,
    sigma_b2: float | None = None,
    method: str = "auto",
    order: int | None = None,
    batch_size: int | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    process_group=None,
    progress: bool | None = None,
    dtype: torch.dtype = _F64,
    on_tile: Callable[[int, slice, slice], None] | None = None,
) -> Tensor:
    """The infinite-width NTK Θ_ana(x1, x2) (S.169), shape (N1, N2), *without* the 1/N.

    Same convention as :func:`natural_tangents.empirical_ntk` (J J^T); the paper's Θ is this divided
    by N (S.168). Uses the forward form of the recursion, Θ^{(1)} = Q_1,
    Θ^{(l+1)} = σ_w² Ξ_l ⊙ Θ^{(l)} + Q_{l+1}, tile by tile: the working set is a few
    ``batch_size``² tiles, and the output (in memory or in ``out``) the only N1 × N2 object.

    Args:
        x1, x2, arch, depth, activation, sigma_w2, sigma_b2, method, order: as in :func:`kernels`.
        batch_size: the tile side (default 512).
        out: a ``.npy`` path to write the (N1, N2) kernel into; the result is backed by that file.
            The file appears at ``out`` only when complete; an interrupted run into ``out`` with
            the same inputs and settings is resumed from its finished tiles.
        overwrite: replace an existing ``out`` and discard an unfinished run of other arguments
            (default False: refuse both, ``FileExistsError``).
        process_group: a ``torch.distributed`` group sharing the tiles (None: this process); every
            rank gets the whole kernel (or, with ``out=``, every rank writes its tiles into the one file).
        progress: a progress bar (None: when stderr is a terminal and the kernel is large).
        dtype: the stored kernel's dtype (float64 default; the computation is float64 either way).
        on_tile: ``on_tile(index, rows, cols)`` after each tile (see :func:`natural_tangents.tiling.tiled`).
    """
    arch = resolve(arch, depth, activation, sigma_w2, sigma_b2)
    with intra_op_threads(1) as threads:  # tiles in parallel; the setup on one thread
        dtype = _check_dtype(dtype)
        p = _problem(x1, x2, arch, method, order)
        scale = (arch.sigma_w2 / p.x1.shape[1]) ** 0.5  # Q_1 = (σ_w x/√M_0)·(σ_w x′/√M_0) + σ_b²
        xs1 = p.x1 * scale
        xs2 = xs1 if p.symmetric else p.x2 * scale
        fast = analytic_tiles.fast_path(arch, method)

        def block(rows: slice, cols: slice) -> Tensor:
            diag = p.symmetric and rows == cols
            args = (xs1[rows], xs2[cols], p.q1[:, rows], p.q2[:, cols], arch, diag)
            if fast == "relu":
                return analytic_tiles.ntk_tile_relu(*args)
            if fast == "erf":
                return analytic_tiles.ntk_tile_erf(*args)
            return analytic_tiles.ntk_tile_generic(*args, method, order)

        return _run(
            p, block, "NTK", lead=(), batch_size=batch_size, out=out, overwrite=overwrite,
            process_group=process_group, progress=progress, dtype=dtype, threads=threads, on_tile=on_tile,
        )  # fmt: skip
