"""Users' own PyTorch models: a ``torch.nn.Sequential`` of ``nn.Linear`` layers and elementwise
activations, read as a list of :class:`~natural_tangents.network.AffineLayer` views.

Every Fisher of the library and :class:`~natural_tangents.NGD` accept such a model as they accept a
:class:`~natural_tangents.MLP`::

    model = nn.Sequential(nn.Linear(784, 512), nn.GELU(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
    opt = nat.NGD(model, nat.fisher.KFAC(damping=1e-3), lr=0.5)
    opt.step(x, y)                     # x: (N, 784), y: (N, 10)

The model is read as it is, in the standard parameterization (MATH.md §1 with weight_scale =
bias_scale = 1): each ``nn.Linear`` is one affine layer u_l = W_l h_{l−1} + b_l whose activation is
the composition of the elementwise modules that follow it up to the next ``nn.Linear``. The
views hold the model's own parameter tensors, in its dtype and on its device, so the factors are
those of the model at the moment they are computed and the updates come back aligned with
``model.parameters()`` (per ``nn.Linear``: weight, then bias when present).

Rules (each violation is an error raised before anything is computed, naming the layer):

* The model is an ``nn.Sequential`` (nested ``nn.Sequential`` are flattened) whose forward is
  ``nn.Sequential.forward``; anything else is a ``TypeError``.
* Its layers are ``nn.Linear``, the elementwise activations in :data:`ACTIVATIONS`,
  ``nn.Identity``, ``nn.Flatten()`` (identity on the (N, M) batches of an MLP; before the first
  ``nn.Linear`` it flattens (N, …) inputs to (N, M_0)) and dropout modules that are inactive
  (``p == 0`` or the module in eval mode). Anything else (convolution, normalization, attention,
  embedding, an activation with learnable parameters such as ``nn.PReLU``, active dropout, a
  custom module) is a ``NotImplementedError``: the Fisher of a random (dropout) or non-MLP layer is
  not what the library computes.
* ``model.parameters()`` is exactly the ``nn.Linear`` weights and biases, in order, each used once:
  weight sharing (the same ``nn.Linear`` twice, or one parameter in two layers) and extra
  parameters are a ``NotImplementedError``.
* Modules before the first ``nn.Linear`` are input preprocessing: they are applied to x before the
  factors are computed (the Jacobian of f with respect to the parameters does not depend on how
  the input was produced). Modules after the last ``nn.Linear`` are the output activation φ of the
  last layer, f = φ(u_L), and enter the backward signal δ_L = φ′(u_L) e_k.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import activations as _act
from ._checks import as_tensor, check_batch, check_finite
from .network import MLP, AffineLayer

__all__ = [
    "SequentialLayers",
    "sequential_layers",
    "check_sequential_input",
    "supports",
    "activation_of",
    "ACTIVATIONS",
]


# ---------------------------------------------------------------------------------------------
# Activations read from torch modules
# ---------------------------------------------------------------------------------------------


def TorchActivation(
    fn: Callable[[Tensor], Tensor],
    grad: Callable[[Tensor], Tensor] | None,
    label: str,
    kinks: tuple[float, ...] = (),
) -> _act.Elementwise:
    """An elementwise activation module read as an :class:`~natural_tangents.activations.Elementwise`:
    ``fn`` the module's function (never in place), ``grad`` its closed-form derivative (the one torch's
    autograd uses, including the value at kinks and thresholds) or ``None`` for autograd through ``fn``,
    ``label`` the module's repr."""
    return _act.Elementwise(fn, label=label, kink_points=tuple(kinks), grad=grad)


def _step(u: Tensor, positive: float | Tensor, negative: float | Tensor) -> Tensor:
    """``positive`` where u > 0, else ``negative`` (torch's convention at u = 0: the negative side)."""
    one = torch.ones_like(u)
    return torch.where(u > 0, one * positive, one * negative)


