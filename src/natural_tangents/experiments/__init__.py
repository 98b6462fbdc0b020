"""The seed's experiments, each a function ``run(settings) -> Result`` (see :mod:`.common`).

``natural-tangents reproduce NAME`` runs one, ``reproduce all`` runs them all and writes a report.
"""

from __future__ import annotations

from . import convergence, cross_entropy, generalization, learning_rate, unitwise
from .common import Check, Result, Settings, write

REGISTRY = {m.NAME: m for m in (convergence, unitwise, learning_rate, generalization, cross_entropy)}

__all__ = ["REGISTRY", "Check", "Result", "Settings", "write"]
