"""The fast linear algebra behind the Fishers (internal): symmetric positive semi-definite systems
and their zero-damping limits (:mod:`.psd`), batched Cholesky factorizations with SciPy's LAPACK on
worker threads (:mod:`.lapack`, :mod:`.threads`), mixed-precision refinement with a backward-error
certificate (:mod:`.refine`), the block tri-diagonal elimination (:mod:`.tridiagonal`) and the
unit-wise support systems (:mod:`.support`, :mod:`.unit_systems`).

Only :class:`SolverOptions` is public (also ``nat.fisher.SolverOptions``): every route it selects
solves the same systems, so the options trade time for nothing but rounding.
"""

from .options import SolverOptions

__all__ = ["SolverOptions"]
