"""The paper's experiments (Karakida and Osawa, NeurIPS 2020), each a module with ``measure``,
``predict`` and ``plot`` joined by ``run(settings) -> Result`` (see :mod:`.common`).

``natural-tangents reproduce NAME`` runs one, ``reproduce all`` runs them all and writes a report.
"""

from __future__ import annotations

from . import (
    alpha_shift,
    authors_example,
    cnn_conditions,
    condition,
    convergence,
    cross_entropy,
    generalization,
    kfac_forster,
    learning_rate,
    tridiagonal,
    unitwise,
)
from .common import Check, Result, Settings, write

REGISTRY = {
    m.NAME: m
    for m in (
        convergence,
        unitwise,
        condition,
        alpha_shift,
        tridiagonal,
        kfac_forster,
        learning_rate,
        generalization,
        cross_entropy,
        authors_example,
        cnn_conditions,
    )
}

__all__ = ["REGISTRY", "Check", "Result", "Settings", "write"]
