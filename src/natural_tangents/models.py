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

Frozen parameters. A parameter with ``requires_grad=False`` is not a coordinate of the Fisher: the
Fishers, Θ̄, α̂ and the empirical NTK are those of the trainable parameters alone, a natural gradient
has ``None`` in a frozen parameter's place, and a module whose parameters are all frozen is not read
at all (it costs nothing beyond the forward pass).

Refused before anything is computed, naming the module and the fix:

* a module that couples the samples of a batch — BatchNorm in training mode (call ``model.eval()``,
  or use GroupNorm/LayerNorm) — and dropout in training mode (the Fisher of a random network);
* a parameter used twice (tied weights: one parameter in two modules, or one parameterized module
  called twice in the forward pass) and parametrized weights (``torch.nn.utils.parametrize``);
* outputs that are not (N, C) or (N,), and parameterized modules whose output is not one tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .layers import kind_of
from .layers.batchnorm import constant_statistics, is_training_batchnorm, rows_pass
from .signals import Signals
from .validation import as_tensor, check_finite, check_outputs

__all__ = ["signals", "output_gradients", "parameterized_modules", "check_model", "has_training_batchnorm", "where"]


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


def output_gradients(
    f: Tensor, outputs: list[Tensor], cotangents: Tensor | None = None, *, retain_graph: bool = False
) -> list[Tensor]:
    """Σ_c m_{n,r,c} ∂f_{n,c}/∂out for every recorded output and every row r, stacked over the rows:
    each (R, *out.shape). ``cotangents`` m (N, R, C); None is the identity (R = C: ∂f_k/∂out).
    One backward pass batched over the R rows (``retain_graph`` keeps the graph, as a backward pass
    run inside another one must)."""
    n, c = f.shape
    if cotangents is None:
        rows = torch.eye(c, dtype=f.dtype, device=f.device)[:, None, :].expand(c, n, c)
    else:
        rows = cotangents.to(f.dtype).permute(1, 0, 2)  # (R, N, C)
    r = rows.shape[0]
    with rows_pass():  # training-mode BatchNorms hold their statistics constant in this pass
        try:
            if r == 1:  # one row: a plain backward pass (no batching machinery)
                one = torch.autograd.grad(f, outputs, rows[0], allow_unused=True, retain_graph=retain_graph)
                grads = [None if g is None else g[None] for g in one]
            else:
                grads = torch.autograd.grad(
                    f, outputs, grad_outputs=rows, is_grads_batched=True, allow_unused=True, retain_graph=retain_graph
                )
        except RuntimeError:  # an op without a batching rule: one backward pass per row
            per_k = [torch.autograd.grad(f, outputs, rows[k], retain_graph=True, allow_unused=True) for k in range(r)]
            grads = [None if g[0] is None else torch.stack(g) for g in zip(*per_k)]
    return [
        torch.zeros(r, *o.shape, dtype=o.dtype, device=o.device) if g is None else g for g, o in zip(grads, outputs)
    ]


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
    check_model(model, batch_statistics)
    modules = parameterized_modules(model, batch_statistics)
    x = _input(model, x, name)
    records: dict[int, list] = {id(m): [] for _, m in modules}
    names = {id(m): n for n, m in modules}

    def hook(module, args, out):
        records[id(module)].append((args, out))

    swap = constant_statistics(model)  # first: the hooks below record the outputs the model goes on with
    swap.__enter__()
    handles = [m.register_forward_hook(hook) for _, m in modules]
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
    for _, m in modules:
        calls = records[id(m)]
        place = f"{where(names[id(m)])} ({_describe(m)})"
        if len(calls) != 1:
            what = "is never called in the forward pass" if not calls else f"is called {len(calls)} times"
            raise NotImplementedError(
                f"{place} {what}: each parameterized module must be used exactly once per forward pass "
                "(a module called twice shares its weights); give each use its own module"
            )
        if not isinstance(calls[0][1], Tensor):
            raise NotImplementedError(f"{place} returns {type(calls[0][1]).__name__}, not one tensor; not supported")
    outs = [records[id(m)][0][1] for _, m in modules]
    grads = output_gradients(f, outs, None if cotangents is None else cotangents(f.detach()))
    layers = []
    for (mname, m), g in zip(modules, grads):
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in records[id(m)][0][0])
        layers.append(kind_of(m)(m, args, g.detach(), where(mname)))
    last = list(model.parameters())[-1]
    return Signals(f=f.detach(), layers=tuple(layers), frozen_output=not last.requires_grad)


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
