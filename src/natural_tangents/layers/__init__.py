"""Layer kinds: how one parameterized module of a model turns into the signals every Fisher uses.

======================  =================================================================
kind                    module
======================  =================================================================
``linear``              ``nn.Linear`` (and the layers of :class:`~natural_tangents.MLP`)
``conv``                ``nn.Conv1d``, ``nn.Conv2d`` (one group, zero padding)
``batchnorm``           BatchNorm in training mode, the batch statistics held constant
``generic``             any other module with parameters of its own (per-sample gradients)
======================  =================================================================

:data:`KINDS` is an ordered list of (predicate, extractor) pairs; the first predicate that accepts a
module picks its kind. :func:`register` puts a new kind in front. An extractor takes the module, its
positional inputs (sample axis first), the output gradients (C, N, …) and the module's name, and
returns a :class:`~natural_tangents.layers.base.LayerSignals`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .affine import AffineSignals
from .base import LayerSignals, Units
from .batchnorm import batchnorm_signals, is_training_batchnorm
from .conv import conv_signals, is_supported_conv
from .generic import GenericSignals, generic_signals
from .linear import linear_signals

__all__ = ["AffineSignals", "GenericSignals", "LayerSignals", "Units", "KINDS", "register", "kind_of", "reads_conv"]

Extractor = Callable[[nn.Module, tuple, object, str], LayerSignals]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _linear(m, args, grad, name):
    return linear_signals(m, args[0], grad, name)


def _conv(m, args, grad, name):
    return conv_signals(m, args[0], grad, name)


KINDS: list[tuple[Callable[[nn.Module], bool], Extractor]] = [
    (_is_linear, _linear),
    (is_supported_conv, _conv),
    (is_training_batchnorm, batchnorm_signals),
    (lambda m: True, generic_signals),
]


def register(predicate: Callable[[nn.Module], bool], extractor: Extractor) -> None:
    """Read modules accepted by ``predicate`` with ``extractor`` (checked before the built-in kinds)."""
    KINDS.insert(0, (predicate, extractor))


def kind_of(module: nn.Module) -> Extractor:
    """The extractor of the first kind whose predicate accepts ``module``."""
    return next(ex for pred, ex in KINDS if pred(module))


def reads_conv(module: nn.Module) -> bool:
    """Whether ``module`` is read by the built-in convolution kind (which takes its output gradients
    in any memory layout, channels-last fastest)."""
    return kind_of(module) is _conv
