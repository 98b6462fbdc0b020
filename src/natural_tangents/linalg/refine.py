"""Mixed-precision iterative refinement with a backward-error certificate: the one routine behind
every refined solve of the library (the unit-wise support systems, the block tri-diagonal
elimination).

A system A z = c is factored in a lower precision (float32: two to three times the rate of float64
for the small and medium factorizations that dominate a step on a CPU), and the solution is refined
with residuals c − A z computed in the working precision (float64) until its normwise backward error

    η = ‖c − A z‖ / (‖A‖ ‖z‖ + ‖c‖)

is at most ``certify`` · size · eps, the bound a direct solve in the working precision guarantees
(‖A‖ replaced by a lower bound, so the check errs towards rejecting). This is LAPACK's ``dsgesv``
strategy with a certificate in place of its convergence test. Systems that are not certified within
``refine_steps`` (a condition number near 1 / eps of float32, a factorization that broke down) are
reported, for the caller to solve in the working precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .options import SolverOptions

__all__ = ["refine"]


def refine(
    apply: Callable[[Tensor], Tensor],
    approx: Callable[[Tensor], Tensor],
    c: Tensor,
    a_norm: Tensor | float,
    factored: Tensor,
    size: int,
    options: SolverOptions,
) -> tuple[Tensor, Tensor]:
    """Refine the solutions of B systems at once.

    Args:
        apply: z ↦ A z for every system, (B, m) → (B, m), in the working precision.
        approx: r ↦ an approximate A^{-1} r (the low-precision factorization), (B, m) → (B, m).
        c: (B, m) right-hand sides in the working precision.
        a_norm: (B,) or a number, a lower bound on each ‖A‖.
        factored: (B,) bool, the systems whose low-precision factorization succeeded (the others are
            reported as not certified).
        size: the systems' order for the bound (size · eps).
        options: ``refine_steps`` and ``certify``.

    Returns:
        z (B, m) and certified (B,) bool; an uncertified system's z is not to be used.
    """
    c_norm = c.norm(dim=1)
    bound = options.certify * size * torch.finfo(c.dtype).eps
    z = approx(c)
    certified = torch.zeros_like(factored)
    for step in range(options.refine_steps + 1):
        res = c - apply(z)
        res_norm = res.norm(dim=1)
        eta = torch.where(res_norm == 0, 0.0, res_norm / (a_norm * z.norm(dim=1) + c_norm))
        certified = factored & (eta <= bound)
        if step == options.refine_steps or bool((certified | ~factored).all()):
            break
        z = torch.where(certified[:, None], z, z + approx(res))
    return z, certified
