"""The knobs of the fast linear algebra, as one public frozen dataclass.

Every Fisher takes ``options=SolverOptions(...)``; the defaults are what the benchmarks were tuned
with (docs/cost.md). None of them changes what is computed beyond rounding: they choose between
routes that solve the same systems (a float32 factorization refined to a certified float64 backward
error or a float64 one, a Schur complement or the support itself, batch sizes), so tests and users
can force each route through a public option instead of patching the library.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SolverOptions"]


@dataclass(frozen=True)
class SolverOptions:
    """Routes and sizes of the dual-form solves.

    Attributes:
        refine_min_size: unit-wise support systems with at least this many samples (one right-hand
            side, float64) are factored in float32 and refined to a certified float64 backward error;
            smaller ones by float64 Cholesky. A huge value forces float64 throughout, 0 refinement.
        tridiagonal_refine_min_rows: the same for the block tri-diagonal elimination's blocks (rows
            N·C of a layer-wise system).
        refine_steps: the most refinement steps before a system is handed to the float64 route.
        certify: the backward-error bound a refined or iterative solution must meet, as a multiple of
            the bound of a float64 direct solve (size · eps). 1 is that bound; 0 certifies nothing
            (every system takes the float64 direct route).
        complement_fraction: at zero damping, unit-wise supports larger than this fraction of N are
            solved through K^{-1} and the samples outside the support (their Schur complement).
        full_support: damped unit-wise supports this close to N are solved as whole N × N systems.
        chunk_elements: units per batched factorization: chunk · N² at most this (64 MiB in float64).
        cg_elements: unit-wise conjugate gradients: units per pass · N at most this.
        size_spread: a chunk's units differ in support size by at most this factor (padding).
    """

    refine_min_size: int = 96
    tridiagonal_refine_min_rows: int = 512
    refine_steps: int = 8
    certify: float = 1.0
    complement_fraction: float = 0.56
    full_support: float = 0.85
    chunk_elements: int = 2**23
    cg_elements: int = 2**21
    size_spread: float = 1.05

    def __post_init__(self) -> None:
        for name in ("refine_min_size", "tridiagonal_refine_min_rows", "refine_steps", "chunk_elements", "cg_elements"):
            value = getattr(self, name)
            if int(value) != value or value < (1 if name in ("chunk_elements", "cg_elements") else 0):
                raise ValueError(f"{name}: expected a non-negative integer (positive for sizes), got {value!r}")
        if not self.certify >= 0:
            raise ValueError(
                f"certify: expected a multiple >= 0 of the float64 backward-error bound, got {self.certify}"
            )
        for name in ("complement_fraction", "full_support"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected a fraction of N in (0, 1], got {getattr(self, name)}")
        if not self.size_spread >= 1:
            raise ValueError(f"size_spread: expected a factor >= 1, got {self.size_spread}")
