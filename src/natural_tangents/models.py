"""Users' own PyTorch models: any ``nn.Module`` whose parameters live in Linear, convolution or other
modules, read through hooks on one ordinary forward pass.

Every Fisher of the library, :class:`~natural_tangents.NGD` and :func:`~natural_tangents.empirical_ntk`
accept such a model as they accept a :class:`~natural_tangents.MLP`::

    model = torchvision_like_cnn()            # Conv2d, pooling, skips, Linear, a custom forward …
    opt = nat.NGD(model, nat.fisher.Exact(damping=1e-3), lr="optimal")
    for x, y in loader:
        opt.step(x, y)

How a model is read. Each module that holds trainable parameters of its own is one *layer* of the Fishers
(layer-wise blocks, K-FAC blocks, unit-wise units live inside it), in the order of
``model.parameters()``; its kind comes from :data:`natural_tangents.layers.KINDS`: ``nn.Linear``,
``nn.Conv1d``/``nn.Conv2d``, or the generic kind (per-sample gradients) for anything else. One
forward pass with hooks records each layer's input and output; one backward pass, batched over the C
outputs, gives ∂f_k/∂(layer output) for every sample at once. Skips, pooling, reshapes, shared
parameter-free modules and any nonlinearity are fine: only the parameterized modules are read.

Recurrent and attention layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``, ``nn.MultiheadAttention``, the
stock transformer blocks) are read by the generic kind: every tensor a layer returns that f depends on
gets its output gradient (an LSTM's output and its final states), keyword arguments are kept (masks),
and each tensor has its own batch axis (:mod:`natural_tangents.layers.axes`: ``batch_first``, hidden
states on axis 1). The folding rule: a module holding trainable parameters that is never called in
the forward pass, while a module above it is (``nn.MultiheadAttention.out_proj``, whose weight the
attention uses directly), is read as part of the nearest such module: one layer with the parameters
of both. Its parameters must then be used only inside that module's forward (checked: the per-sample
gradients must add up to ∂f/∂θ); a module whose parameters f does not use at all is refused.

Frozen parameters. A parameter with ``requires_grad=False`` is not a coordinate of the Fisher: the
Fishers, Θ̄, α̂ and the empirical NTK are those of the trainable parameters alone, a natural gradient
has ``None`` in a frozen parameter's place, and a module whose parameters are all frozen is not read
at all (it costs nothing beyond the forward pass).

Refused before anything is computed, naming the module and the fix:

* a module that couples the samples of a batch — BatchNorm in training mode, unless the Fisher holds
  its batch statistics constant (``batch_statistics="constant"``, an approximation; or call
  ``model.eval()``, or use GroupNorm/LayerNorm) — and dropout in training mode (the Fisher of a
  random network);
* a parameter used twice (tied weights: one parameter in two modules, or one parameterized module
  called twice in the forward pass) and parametrized weights (``torch.nn.utils.parametrize``);
* attention and recurrent layers with dropout of their own in training mode (``dropout=`` > 0);
* outputs that are not (N, C) or (N,); when the batch is read, a parameterized module never called (and
  not used by the module above it) or called twice, a module output f depends on without an axis of the
  samples, a ``PackedSequence`` input and a 3-D attention mask (they mix the samples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .layers import LayerSignals, kind_of, reads_conv
from .layers.axes import call_axes, sequence_first, tensor_leaves, with_leaves
from .layers.batchnorm import constant_statistics, is_training_batchnorm
from .layers.generic import generic_signals
from .row_gradients import cotangent_rows, output_gradients, row_gradients
from .signals import Signals
from .validation import as_tensor, check_finite, check_outputs

__all__ = [
    "signals",
    "output_gradients",
    "parameterized_modules",
    "hooked_modules",
    "read_layers",
    "check_model",
    "has_training_batchnorm",
    "where",
]


def _describe(module: nn.Module) -> str:
    text = " ".join(repr(module).replace("\n", " ").split())
    return text if len(text) <= 80 else text[:77] + "..."


def where(name: str) -> str:
    """A module's path written as Python would reach it: ``model.features[0].conv``."""
    out = "model"
    for part in name.split(".") if name else []:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def parameterized_modules(model: nn.Module, batch_statistics: str = "refuse") -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` holding trainable parameters of their own (``requires_grad``), in
    ``model.parameters()`` order."""
    check_model(model, batch_statistics)
    owners: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (name, module))
    out, seen = [], set()
    for p in model.parameters():
        if not p.requires_grad:
            continue
        name, module = owners[id(p)]
        if id(module) not in seen:
            seen.add(id(module))
            out.append((name, module))
    return out


def has_training_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm in training mode (its samples coupled by batch statistics)."""
    return any(is_training_batchnorm(m) for m in model.modules())


def check_model(model, batch_statistics: str = "refuse") -> None:
    """Raise, naming the module and the fix, if the library cannot read ``model`` (module docstring).
    ``batch_statistics="constant"`` accepts BatchNorm in training mode, its batch statistics held
    constant for the curvature (:mod:`natural_tangents.layers.batchnorm`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (or natural_tangents.MLP), got {type(model).__name__}")
    seen_modules: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen_modules and any(p.requires_grad for p in module.parameters(recurse=False)):
            raise NotImplementedError(
                f"{where(name)} ({_describe(module)}) is the same module as {where(seen_modules[id(module)])}: "
                "a parameterized module used twice shares its weights, which the Fisher's layer structure does "
                "not allow; give each use its own module"
            )
        seen_modules.setdefault(id(module), name)
    params = list(model.named_parameters(remove_duplicate=False))
    if not params:
        raise ValueError("model: it has no parameters, so there is nothing to train")
    if not any(p.requires_grad for _, p in params):
        raise ValueError(
            "model: every parameter is frozen (requires_grad=False), so the Fisher has no coordinates; "
            "unfreeze the parameters to train with p.requires_grad_(True)"
        )
    first: dict[int, str] = {}
    for name, p in params:
        if id(p) in first and p.requires_grad:
            raise NotImplementedError(
                f"{where(name)} is the same parameter as {where(first[id(p)])} (tied weights): the Fisher's layer "
                "structure needs each parameter used once; untie them (give each module its own parameter)"
            )
        first[id(p)] = name
    from torch.nn.utils import parametrize

    for name, module in model.named_modules():
        if is_training_batchnorm(module) and batch_statistics != "constant":
            raise NotImplementedError(
                f"{where(name)} ({_describe(module)}) is a BatchNorm in training mode: it couples the samples of "
                "a batch, so there is no per-sample Jacobian; pass batch_statistics='constant' to the Fisher "
                "(the batch statistics held constant for the curvature, the approximation of K-FAC libraries), "
                "call model.eval() (running statistics), or use GroupNorm/LayerNorm"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise NotImplementedError(
                f"{where(name)} ({_describe(module)}) is an active dropout layer (p = {module.p} in training "
                "mode): the Fisher of a random network is not defined here; call model.eval() or use p = 0"
            )
        if parametrize.is_parametrized(module):
            raise NotImplementedError(
                f"{where(name)} ({_describe(module)}) has parametrized weights (torch.nn.utils.parametrize, "
                "weight_norm); remove the parametrization (e.g. parametrize.remove_parametrizations)"
            )
    _check_sequence_modules(model)


def _check_sequence_modules(model: nn.Module) -> None:
    """Refuse attention and recurrent layers with an active dropout of their own (a float, not a module)."""
    for name, module in model.named_modules():
        inner = isinstance(module, nn.MultiheadAttention) or (isinstance(module, nn.RNNBase) and module.num_layers > 1)
        if inner and module.training and module.dropout > 0:
            raise NotImplementedError(
                f"{where(name)} ({_describe(module)}) applies dropout (p = {module.dropout}) in training mode: the "
                "Fisher of a random network is not defined here; call model.eval() or use dropout=0"
            )


def _input(model: nn.Module, x, name: str):
    """``x`` in the dtype and device of the model's parameters (integer inputs keep their dtype)."""
    p = next(model.parameters())
    if isinstance(x, Tensor) and not x.is_floating_point():
        return x.to(p.device)
    x = as_tensor(x, name)
    x = x.to(dtype=p.dtype if x.is_floating_point() else x.dtype, device=p.device)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch with the sample axis first, got shape {tuple(x.shape)}")
    check_finite(x, name)
    return x


def hooked_modules(model: nn.Module, batch_statistics: str = "refuse") -> list[tuple[str, nn.Module]]:
    """The modules whose calls a reading of ``model`` records: those holding trainable parameters and
    every module above them (a module that is never called is read as part of the nearest module
    above it that is; see :func:`read_layers`)."""
    check_model(model, batch_statistics)
    return [(name, m) for name, m in model.named_modules() if any(p.requires_grad for p in m.parameters())]


def signals(
    model: nn.Module,
    x,
    name: str = "x",
    *,
    cotangents: Callable[[Tensor], Tensor] | None = None,
    batch_statistics: str = "refuse",
) -> Signals:
    """The :class:`~natural_tangents.signals.Signals` of the batch ``x`` (sample axis first) for any
    supported model: one forward pass with hooks, one backward pass batched over the output rows.

    Returns signals whose layers follow ``model.parameters()``; f is (N, C) (a model returning (N,)
    has C = 1). By default the rows are the C outputs (J_n). ``cotangents(f)`` (N, R, C), computed
    from the outputs, gives the rows m_n J_n instead — the rows of a Fisher, e.g. sampled or observed
    gradients of the loss (:mod:`natural_tangents.fisher.rows`) — without forming J.
    ``batch_statistics="constant"`` reads a model with BatchNorm in training mode, its batch statistics
    held constant (:mod:`natural_tangents.layers.batchnorm`).
    """
    if hasattr(model, "signals") and callable(model.signals):  # natural_tangents.MLP: closed-form signals
        check_model(model)
        out = model.signals(x, name, cotangents=cotangents)
        check_outputs(model, out.f)
        return out
    hooked = hooked_modules(model, batch_statistics)
    x = _input(model, x, name)
    records: dict[int, list] = {id(m): [] for _, m in hooked}

    def hook(module, args, kwargs, out):
        records[id(module)].append((args, kwargs, out))

    swap = constant_statistics(model)  # first: the hooks below record the outputs the model goes on with
    swap.__enter__()
    handles = [m.register_forward_hook(hook, with_kwargs=True) for _, m in hooked]
    try:
        with torch.enable_grad():
            f = model(x)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"{name}: the model's forward pass failed on an input of shape {tuple(x.shape)}: {err}"
        ) from err
    finally:
        for h in handles:
            h.remove()
        swap.__exit__(None, None, None)
    f = _check_output(f, x.shape[0])
    check_outputs(model, f)
    layers = read_layers(model, records, f, None if cotangents is None else cotangents(f.detach()))
    last = list(model.parameters())[-1]
    return Signals(f=f.detach(), layers=layers, frozen_output=not last.requires_grad)


@dataclass
class _Layer:
    """One layer of the Fishers: a called module, its trainable parameters (by their names relative to
    it) and the never-called modules below it whose parameters it holds (``folded``)."""

    name: str
    module: nn.Module
    params: dict[str, Tensor] = field(default_factory=dict)
    folded: list[tuple[str, nn.Module]] = field(default_factory=list)


def _caller(name: str, records: dict, named: dict) -> str | None:
    """The nearest module above ``name`` that was called (``""``, the model, when none below it was)."""
    parts = name.split(".") if name else []
    for k in range(len(parts) - 1, -1, -1):
        above = ".".join(parts[:k])
        if records.get(id(named[above])):
            return above
    return None


def _never_called(name: str, module: nn.Module) -> NotImplementedError:
    return NotImplementedError(
        f"{where(name)} ({_describe(module)}) is never called in the forward pass: each parameterized module must "
        "be used exactly once per forward pass (a module called twice shares its weights); give each use its own "
        "module, or freeze the unused one (requires_grad_(False))"
    )


def _plan(model: nn.Module, records: dict) -> list[_Layer]:
    """The layers of one forward pass, in ``model.parameters()`` order (the folding rule: a module
    holding trainable parameters that is never called, e.g. ``nn.MultiheadAttention.out_proj``, whose
    weight the attention uses directly, belongs to the layer of the nearest module above it that is)."""
    named = dict(model.named_modules())
    index = {id(p): i for i, p in enumerate(model.parameters())}
    layers: dict[int, _Layer] = {}
    for name, m in parameterized_modules(model, "constant"):  # the caller checked the model
        target = name if records.get(id(m)) else _caller(name, records, named)
        if target is None:
            raise _never_called(name, m)
        owner = named[target]
        calls = len(records[id(owner)])
        if calls != 1:
            raise NotImplementedError(
                f"{where(target)} ({_describe(owner)}) is called {calls} times: each parameterized module must be "
                "used exactly once per forward pass (a module called twice shares its weights); give each use its "
                "own module"
            )
        layer = layers.setdefault(id(owner), _Layer(target, owner))
        prefix = name[len(target) + 1 :] if target else name
        for k, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                layer.params[f"{prefix}.{k}" if owner is not m else k] = p
        if owner is not m:
            layer.folded.append((name, m))
    for layer in layers.values():
        layer.params = dict(sorted(layer.params.items(), key=lambda kv: index[id(kv[1])]))
    return sorted(layers.values(), key=lambda layer: index[id(next(iter(layer.params.values())))])


def _default_axes(model: nn.Module) -> dict[int, int]:
    """Batch axis 1 for every module inside a sequence-first transformer block (layers.axes)."""
    out = {}
    for m in model.modules():
        if sequence_first(m):
            out.update({id(d): 1 for d in m.modules() if d is not m})
    return out


def _checked_axes(layer: _Layer, call: tuple, n: int, default: int) -> tuple[list, list]:
    """The batch axes of the call's input and output tensors, each batch axis checked to hold N."""
    args, kwargs, out = call
    place = f"{where(layer.name)} ({_describe(layer.module)})"
    ins, outs = call_axes(layer.module, args, kwargs, out, n, place, default)
    for what, leaves, axes in (("input", tensor_leaves((args, kwargs)), ins), ("output", tensor_leaves(out), outs)):
        for t, a in zip(leaves, axes):
            if a is not None and (t.ndim <= a or t.shape[a] != n):
                raise NotImplementedError(
                    f"{place}: its {what} of shape {tuple(t.shape)} should have the N = {n} samples on axis {a}; "
                    "every parameterized module must see the whole batch"
                )
    return ins, outs


def read_layers(
    model: nn.Module, records: dict, f: Tensor, cotangents: Tensor | None = None, *, retain_graph: bool = False
) -> tuple[LayerSignals, ...]:
    """The layer signals of one recorded forward pass of ``model`` with outputs f (N, C).

    ``records`` maps ``id(module)`` of each of :func:`hooked_modules` to its calls, each
    ``(args, kwargs, output)`` as a forward hook saw them (``with_kwargs=True``). One backward pass
    batched over the rows (``cotangents`` m (N, R, C), or the C outputs) gives ∂f/∂(output) for every
    tensor each layer returns; the layer kinds turn them into signals. A layer that returns several
    tensors, takes keyword arguments, holds never-called modules' parameters (the folding rule of
    the module docstring) or has no kind of its own is read by the generic kind, each tensor with its
    batch axis (:mod:`natural_tangents.layers.axes`); a Linear or convolution inside a
    sequence-first transformer gets its input and output gradients with the batch axis moved to the
    front.
    """
    n = f.shape[0]
    plan = _plan(model, records)
    defaults = _default_axes(model)
    rows = cotangent_rows(f, cotangents)
    axes, wanted = [], []  # per layer: (input axes, output axes); the tensors to differentiate
    maps: set[int] = set()  # convolutions' outputs
    for layer in plan:
        call = records[id(layer.module)][0]
        axes.append(_checked_axes(layer, call, n, defaults.get(id(layer.module), 0)))
        wanted += [t for t in tensor_leaves(call[2]) if t.requires_grad]
        if not layer.folded and isinstance(call[2], Tensor) and reads_conv(layer.module):
            maps.add(id(call[2]))
        wanted += [p for _, m in layer.folded for p in m.parameters(recurse=False) if p.requires_grad]
    grads = dict(zip(map(id, wanted), row_gradients(f, wanted, rows, retain_graph, frozenset(maps))))
    for layer in plan:  # a never-called module whose parameters f does not use: refused before any work
        for name, m in layer.folded:
            if all(grads.get(id(p)) is None for p in m.parameters(recurse=False) if p.requires_grad):
                raise _never_called(name, m)
    out = []
    for layer, (ins, outs) in zip(plan, axes):
        args, kwargs, result = records[id(layer.module)][0]
        place = f"{where(layer.name)} ({_describe(layer.module)})"
        leaves = tensor_leaves(result)
        g = [grads.get(id(t)) for t in leaves]
        for i, (t, gi, a) in enumerate(zip(leaves, g, outs)):
            if a is None and gi is not None and bool(gi.any()):
                raise NotImplementedError(
                    f"{place}: its output tensor {i} of shape {tuple(t.shape)} has no axis of the N = {n} samples, "
                    "and the model's output depends on it, so it has no per-sample gradient; return per-sample "
                    "tensors (sample axis first) from modules holding parameters"
                )
        kept = [a if gi is not None else None for a, gi in zip(outs, g)]  # an output f does not use: left out
        cots = [rows.new_zeros(()).expand(len(rows), *t.shape) if gi is None else gi for t, gi in zip(leaves, g)]
        args = tuple(with_leaves(tuple(args), iter(_detached(tensor_leaves(tuple(args))))))
        kwargs = with_leaves(kwargs, iter(_detached(tensor_leaves(kwargs))))
        kind = kind_of(layer.module)
        direct = kind is not generic_signals and not layer.folded and isinstance(result, Tensor) and not kwargs
        if direct and ins and ins[0] is not None and outs[0] is not None and isinstance(args[0], Tensor):
            first = args[0].movedim(ins[0], 0)
            signals = kind(
                layer.module, (first, *args[1:]), cots[0].movedim(outs[0] + 1, 1).detach(), where(layer.name)
            )
        else:
            signals = generic_signals(
                layer.module,
                args,
                tuple(c.detach() for c in cots),
                where(layer.name),
                kwargs=kwargs,
                params=layer.params,
                axes=(ins, kept),
            )
            _check_folded(layer, signals, grads, place)
        out.append(signals)
    return tuple(out)


def _detached(leaves: list[Tensor]) -> list[Tensor]:
    """``leaves`` detached, a tensor given twice (self-attention's query, key and value) detached once."""
    seen: dict[int, Tensor] = {}
    return [seen.setdefault(id(t), t.detach()) for t in leaves]


def _check_folded(layer: _Layer, signals: LayerSignals, grads: dict, place: str) -> None:
    """Refuse a never-called module whose parameters the model uses outside the forward of the layer
    holding them: their per-sample gradients summed over the samples must equal ∂f/∂θ."""
    if not layer.folded:
        return
    cols = {}
    start = 0
    for p in layer.params.values():
        cols[id(p)] = slice(start, start + p.numel())
        start += p.numel()
    for name, m in layer.folded:
        g = signals.g
        for p in (p for p in m.parameters(recurse=False) if p.requires_grad):
            want = grads.get(id(p))
            want = torch.zeros_like(g[0, :, cols[id(p)]]) if want is None else want.reshape(g.shape[1], -1)
            got = g[:, :, cols[id(p)]].sum(0)
            tol = 10 * torch.finfo(g.dtype).eps ** 0.5
            if float((got - want).norm()) > tol * max(float(want.norm()), float(got.norm()), 1e-300):
                raise NotImplementedError(
                    f"{where(name)} ({_describe(m)}) is never called in the forward pass, so its parameters are read "
                    f"as part of {place}, the nearest module above it that is called; but the model uses them "
                    "outside that module's forward too; use them only inside it, or call the module itself"
                )


def _check_output(f, n: int) -> Tensor:
    if not isinstance(f, Tensor):
        raise NotImplementedError(f"model: its forward returns {type(f).__name__}; expected a tensor (N, C)")
    if f.ndim == 1:
        f = f[:, None]
    if f.ndim != 2 or f.shape[0] != n:
        raise NotImplementedError(
            f"model: its output has shape {tuple(f.shape)}; expected (N, C) = ({n}, C) or ({n},): flatten "
            "extra output axes into C in the model"
        )
    return f
