"""Closed-form linearized training dynamics (the paper's (S.24)–(S.26), Appendix B.4; see docs/conventions.md).

For a linearized model trained with a fixed preconditioner, discrete steps of size η obey

    f_{t+1}(x) − f_t(x) = −η K(x, x) (f_t(x) − y),     f_{t+1}(x′) − f_t(x′) = −η K(x′, x) (f_t(x) − y)

with K = Θ̄ = J G^{-1} J^T / N for NGD (S.4) and K = Θ = J J^T / N for gradient descent. Solved:

    f_t(x′) = f_0(x′) + K(x′, x) K(x, x)^{-1} (I − (I − η K(x, x))^t) (y − f_0(x))        (S.26)

Normalization: the paper's, with the 1/N inside K, and the loss L = (1/2N) Σ_n ||f(x_n) − y_n||².
The library's kernel functions return J J^T *without* the 1/N, so pass
``nat.empirical_ntk(net, x) / N`` or ``nat.theory.ntk(x, ...) / N`` to :func:`gd`; every
``coefficient`` (``nat.fisher.*.coefficient``, ``nat.theory.coefficient``) already carries it.

K(x, x) is symmetric positive semi-definite: it is eigendecomposed once, K = V diag(λ) V^T, and
K^{-1}(I − (I − ηK)^t) = V diag((1 − (1 − ηλ)^t)/λ) V^T answers any step t in O((N C)²), with the
limit ηt for λ = 0 (a singular K is fine). Outputs of C ≥ 1 dimensions are flattened sample-major
(index n·C + k); kernels are (N′, N) for C = 1 or (N′, N, C, C).

:func:`min_norm` gives the B.4 solution θ*_λ = (λ G_0 + J^T J / N)^{-1} J^T y / N (S.125) and its
λ → 0 limit, the point NGD converges to.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .validation import as_tensor, check_finite, check_lr

__all__ = ["LinearizedDynamics", "ngd", "gd", "linearized", "MinNormSolution", "min_norm"]

_F64 = torch.float64
_SYMMETRY_TOL = 1e-4  # relative; catches a wrong matrix, not the rounding of an ill-conditioned Θ̄


# ---------------------------------------------------------------------------- validation
def _flat_kernel(k, name: str, c: int | None = None) -> tuple[Tensor, int]:
    """(N′, N) or (N′, N, C, C) → (N′·C, N·C) float64, sample-major; returns (matrix, C)."""
    k = as_tensor(k, name, dtype=_F64)
    check_finite(k, name)
    if k.ndim == 2:
        kc = 1
        flat = k
    elif k.ndim == 4 and k.shape[2] == k.shape[3]:
        kc = k.shape[2]
        flat = k.movedim(2, 1).reshape(k.shape[0] * kc, k.shape[1] * kc)
    else:
        raise ValueError(f"{name}: expected shape (N', N) or (N', N, C, C), got {tuple(k.shape)}")
    if c is not None and kc != c:
        raise ValueError(f"{name}: has {kc} outputs per sample but the training kernel has {c}")
    return flat, kc


def _flat_outputs(f, name: str, n: int, c: int) -> tuple[Tensor, tuple[int, ...]]:
    """(N,) or (N, C) → (N·C,) float64 and the shape to restore."""
    f = as_tensor(f, name, dtype=_F64)
    check_finite(f, name)
    if f.ndim == 1 and c == 1 and f.shape[0] == n:
        return f, tuple(f.shape)
    if f.ndim == 2 and tuple(f.shape) == (n, c):
        return f.reshape(-1), tuple(f.shape)
    want = f"({n},) or ({n}, {c})" if c == 1 else f"({n}, {c})"
    raise ValueError(f"{name}: expected shape {want} to match the kernel, got {tuple(f.shape)}")


def _check_steps(steps) -> tuple[Tensor, bool]:
    """Steps as a float64 vector of non-negative integers; and whether a single step was given."""
    single = isinstance(steps, numbers.Integral) or (isinstance(steps, Tensor | np.ndarray) and steps.ndim == 0)
    t = torch.as_tensor(np.asarray(steps, dtype=np.float64)).reshape(-1)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t != t.round()).any()):
        raise ValueError(f"steps: expected a non-negative integer or a sequence of them, got {steps!r}")
    return t, single


# ------------------------------------------------------------------------------ dynamics
@dataclass(frozen=True, eq=False)
class LinearizedDynamics:
    """Closed-form f_t of (S.26) on the training (and optionally test) inputs; see the module docstring.

    Build it with :func:`ngd`, :func:`gd` or :func:`linearized`. Attributes are the cached
    factorization (eigenvalues λ and eigenvectors V of K(x, x), flat), the learning rate, and the
    flat targets, initial outputs and projected test kernel K(x′, x) V.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    lr: float
    coeffs: Tensor  # V^T (y − f_0(x))
    y: Tensor
    f0_train: Tensor
    train_shape: tuple[int, ...]
    test_projection: Tensor | None = None  # K(x′, x) V
    f0_test: Tensor | None = None
    test_shape: tuple[int, ...] | None = None

    @property
    def n_train(self) -> int:
        return self.train_shape[0]

    def _gain(self, t: Tensor) -> Tensor:
        """(T, NC): (1 − (1 − ηλ)^t)/λ, with ηt at λ = 0 and expm1/log1p where ηλ is small."""
        lam = self.eigenvalues[None, :]
        x = self.lr * lam
        tt = t[:, None]
        small = x.abs() < 1e-3
        x_small = torch.where(small, x, torch.zeros_like(x))
        series = -torch.expm1(tt * torch.log1p(-x_small))
        direct = 1.0 - torch.pow(1.0 - x, tt)
        one_minus = torch.where(small, series, direct)
        safe = torch.where(lam == 0, torch.ones_like(lam), lam)
        return torch.where(lam == 0, self.lr * tt.expand_as(one_minus), one_minus / safe)

    def _shape(self, flat: Tensor, shape: tuple[int, ...], single: bool) -> Tensor:
        out = flat.reshape(flat.shape[0], *shape)
        return out[0] if single else out

    def train(self, steps: int | Sequence[int]) -> Tensor:
        """f_t on the training inputs: the shape of ``y`` (N,) or (N, C), with a leading (T,) for a
        sequence of T steps."""
        t, single = _check_steps(steps)
        g = self._gain(t) * self.eigenvalues  # 1 − (1 − ηλ)^t
        flat = self.f0_train + (g * self.coeffs) @ self.eigenvectors.T
        return self._shape(flat, self.train_shape, single)

    def test(self, steps: int | Sequence[int]) -> Tensor:
        """f_t on the test inputs (S.26): the shape of ``f0_test``, with a leading (T,) for a sequence."""
        if self.test_projection is None:
            raise ValueError(
                "theta_bar_test: this predictor was built without test inputs; pass theta_bar_test and f0_test"
            )
        t, single = _check_steps(steps)
        flat = self.f0_test + (self._gain(t) * self.coeffs) @ self.test_projection.T
        return self._shape(flat, self.test_shape, single)

    def loss(self, steps: int | Sequence[int]) -> Tensor:
        """Training loss (1/2N) Σ_n ||f_t(x_n) − y_n||² at each step, float64 (scalar or (T,))."""
        t, single = _check_steps(steps)
        g = self._gain(t) * self.eigenvalues
        # in the eigenbasis the residual is (1 − ηλ)^t V^T (f_0 − y) = −(1 − g) coeffs
        out = 0.5 * (((1.0 - g) * self.coeffs) ** 2).sum(-1) / self.n_train
        return out[0] if single else out

    def __call__(self, steps: int | Sequence[int]) -> tuple[Tensor, Tensor | None]:
        """(train predictions, test predictions or None) at ``steps``."""
        return self.train(steps), (self.test(steps) if self.test_projection is not None else None)


