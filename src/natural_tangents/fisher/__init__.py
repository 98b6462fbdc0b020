"""Fisher information matrices for natural gradient descent, all in dual (N × N) form.

Every class shares one interface (see :class:`~natural_tangents.fisher.base.Fisher`):
``natural_gradient(model, x, y)``, ``coefficient(model, x, x_test=None)``, ``alpha_hat(model, x)`` and
``isotropy(model, x)``; ``fisher.at(model, x)`` binds it to a batch and answers the same questions
without recomputing anything (a :class:`~natural_tangents.fisher.bound.BoundFisher`: ``ExactBatch``,
``LayerwiseBatch``, ``KFACBatch``, ``UnitwiseBatch``, each holding its factorizations as typed state).

=====================  =====================================  ==========================
class                  Fisher                                 α (isotropic Θ̄ = α I)
=====================  =====================================  ==========================
``Exact``              J^T J / N                              1
``Layerwise(sigma)``   S^T (Σ ⊗ I) S / N                      1^T Σ^{-1} 1
``BlockDiagonal``      Σ = I                                  L
``BlockTriDiagonal``   Σ tri-diagonal                         s (L = 3s), s + 1 (3s + 1)
``KFAC``               blockdiag_l (B*_l ⊗ A*_{l−1})          N L (M_0 ≥ N)
``Unitwise``           blockdiag over units                   Σ_{l<L} γ_l M_l / C (+ 1)
=====================  =====================================  ==========================
"""

from ..linalg.options import SolverOptions
from .base import Fisher
from .bound import BoundFisher, Isotropy, flatten_coefficient, isotropy
from .exact import Exact, ExactBatch
from .kfac import KFAC, KFACBatch
from .layerwise import BlockDiagonal, BlockTriDiagonal, Layerwise, LayerwiseBatch, tridiagonal_sigma
from .unitwise import Unitwise, UnitwiseBatch

__all__ = [
    "Fisher",
    "BoundFisher",
    "ExactBatch",
    "LayerwiseBatch",
    "KFACBatch",
    "UnitwiseBatch",
    "SolverOptions",
    "Isotropy",
    "Exact",
    "Layerwise",
    "BlockDiagonal",
    "BlockTriDiagonal",
    "KFAC",
    "Unitwise",
    "isotropy",
    "flatten_coefficient",
    "tridiagonal_sigma",
    "get",
    "ALL",
]

ALL: tuple[type[Fisher], ...] = (Exact, BlockDiagonal, BlockTriDiagonal, KFAC, Unitwise)


def _aliases() -> dict[str, type[Fisher]]:
    out: dict[str, type[Fisher]] = {}
    for cls in (*ALL, Layerwise):
        for key in (cls.name, *cls.aliases):
            out[key] = cls
    return out


def get(name: str | Fisher, **kwargs) -> Fisher:
    """A Fisher from its name or alias (``"exact"``, ``"block_diagonal"``, ``"block_tridiagonal"``,
    ``"kfac"``, ``"unitwise"``, …: each class's ``name`` and ``aliases``) and keyword arguments, or a
    Fisher instance as it is."""
    if isinstance(name, Fisher):
        return name
    key = str(name).strip().lower().replace("-", "_")
    table = _aliases()
    if key not in table:
        raise ValueError(f"fisher: unknown name {name!r}; use one of {sorted(table)}")
    return table[key](**kwargs)
