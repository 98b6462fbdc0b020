"""Where the samples are in a module's inputs and outputs: the batch axis of every tensor it takes
and returns, for the per-sample reading of :mod:`~natural_tangents.layers.generic`.

A module's inputs (positional and keyword arguments) and its output may be tensors or tuples,
lists and dicts of them (an ``nn.LSTM`` returns ``(output, (h_n, c_n))``). Their tensors, in order,
are the *leaves* (:func:`tensor_leaves`), and each leaf has a batch axis or none (a tensor shared by
every sample, such as a 2-D attention mask). The axes come from a small table by module type:

=========================================  ====================================================
module                                     batch axis
=========================================  ====================================================
``nn.RNN``, ``nn.LSTM``, ``nn.GRU``        input and output: 0 if ``batch_first`` else 1;
                                           hidden states ``h``, ``c`` (layers, N, H): always 1
``nn.MultiheadAttention``                  query, key, value, output: 0 if ``batch_first`` else
                                           1; ``key_padding_mask`` and attention weights: 0;
                                           a 2-D ``attn_mask``: none (shared)
in a sequence-first transformer block      every tensor: 1 (with ``batch_first=False`` its
                                           layers see (T, N, E))
anything else                              every tensor whose first axis has the N samples: 0
=========================================  ====================================================

A packed sequence (``nn.utils.rnn.PackedSequence``) interleaves the samples and has no batch axis,
and a 3-D attention mask mixes samples and heads on one axis: both are refused, naming the module.
"""

from __future__ import annotations

import inspect

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["tensor_leaves", "with_leaves", "sequence_first", "call_axes"]


def tensor_leaves(obj) -> list[Tensor]:
    """The tensors in ``obj`` (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in tensor_leaves(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensor_leaves(item)]
    return []


def with_leaves(obj, leaves):
    """``obj`` with its tensors replaced, in order, by the items of the iterator ``leaves``."""
    if isinstance(obj, Tensor):
        return next(leaves)
    if isinstance(obj, (tuple, list)):
        items = [with_leaves(item, leaves) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {k: with_leaves(v, leaves) for k, v in obj.items()}
    return obj


def sequence_first(module: nn.Module) -> bool:
    """Whether ``module`` is a stock transformer block built with ``batch_first=False``: its
    sub-modules (Linear, LayerNorm, attention) then see tensors shaped (T, N, E)."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return len(module.layers) > 0 and sequence_first(module.layers[0])
    if isinstance(module, nn.Transformer):
        return not module.batch_first
    return False


def _names(module: nn.Module, count: int) -> list[str | None]:
    """The parameter names of the first ``count`` positional arguments of ``module.forward``."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    out: list[str | None] = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        out.append(p.name)
    return (out + [None] * count)[:count]


def _leaf_axes(value, axis: int | None) -> list[int | None]:
    return [axis] * len(tensor_leaves(value))


def _default(value, n: int, axis: int) -> list[int | None]:
    return [axis if t.ndim > axis and t.shape[axis] == n else None for t in tensor_leaves(value)]


def _rnn_input(module: nn.RNNBase, name: str | None, value, place: str) -> list[int | None]:
    if isinstance(value, PackedSequence):
        raise NotImplementedError(
            f"{place} receives a PackedSequence, which interleaves the samples of the batch, so there is no "
            "per-sample input to read; pass the padded batch instead (nn.utils.rnn.pad_sequence) and mask the "
            "padded steps after the recurrent layer"
        )
    seq = 0 if module.batch_first else 1
    if name == "input":
        if not isinstance(value, Tensor) or value.ndim != 3:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise NotImplementedError(
                f"{place} receives an input of shape {shape} without a batch axis; pass the batch, "
                f"shaped {'(N, T, H_in)' if module.batch_first else '(T, N, H_in)'}"
            )
        return [seq]
    return _leaf_axes(value, 1 if name == "hx" else None)


def _attention_input(module: nn.MultiheadAttention, name: str | None, value, place: str) -> list[int | None]:
    if name in ("query", "key", "value"):
        if not isinstance(value, Tensor) or value.ndim != 3:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise NotImplementedError(
                f"{place} receives a {name} of shape {shape} without a batch axis; pass the batch, shaped "
                f"{'(N, L, E)' if module.batch_first else '(L, N, E)'}"
            )
        return [0 if module.batch_first else 1]
    if name == "key_padding_mask":
        return _leaf_axes(value, 0)
    if name == "attn_mask" and isinstance(value, Tensor):
        if value.ndim == 3:
            raise NotImplementedError(
                f"{place} receives a 3-D attn_mask {tuple(value.shape)}, which mixes the samples and the heads "
                "on one axis; pass a 2-D attn_mask (L, S) shared by the samples and key_padding_mask (N, S) for "
                "per-sample masking"
            )
        return [None]
    return _leaf_axes(value, None)


def call_axes(
    module: nn.Module, args: tuple, kwargs: dict, out, n: int, place: str, default: int = 0
) -> tuple[list[int | None], list[int | None]]:
    """The batch axis (or None) of every tensor leaf of the inputs ``(args, kwargs)`` and of the
    output ``out`` of one call of ``module`` on a batch of ``n`` samples (module docstring).
    ``default`` is the axis of modules without an entry in the table (1 inside a sequence-first
    transformer); ``place`` names the module in errors."""
    named = list(zip(_names(module, len(args)), args)) + list(kwargs.items())
    outs = tensor_leaves(out)
    if isinstance(module, nn.RNNBase):
        ins = [a for name, v in named for a in _rnn_input(module, name, v, place)]
        seq = 0 if module.batch_first else 1
        return ins, [seq] + [1] * (len(outs) - 1)  # output, then the final hidden state(s)
    if isinstance(module, nn.MultiheadAttention):
        ins = [a for name, v in named for a in _attention_input(module, name, v, place)]
        seq = 0 if module.batch_first else 1
        return ins, [seq] + [0] * (len(outs) - 1)  # attention output, then the attention weights
    ins = [a for _, v in named for a in _default(v, n, default)]
    return ins, _default(out, n, default)
