"""Infinite-width theory: analytic kernels, the NTK, γ and α, and the coefficient matrices Θ̄.

    import natural_tangents as nat
    k = nat.theory.kernels(x, depth=3, activation="relu", sigma_w2=2.0, sigma_b2=0.5)
    k.ntk, k.per_layer                          # J J^T limits, no 1/N (like nat.empirical_ntk)
    nat.theory.alpha(nat.fisher.BlockDiagonal(), widths=[784, 4096, 4096, 1])       # 3.0
    nat.theory.coefficient(nat.fisher.Exact(), x_test, x, depth=3, activation="relu",
                           sigma_w2=2.0, sigma_b2=0.5)                              # Θ̄(x′, x)

Modules: :mod:`~natural_tangents.theory.architecture` (the :class:`Architecture` dataclass),
:mod:`~natural_tangents.theory.gaussian` (2-D Gaussian expectations: the dispatcher over
:mod:`~natural_tangents.theory.closed_forms`, :mod:`~natural_tangents.theory.quadrature` and
:mod:`~natural_tangents.theory.hermite_series`), :mod:`~natural_tangents.theory.analytic` (the
recursion (S.168)–(S.178), tiled: :func:`kernels`, :func:`ntk`; one tile in
:mod:`~natural_tangents.theory.analytic_tiles`),
:mod:`~natural_tangents.theory.alpha` (γ (S.140), α of every Fisher: the registry
:func:`alpha_rule`), :mod:`~natural_tangents.theory.coefficient` (Θ̄ (S.53), (S.71), (S.105)–(S.124):
the registry :func:`coefficient_rule`). A new Fisher class registers its analytic α and Θ̄ with
``alpha_rule.register`` and ``coefficient_rule.register``.
"""

from .alpha import AlphaQuery, alpha, alpha_rule, gamma, variances
from .analytic import AnalyticKernels, kernels, ntk
from .architecture import Architecture
from .coefficient import CoefficientQuery, coefficient, coefficient_rule
from .gaussian import bivariate_normal_cdf, gaussian_expectations, second_moment

__all__ = [
    "Architecture",
    "AnalyticKernels",
    "kernels",
    "ntk",
    "gamma",
    "alpha",
    "variances",
    "coefficient",
    "alpha_rule",
    "coefficient_rule",
    "AlphaQuery",
    "CoefficientQuery",
    "gaussian_expectations",
    "second_moment",
    "bivariate_normal_cdf",
]
