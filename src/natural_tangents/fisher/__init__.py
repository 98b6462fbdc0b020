"""Fisher information matrices for natural gradient descent, all in dual (N × N) form.

Every class shares one interface (see :class:`~natural_tangents.fisher.base.Fisher`):
``natural_gradient(model, x, y)``, ``coefficient(model, x, x_test=None)`` and ``isotropy(model, x)``.

=====================  =====================================  ==========================
class                  Fisher                                 α (isotropic Θ̄ = α I)
=====================  =====================================  ==========================
``Exact``              J^T J / N                              1
``Layerwise(sigma)``   S^T (Σ ⊗ I) S / N                      1^T Σ^{-1} 1
``BlockDiagonal``      Σ = I                                  L
``BlockTriDiagonal``   Σ tri-diagonal                         s (L = 3s), s + 1 (3s + 1)
``KFAC``               blockdiag_l (B*_l ⊗ A*_{l−1})          N L (M_0 ≥ N)
``Unitwise``           blockdiag over units                   Σ_{l<L} γ_l M_l (+ C)
=====================  =====================================  ==========================
"""

from .base import Fisher, Isotropy, flatten_coefficient, isotropy
from .exact import Exact
from .kfac import KFAC
from .layerwise import BlockDiagonal, BlockTriDiagonal, Layerwise, tridiagonal_sigma
from .unitwise import Unitwise

__all__ = [
    "Fisher",
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

_ALIASES = {
    "exact": Exact,
    "block_diagonal": BlockDiagonal,
    "blockdiagonal": BlockDiagonal,
    "bd": BlockDiagonal,
    "block_tridiagonal": BlockTriDiagonal,
    "blocktridiagonal": BlockTriDiagonal,
    "tridiagonal": BlockTriDiagonal,
    "kfac": KFAC,
    "k_fac": KFAC,
    "unitwise": Unitwise,
    "unit_wise": Unitwise,
}


def get(name: str | Fisher, **kwargs) -> Fisher:
    """A Fisher from its name (``"exact"``, ``"block_diagonal"``, ``"block_tridiagonal"``,
    ``"kfac"``, ``"unitwise"``) and keyword arguments, or a Fisher instance as it is."""
    if isinstance(name, Fisher):
        return name
    key = str(name).strip().lower().replace("-", "_")
    if key not in _ALIASES:
        raise ValueError(f"fisher: unknown name {name!r}; use one of {sorted(set(_ALIASES))}")
    return _ALIASES[key](**kwargs)
