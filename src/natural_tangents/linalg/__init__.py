"""The fast linear algebra behind the Fishers (internal): symmetric positive semi-definite systems
and their zero-damping limits (:mod:`~natural_tangents.linalg.psd`), batched Cholesky
factorizations with SciPy's LAPACK on worker threads (:mod:`~natural_tangents.linalg.lapack`,
:mod:`~natural_tangents.linalg.threads`), mixed-precision refinement with a backward-error
certificate (:mod:`~natural_tangents.linalg.refine`), the block tri-diagonal elimination
(:mod:`~natural_tangents.linalg.tridiagonal`) and the unit-wise support systems
(:mod:`~natural_tangents.linalg.support`, :mod:`~natural_tangents.linalg.unit_systems`).

Only :class:`SolverOptions` is public (also ``nat.fisher.SolverOptions``): every route it selects
solves the same systems, so the options trade time for nothing but rounding.
"""

from .options import SolverOptions

__all__ = ["SolverOptions"]
