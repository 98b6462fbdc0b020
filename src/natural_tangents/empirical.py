"""Empirical neural tangent kernels from the layers' signals (the paper's (S.66)–(S.68), (S.131)).

Convention (the neural-tangents one): these functions return J(x1) J(x2)^T *without* the 1/N of
the paper's Θ = J J^T / N. Shapes: (N1, N2) for a single output, (N1, N2, C, C) for C > 1, where
entry [n, m, k, j] is ∂f_k(x1_n)/∂θ · ∂f_j(x2_m)/∂θ.

Per layer (S.68): J_l(x1) J_l(x2)^T = (a_{l−1}(x1) a_{l−1}(x2)^T) ⊙ (δ_l(x1) δ_l(x2)^T), where a is the
forward signal with its bias column, so σ_w² A_{l−1} + σ_b² comes out of one product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .models import signals
from .signals import Signals, public_shape
from .tiling import fingerprint, tiled

__all__ = ["empirical_ntk", "empirical_unit_ntk", "unit_grams"]


def _chunked_signals(model, x, name: str, chunk: int) -> Signals:
    """Signals of ``x`` computed ``chunk`` samples at a time (bounds the forward pass's memory)."""
    if len(x) <= chunk:
        return signals(model, x, name)
    return Signals.cat([signals(model, x[i : i + chunk], name) for i in range(0, len(x), chunk)])


def empirical_ntk(
    model,
    x1,
    x2=None,
    per_layer: bool = False,
    dtype: torch.dtype | None = None,
    *,
    batch_size: int | None = None,
    out=None,
    overwrite: bool = False,
    process_group=None,
    progress: bool | None = None,
    on_tile=None,
) -> Tensor:
    """The empirical NTK J(x1) J(x2)^T (no 1/N), built from the layers' signals, never from J.

    Args:
        model: a :class:`~natural_tangents.MLP` or any supported ``nn.Module``.
        x1: (N1, …) inputs. x2: (N2, …) inputs; defaults to ``x1`` (then each off-diagonal tile is
            computed once).
        per_layer: if True, return the L per-layer kernels stacked on a leading axis.
        dtype: precision of the kernel products (default: the model's).
        batch_size, out, process_group, progress: tile by tile (side ``batch_size``), into a
            memory-mapped ``.npy`` file ``out``, the tiles shared by the ranks of a
            ``torch.distributed`` group, with a progress bar (see :func:`natural_tangents.tiling.tiled`).
            The signals of all inputs are held (O(N Σ_l (M_{l−1} + C M_l))), the kernel only tile by tile.
            An interrupted run into ``out`` is resumed when the inputs, the model (its structure,
            parameters, buffers and outputs) and the settings are the same.
        overwrite, on_tile: replace an existing ``out`` and discard an unfinished run of other
            arguments (default False: refuse both); a callback per tile (see
            :func:`natural_tangents.tiling.tiled`).

    Returns:
        (N1, N2) for C = 1, (N1, N2, C, C) for C > 1; with a leading (L,) when ``per_layer``.
        Tiled with C > 1, the result is a (N1, N2, C, C) view of a (C, C, N1, N2) array (the
        layout of ``out``).
    """
    if batch_size is None and out is None and process_group is None and on_tile is None:
        f1 = signals(model, x1, "x1")
        f2 = f1 if x2 is None else signals(model, x2, "x2")
        k = f1.grams(f2, dtype)
        if not per_layer:
            k = k.sum(0)
        return public_shape(k, f1.n, f2.n, f1.c)
    tiling = {"out": out, "overwrite": overwrite, "process_group": process_group, "progress": progress}
    return _tiled_ntk(model, x1, x2, per_layer, dtype, batch_size, on_tile=on_tile, **tiling)


def _tiled_ntk(model, x1, x2, per_layer, dtype, batch_size, **tiling) -> Tensor:
    chunk = batch_size or 512
    f1 = _chunked_signals(model, x1, "x1", chunk)
    f2 = f1 if x2 is None else _chunked_signals(model, x2, "x2", chunk)
    c, depth = f1.c, f1.depth
    dtype = dtype or f1.f.dtype

    def block(rows: slice, cols: slice) -> Tensor:
        n, m = rows.stop - rows.start, cols.stop - cols.start
        k = f1.rows(rows).grams(f2.rows(cols), dtype).reshape(depth, n, c, m, c).permute(0, 2, 4, 1, 3)
        k = k if per_layer else k.sum(0)  # ([L,] C, C, n, m)
        return k[..., 0, 0, :, :] if c == 1 else k

    lead = ((depth,) if per_layer else ()) + ((c, c) if c > 1 else ())
    # a C > 1 kernel is symmetric only in (sample, output) pairs, not per output pair: all tiles
    symmetric = x2 is None and c == 1
    signature = ()
    if tiling["out"] is not None or tiling["process_group"] is not None:
        state = model.state_dict() if hasattr(model, "state_dict") else list(model.parameters())
        signature = (fingerprint(x1, x2, f1.f, f2.f, state, repr(model)), per_layer)
    k = tiled(
        block,
        f1.n,
        None if symmetric else f2.n,
        batch_size=batch_size,
        dtype=dtype,
        lead=lead,
        device=f1.f.device,
        signature=signature,
        desc="empirical NTK",
        **tiling,
    )
    return k.movedim((-4, -3), (-2, -1)) if c > 1 else k


def unit_grams(f1: Signals, f2: Signals | None, layer: int, dtype: torch.dtype | None = None) -> Tensor:
    """Per-unit J_{l,i}(x1) J_{l,i}(x2)^T of layer ``layer`` (0-based here), shape (U, N1·C, N2·C).

    For an affine layer unit i owns row i of [W_l | b_l] (an output feature or channel); for an MLP its
    kernel is (a_{l−1}(x1) a_{l−1}(x2)^T) ⊙ (δ_{l,i}(x1) δ_{l,i}(x2)^T) (S.131). No 1/N.
    """
    f2 = f1 if f2 is None else f2
    s1, s2 = f1.layers[layer], f2.layers[layer]
    dtype = dtype or s1.dtype
    if s1.rank_one and s2.rank_one:
        a = s1.a[:, 0].to(dtype) @ s2.a[:, 0].to(dtype).T  # (N1, N2)
        b = torch.einsum("knm,jpm->mnkpj", s1.d[:, :, 0].to(dtype), s2.d[:, :, 0].to(dtype))  # (M, N1, C, N2, C)
        k = b * a[None, :, None, :, None]
        return k.reshape(k.shape[0], f1.n * f1.c, f2.n * f2.c)
    u1 = s1.units(dtype).jac
    u2 = u1 if f2 is f1 else s2.units(dtype).jac
    return u1 @ u2.mT


def empirical_unit_ntk(model, x1, x2=None, *, layer: int, dtype: torch.dtype | None = None) -> Tensor:
    """Per-unit kernels Θ_{l,i}(x1, x2)·N of layer ``layer`` (1-based, as in the paper: 1 … L).

    Returns (M_l, N1, N2) for C = 1 and (M_l, N1, N2, C, C) for C > 1 (no 1/N).
    """
    f1 = signals(model, x1, "x1")
    f2 = f1 if x2 is None else signals(model, x2, "x2")
    if not 1 <= int(layer) <= f1.depth:
        raise ValueError(f"layer: expected a layer number from 1 to L = {f1.depth}, got {layer}")
    k = unit_grams(f1, f2, int(layer) - 1, dtype)
    return public_shape(k, f1.n, f2.n, f1.c)