def _softplus(m: nn.Softplus) -> _act.Elementwise:
    beta, threshold = float(m.beta), float(m.threshold)

    def grad(u: Tensor) -> Tensor:  # torch reverts to the identity where βu > threshold
        return torch.where(u * beta > threshold, torch.ones_like(u), torch.sigmoid(u * beta))

    return TorchActivation(lambda u: F.softplus(u, beta, threshold), grad, repr(m))


def _gelu(m: nn.GELU) -> _act.Activation:
    if m.approximate == "none":
        return _act.GELU()
    if m.approximate != "tanh":
        raise NotImplementedError(f"nn.GELU(approximate={m.approximate!r}) is not supported")
    k, c = math.sqrt(2.0 / math.pi), 0.044715

    def grad(u: Tensor) -> Tensor:
        t = torch.tanh(k * (u + c * u**3))
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * k * (1.0 + 3.0 * c * u * u)

    return TorchActivation(lambda u: F.gelu(u, approximate="tanh"), grad, repr(m))


def _leaky_relu(m: nn.LeakyReLU) -> _act.Elementwise:
    s = float(m.negative_slope)
    return TorchActivation(lambda u: F.leaky_relu(u, s), lambda u: _step(u, 1.0, s), repr(m), (0.0,))


def _elu(m: nn.ELU) -> _act.Elementwise:
    a = float(m.alpha)
    return TorchActivation(
        lambda u: F.elu(u, a), lambda u: torch.where(u > 0, torch.ones_like(u), a * torch.exp(u)), repr(m)
    )


def _celu(m: nn.CELU) -> _act.Elementwise:
    a = float(m.alpha)
    return TorchActivation(
        lambda u: F.celu(u, a), lambda u: torch.where(u > 0, torch.ones_like(u), torch.exp(u / a)), repr(m)
    )


# torch's SELU constants (Klambauer et al. 2017), as in torch.nn.functional.selu
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _selu(m: nn.SELU) -> _act.Elementwise:
    def grad(u: Tensor) -> Tensor:
        return _SELU_SCALE * torch.where(u > 0, torch.ones_like(u), _SELU_ALPHA * torch.exp(u))

    return TorchActivation(F.selu, grad, repr(m))


def _silu(m: nn.SiLU) -> _act.Elementwise:
    def grad(u: Tensor) -> Tensor:
        s = torch.sigmoid(u)
        return s * (1.0 + u * (1.0 - s))

    return TorchActivation(F.silu, grad, repr(m))


def _mish(m: nn.Mish) -> _act.Elementwise:
    def grad(u: Tensor) -> Tensor:
        t = torch.tanh(F.softplus(u))
        return t + u * (1.0 - t * t) * torch.sigmoid(u)

    return TorchActivation(F.mish, grad, repr(m))


def _hardtanh(m: nn.Hardtanh) -> _act.Elementwise:  # also nn.ReLU6
    lo, hi = float(m.min_val), float(m.max_val)

    def grad(u: Tensor) -> Tensor:  # torch: 0 at and beyond the clamp points
        return ((u > lo) & (u < hi)).to(u.dtype)

    return TorchActivation(lambda u: F.hardtanh(u, lo, hi), grad, repr(m), (lo, hi))


def _by_autograd(m: nn.Module) -> _act.Elementwise:
    """A parameter-free elementwise module without a closed form here: φ′ by autograd through a
    copy of the module that does not work in place."""
    m = copy.copy(m)
    if getattr(m, "inplace", False):
        m.inplace = False
    return TorchActivation(m, None, repr(m))


def _exact(cls: type[_act.Activation]) -> Callable[[nn.Module], _act.Activation]:
    return lambda m: cls()