def linearized(
    kernel_train,
    y,
    f0_train,
    lr: float,
    kernel_test=None,
    f0_test=None,
    *,
    name: str = "kernel_train",
    test_name: str = "kernel_test",
) -> LinearizedDynamics:
    """Closed-form dynamics for any symmetric PSD training kernel K(x, x) (with the 1/N); see
    :func:`ngd` and :func:`gd` for the two uses."""
    k, c = _flat_kernel(kernel_train, name)
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"{name}: must be the square training kernel K(x, x), got shape {tuple(k.shape)}")
    scale = float(k.abs().max()) or 1.0
    if float((k - k.T).abs().max()) > _SYMMETRY_TOL * scale:
        raise ValueError(
            f"{name}: must be symmetric (K(x, x) = J G^{{-1}} J^T / N); got an asymmetric matrix — "
            "pass the kernel on the training inputs, with x_test = None"
        )
    n = k.shape[0] // c
    lr = check_lr(lr, allow_optimal=False)
    yf, shape = _flat_outputs(y, "y", n, c)
    f0, _ = _flat_outputs(f0_train, "f0_train", n, c)
    lam, vec = torch.linalg.eigh(0.5 * (k + k.T))
    coeffs = vec.T @ (yf - f0)
    proj = f0t = tshape = None
    if (kernel_test is None) != (f0_test is None):
        raise ValueError(f"{test_name}, f0_test: pass both (test predictions) or neither")
    if kernel_test is not None:
        kt, _ = _flat_kernel(kernel_test, test_name, c)
        if kt.shape[1] != k.shape[0]:
            raise ValueError(
                f"{test_name}: expected shape (N', {n}{'' if c == 1 else f', {c}, {c}'}) against the "
                f"{n} training inputs, got {tuple(as_tensor(kernel_test, test_name).shape)}"
            )
        f0t, tshape = _flat_outputs(f0_test, "f0_test", kt.shape[0] // c, c)
        proj = kt @ vec
    return LinearizedDynamics(
        eigenvalues=lam,
        eigenvectors=vec,
        lr=lr,
        coeffs=coeffs,
        y=yf,
        f0_train=f0,
        train_shape=shape,
        test_projection=proj,
        f0_test=f0t,
        test_shape=tshape,
    )


def ngd(
    theta_bar_train,
    y,
    f0_train,
    lr: float,
    theta_bar_test=None,
    f0_test=None,
) -> LinearizedDynamics:
    """Closed-form linearized NGD (S.26): f_t(x′) = f_0(x′) + Θ̄(x′, x) Θ̄^{-1} (I − (I − ηΘ̄)^t)(y − f_0(x)).

    Args:
        theta_bar_train: Θ̄(x, x) = J G^{-1} J^T / N, (N, N) or (N, N, C, C), symmetric PSD
            (e.g. ``fisher.coefficient(net, x)`` or ``nat.theory.coefficient(fisher, None, x, ...)``).
        y: targets (N,) or (N, C). f0_train: initial outputs, same shape.
        lr: η (η = 1/α converges in one step when Θ̄ = α I).
        theta_bar_test: Θ̄(x′, x), (N′, N) or (N′, N, C, C); f0_test: f_0(x′), (N′,) or (N′, C).

    Returns:
        A :class:`LinearizedDynamics`: ``.train(t)``, ``.test(t)``, ``.loss(t)`` for a step or a list.
    """
    return linearized(
        theta_bar_train,
        y,
        f0_train,
        lr,
        theta_bar_test,
        f0_test,
        name="theta_bar_train",
        test_name="theta_bar_test",
    )


def gd(ntk_train, y, f0_train, lr: float, ntk_test=None, f0_test=None) -> LinearizedDynamics:
    """Closed-form linearized gradient descent f_{t+1} = f_t − η Θ (f_t − y), Θ = J J^T / N.

    The kernels carry the paper's 1/N: pass ``nat.empirical_ntk(net, x) / N`` (and
    ``nat.empirical_ntk(net, x_test, x) / N``), or ``nat.theory.ntk(...) / N``. Shapes and return
    value as in :func:`ngd`. In the NTK parameterization η = O(1) is stable for η < 2/λ_max(Θ).
    """
    return linearized(ntk_train, y, f0_train, lr, ntk_test, f0_test, name="ntk_train", test_name="ntk_test")


# ------------------------------------------------------------------------------ min norm
@dataclass(frozen=True, eq=False)
class MinNormSolution:
    """The B.4 solution: parameter displacement θ (P,) and its linear predictions J θ on the training
    inputs (shape of the targets) and, if a test Jacobian was given, on the test inputs."""

    params: Tensor
    train: Tensor
    test: Tensor | None = None


def min_norm(
    jacobian,
    targets,
    metric=None,
    *,
    lam: float = 0.0,
    jacobian_test=None,
) -> MinNormSolution:
    """θ*_λ = argmin_θ (1/2N)||y − Jθ||² + (λ/2) θ^T G θ = (λG + J^T J / N)^{-1} J^T y / N (S.125).

    Computed in dual form (S.126): θ*_λ = G^{-1} J^T (λN I + J G^{-1} J^T)^{-1} y. With ``lam = 0``
    (default) it is the limit λ → 0, G^{-1} J^T (J G^{-1} J^T)^{-1} y: the G-minimum-norm interpolant,
    to which NGD with the preconditioner G converges from θ_0 = 0 (or, with y → y − f_0(x), the
    displacement θ_∞ − θ_0 of the linearized model) (B.4).

    Args:
        jacobian: J, (N·C, P) rows sample-major, or (N, P) for C = 1.
        targets: y, (N,) or (N, C).
        metric: G, (P, P) symmetric positive definite (e.g. J^T J / N + ρI with ρ > 0); None for
            G = I (the minimum-Euclidean-norm solution, the limit of gradient descent).
        lam: λ ≥ 0.
        jacobian_test: optional J(x′), (N′·C, P), for test predictions J(x′) θ.

    Returns:
        :class:`MinNormSolution` (float64).
    """
    j = as_tensor(jacobian, "jacobian", dtype=_F64)
    check_finite(j, "jacobian")
    y = as_tensor(targets, "targets", dtype=_F64)
    check_finite(y, "targets")
    if j.ndim != 2:
        raise ValueError(f"jacobian: expected a 2-D (N·C, P) matrix, got shape {tuple(j.shape)}")
    if y.ndim not in (1, 2) or y.numel() != j.shape[0]:
        raise ValueError(
            f"targets: expected (N,) or (N, C) with N·C = {j.shape[0]} (the Jacobian's rows), "
            f"got shape {tuple(y.shape)}"
        )
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam: the regularization λ must be a finite number >= 0, got {lam}")
    n = y.shape[0]
    p = j.shape[1]
    if metric is None:
        z = j.T
    else:
        g = as_tensor(metric, "metric", dtype=_F64)
        check_finite(g, "metric")
        if tuple(g.shape) != (p, p):
            raise ValueError(f"metric: expected the ({p}, {p}) matrix G, got shape {tuple(g.shape)}")
        chol, info = torch.linalg.cholesky_ex(0.5 * (g + g.T))
        if int(info) != 0:
            raise ValueError("metric: G must be symmetric positive definite; add damping (G = J^T J / N + ρI, ρ > 0)")
        z = torch.cholesky_solve(j.T, chol)  # G^{-1} J^T, (P, N·C)
    k = j @ z + lam * n * torch.eye(j.shape[0], dtype=_F64)
    chol, info = torch.linalg.cholesky_ex(0.5 * (k + k.T))
    pivots = torch.diagonal(chol) ** 2
    if int(info) != 0 or float(pivots.min()) <= k.shape[0] * torch.finfo(_F64).eps * float(pivots.max()):
        raise ValueError(
            "jacobian: J G^{-1} J^T is singular (the rows of J are linearly dependent, e.g. P < N·C or "
            "duplicate inputs); use lam > 0"
        )
    theta = z @ torch.cholesky_solve(y.reshape(-1, 1), chol).squeeze(1)
    test = None
    if jacobian_test is not None:
        jt = as_tensor(jacobian_test, "jacobian_test", dtype=_F64)
        if jt.ndim != 2 or jt.shape[1] != p:
            raise ValueError(f"jacobian_test: expected shape (N'·C, {p}), got {tuple(jt.shape)}")
        test = jt @ theta
        if y.ndim == 2:
            test = test.reshape(-1, y.shape[1])
    return MinNormSolution(params=theta, train=(j @ theta).reshape(y.shape), test=test)