#: Elementwise activation modules a ``nn.Sequential`` may hold, and how each is read: the library's
#: activations (ReLU, Tanh, Sigmoid, exact GELU), closed-form derivatives matching torch's autograd,
#: or autograd through the module for the rarer ones. The exact type is looked up (subclasses may
#: override ``forward`` and are not accepted).
ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], _act.Activation]] = {
    nn.ReLU: _exact(_act.ReLU),
    nn.Tanh: _exact(_act.Tanh),
    nn.Sigmoid: _exact(_act.Sigmoid),
    nn.GELU: _gelu,
    nn.Softplus: _softplus,
    nn.LeakyReLU: _leaky_relu,
    nn.ELU: _elu,
    nn.CELU: _celu,
    nn.SELU: _selu,
    nn.SiLU: _silu,
    nn.Mish: _mish,
    nn.Hardtanh: _hardtanh,
    nn.ReLU6: _hardtanh,
    nn.Softsign: _by_autograd,
    nn.Tanhshrink: _by_autograd,
    nn.Hardsigmoid: _by_autograd,
    nn.Hardswish: _by_autograd,
    nn.LogSigmoid: _by_autograd,
    nn.Hardshrink: _by_autograd,
    nn.Softshrink: _by_autograd,
    nn.Threshold: _by_autograd,
}


def activation_of(module: nn.Module) -> _act.Activation | None:
    """The :class:`~natural_tangents.activations.Activation` of an elementwise module, ``None`` for
    a module that is the identity on (N, M) batches (``nn.Identity``, ``nn.Flatten()``, inactive
    dropout). Raises ``NotImplementedError`` for any other module."""
    return _classify(module, "module")[1]


# ---------------------------------------------------------------------------------------------
# Reading a Sequential
# ---------------------------------------------------------------------------------------------


class SequentialLayers(list):
    """The ``list[AffineLayer]`` view of a ``nn.Sequential``, plus what happens to x before the
    first ``nn.Linear``.

    Attributes:
        preprocess: the composed elementwise modules before the first ``nn.Linear`` (applied to x),
            or ``None``.
        flatten_input: whether an ``nn.Flatten()`` precedes the first ``nn.Linear``, so that inputs
            of shape (N, …) are flattened to (N, M_0).
    """

    def __init__(self, layers: list[AffineLayer], preprocess: _act.Activation | None, flatten_input: bool) -> None:
        super().__init__(layers)
        self.preprocess = preprocess
        self.flatten_input = flatten_input

    def __repr__(self) -> str:
        return (
            f"SequentialLayers({list.__repr__(self)}, preprocess={self.preprocess!r}, "
            f"flatten_input={self.flatten_input})"
        )


_IDENTITY = "identity"
_LINEAR = "linear"
_ACTIVATION = "activation"


def _describe(module: nn.Module) -> str:
    text = repr(module).replace("\n", " ")
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


def _classify(module: nn.Module, where: str) -> tuple[str, _act.Activation | None]:
    """(kind, activation) of one leaf module at position ``where``; raises for unsupported ones."""
    kind = type(module)
    if kind is nn.Linear:
        return _LINEAR, None
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return _LINEAR, None  # e.g. an initialized LazyLinear
    own_params = list(module.parameters(recurse=False))
    if kind in ACTIVATIONS or kind is nn.Identity:
        if own_params:  # defensive: a parameter attached to an activation module
            raise NotImplementedError(
                f"{where} ({_describe(module)}) holds parameters; activations with learnable "
                "parameters are not supported"
            )
        if kind is nn.Identity:
            return _IDENTITY, None
        return _ACTIVATION, ACTIVATIONS[kind](module)
    if kind is nn.Flatten:
        if module.start_dim == 1 and module.end_dim == -1:
            return _IDENTITY, None
        raise NotImplementedError(
            f"{where} ({_describe(module)}): only nn.Flatten(start_dim=1, end_dim=-1) is supported"
        )
    if isinstance(module, nn.modules.dropout._DropoutNd):
        if module.p == 0 or not module.training:
            return _IDENTITY, None
        raise NotImplementedError(
            f"{where} ({_describe(module)}) is an active dropout layer (p = {module.p} in training mode): "
            "the Fisher of a random network is not defined here; call model.eval() (dropout is then "
            "the identity) or use p = 0"
        )
    if own_params or list(module.parameters()):
        hint = (
            "activations with learnable parameters are not supported"
            if kind is nn.PReLU
            else "only nn.Linear layers may hold parameters"
        )
        raise NotImplementedError(
            f"{where} ({_describe(module)}) is not supported by natural_tangents: {hint}; a model is a "
            "nn.Sequential of nn.Linear layers and elementwise activations "
            "(see natural_tangents.models.ACTIVATIONS)"
        )
    raise NotImplementedError(
        f"{where} ({_describe(module)}) is not supported by natural_tangents: a model is a nn.Sequential "
        "of nn.Linear layers and elementwise activations (see natural_tangents.models.ACTIVATIONS)"
    )


def _leaves(model: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` in forward order, nested ``nn.Sequential`` flattened, with their
    positions written as ``model[2][0]``."""
    out = []
    for key, child in model._modules.items():
        if child is None:
            continue
        where = f"{prefix}[{key}]" if key.isdigit() else f"{prefix}.{key}"
        if isinstance(child, nn.Sequential):
            _check_sequential(child, where)
            out.extend(_leaves(child, where))
        else:
            out.append((where, child))
    return out


def _check_sequential(model, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{where}: expected a natural_tangents.MLP or a torch.nn.Sequential of nn.Linear layers and "
            f"elementwise activations, got {type(model).__name__}"
        )
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"{where} ({type(model).__name__}) is not a torch.nn.Sequential: natural_tangents reads "
            "only nn.Sequential models of nn.Linear layers and elementwise activations (or "
            "natural_tangents.MLP); write the network as nn.Sequential(...)"
        )
    if type(model).forward is not nn.Sequential.forward:
        raise TypeError(
            f"{where} ({type(model).__name__}) overrides nn.Sequential.forward, so the function it computes "
            "cannot be read from its layers; use a plain nn.Sequential"
        )


def sequential_layers(model: nn.Module) -> SequentialLayers:
    """The :class:`~natural_tangents.network.AffineLayer` views of a ``nn.Sequential``.

    Each ``nn.Linear`` (M_out, M_in) becomes AffineLayer(weight=linear.weight, bias=linear.bias,
    weight_scale=1, bias_scale=1, activation=the composed elementwise modules after it), so the
    network is u_l = W_l h_{l−1} + b_l, h_l = φ_l(u_l), f = h_L (MATH.md §1, standard
    parameterization). The views share the model's parameter tensors; the list is aligned with
    ``model.parameters()`` (per layer the weight, then the bias if any).

    Raises:
        TypeError: ``model`` is not a plain ``nn.Sequential`` (see the module docstring), or its
            layers mix dtypes or devices.
        NotImplementedError: a layer that is not ``nn.Linear`` or a supported elementwise module,
            weight sharing, or parameters outside the ``nn.Linear`` layers; the message names the layer.
        ValueError: no ``nn.Linear`` layer, or consecutive layers whose widths do not chain.
    """
    _check_sequential(model, "model")
    leaves = _leaves(model, "model")
    layers: list[dict] = []
    pre: list[_act.Activation] = []
    flatten_input = False
    seen: dict[int, str] = {}
    for where, module in leaves:
        kind, act = _classify(module, where)
        if id(module) in seen and kind == _LINEAR:
            raise NotImplementedError(
                f"{where} ({_describe(module)}) is the same nn.Linear as {seen[id(module)]}: weight sharing "
                "is not supported (the Fisher's layer structure assumes one use per parameter)"
            )
        seen.setdefault(id(module), where)
        if kind == _LINEAR:
            if torch.nn.parameter.is_lazy(module.weight):
                raise ValueError(f"{where} ({_describe(module)}) is not initialized; run one forward pass first")
            if layers and layers[-1]["linear"].out_features != module.in_features:
                prev = layers[-1]
                raise ValueError(
                    f"{where} ({_describe(module)}) expects {module.in_features} input features but "
                    f"{prev['where']} has {prev['linear'].out_features} outputs"
                )
            layers.append({"where": where, "linear": module, "acts": []})
        elif kind == _ACTIVATION:
            (layers[-1]["acts"] if layers else pre).append(act)
        elif not layers and type(module) is nn.Flatten:
            flatten_input = True
    if not layers:
        raise ValueError("model: the nn.Sequential has no nn.Linear layer, so there is nothing to train")
    _check_parameters(model, layers)
    first = layers[0]["linear"].weight
    for entry in layers:
        lin = entry["linear"]
        for p in (lin.weight, lin.bias):
            if p is not None and (p.dtype != first.dtype or p.device != first.device):
                raise TypeError(
                    f"{entry['where']} ({_describe(lin)}) holds a {p.dtype} parameter on {p.device}, "
                    f"the first layer {first.dtype} on {first.device}; move the model with "
                    "model.to(dtype, device)"
                )
    views = [
        AffineLayer(
            weight=e["linear"].weight,
            bias=e["linear"].bias,
            weight_scale=1.0,
            bias_scale=1.0,
            activation=_compose(e["acts"]),
        )
        for e in layers
    ]
    return SequentialLayers(views, _compose(pre), flatten_input)


def _compose(acts: list[_act.Activation]) -> _act.Activation | None:
    if not acts:
        return None
    return acts[0] if len(acts) == 1 else _act.Composed(tuple(acts))


def _check_parameters(model: nn.Module, layers: list[dict]) -> None:
    """``model.parameters()`` must be exactly the layers' weights and biases, in order, once each."""
    expected, owner = [], {}
    for e in layers:
        for p in (e["linear"].weight, e["linear"].bias):
            if p is None:
                continue
            if id(p) in owner:
                raise NotImplementedError(
                    f"{e['where']} ({_describe(e['linear'])}) shares a parameter with {owner[id(p)]}: weight "
                    "sharing is not supported"
                )
            owner[id(p)] = e["where"]
            expected.append(p)
    named = list(model.named_parameters())
    if [id(p) for _, p in named] != [id(p) for p in expected]:
        extra = [name for name, p in named if id(p) not in owner]
        what = f"parameters outside the nn.Linear layers: {extra}" if extra else "a different parameter order"
        raise NotImplementedError(
            f"model.parameters() has {what}; natural_tangents needs exactly the nn.Linear weights and "
            "biases, in order (parametrized weights such as weight_norm are not supported)"
        )


def check_sequential_input(layers: list[AffineLayer], x: Tensor, name: str = "x") -> Tensor:
    """``x`` as the finite (N, M_0) input of the first ``nn.Linear``, in the model's dtype and device.

    Validates like :meth:`natural_tangents.MLP.check_input` (2-D, non-empty, finite, width M_0 =
    the first layer's ``in_features``; ``ValueError`` naming ``name`` otherwise). For a
    :class:`SequentialLayers`, an input of shape (N, …) is first flattened when the model starts
    with ``nn.Flatten()``, and the elementwise modules before the first ``nn.Linear`` are applied
    (the result must be finite too). Returns (N, M_0).
    """
    w = layers[0].weight
    x = as_tensor(x, name, dtype=w.dtype, device=w.device)
    if getattr(layers, "flatten_input", False) and x.ndim > 2:
        x = x.reshape(x.shape[0], -1)
    x = check_batch(x, name, features=layers[0].in_features, dtype=w.dtype, device=w.device)
    pre = getattr(layers, "preprocess", None)
    if pre is not None:
        with torch.no_grad():
            x = pre(x)
        check_finite(x, f"{name} (after the modules before the first nn.Linear)")
    return x


def supports(model: nn.Module) -> bool:
    """Whether the library's Fishers and :class:`~natural_tangents.NGD` accept ``model``: a
    :class:`~natural_tangents.MLP`, or a ``nn.Sequential`` that :func:`sequential_layers` reads.
    Call :func:`sequential_layers` to see why a model is not supported."""
    if isinstance(model, MLP):
        return True
    try:
        sequential_layers(model)
    except (TypeError, NotImplementedError, ValueError):
        return False
    return True
