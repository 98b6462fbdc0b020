"""Training losses and the output-space Fisher each of them induces (docs/conventions.md; the paper's Appendix D).

A loss supplies three things to the natural gradient:

* ``residual(f, y)`` (N, C): the vector r with ∇_θ L = J^T r / N (MSE: f − y; cross-entropy: σ(f) − y);
* ``output_fisher(f)`` (N, C, C) or ``None``: the per-sample output metric Λ_n of the Fisher
  G = J^T Λ J / N + ρ I (``None`` means Λ = I, the MSE case);
* ``value(f, y)`` and ``accuracy(f, y)`` for reporting;
* ``sample_residuals(f, k, generator)`` (N, k, C): the residuals r̂ = ∂ℓ(f, ŷ)/∂f of k labels ŷ drawn
  from the model's predictive distribution p(y | f) per sample, for Monte-Carlo Fishers
  (E_ŷ r̂ r̂^T = Λ, the output metric, without output damping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .validation import as_tensor, check_finite

__all__ = ["MSE", "CrossEntropy", "Loss", "get"]


class Loss:
    """Base class of the losses; see the module docstring for the contract."""

    name = "loss"

    def check_targets(self, y, f: Tensor) -> Tensor:
        raise NotImplementedError

    def value(self, f: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def residual(self, f: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def output_fisher(self, f: Tensor) -> Tensor | None:
        raise NotImplementedError

    def sample_residuals(self, f: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def accuracy(self, f: Tensor, y: Tensor) -> float:
        """Fraction of correct predictions: sign agreement for one output, argmax otherwise."""
        if f.shape[1] == 1:
            ref = y if isinstance(self, MSE) else 2 * y - 1
            return float(((f[:, 0] > 0) == (ref[:, 0] > 0)).to(torch.float64).mean())
        return float((f.argmax(1) == y.argmax(1)).to(torch.float64).mean())


def _targets_2d(y, f: Tensor, name: str = "y") -> Tensor:
    y = as_tensor(y, name).to(dtype=f.dtype, device=f.device)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != f.shape[0]:
        raise ValueError(
            f"{name}: expected targets of shape ({f.shape[0]}, {f.shape[1]}) to match the batch "
            f"(N = {f.shape[0]} inputs, C = {f.shape[1]} outputs), got {tuple(y.shape)}"
        )
    check_finite(y, name)
    return y


@dataclass(frozen=True)
class MSE(Loss):
    """L = (1/2N) Σ_n ||f(x_n) − y_n||²; r = f − y; Λ = I (unit-variance Gaussian model)."""

    name = "mse"

    def check_targets(self, y, f: Tensor) -> Tensor:
        y = _targets_2d(y, f)
        if y.shape[1] != f.shape[1]:
            raise ValueError(f"y: expected {f.shape[1]} target columns (one per output), got {y.shape[1]}")
        return y

    def value(self, f: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((f - y) ** 2).sum(1).mean()

    def residual(self, f: Tensor, y: Tensor) -> Tensor:
        return f - y

    def output_fisher(self, f: Tensor) -> Tensor | None:
        return None

    def sample_residuals(self, f: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """ŷ = f + ε, ε ~ N(0, I) (the unit-variance Gaussian model): r̂ = f − ŷ = −ε."""
        n, c = f.shape
        return -torch.randn(n, k, c, generator=generator, dtype=f.dtype, device=f.device)


@dataclass(frozen=True)
class CrossEntropy(Loss):
    """Softmax cross-entropy L = −(1/N) Σ_n log σ_{y_n}(f(x_n)) (Appendix D).

    r = σ(f) − y and Λ_n = diag(σ_n) − σ_n σ_n^T + ρ̃ I (S.158), where ρ̃ = ``output_damping`` keeps
    Λ invertible (Λ_n 1 = 0 otherwise). Targets are one-hot (N, C) or class indices (N,).
    With a single output (C = 1) this is the logistic loss with targets in {0, 1},
    σ = sigmoid(f) and Λ_n = σ_n(1 − σ_n) + ρ̃.
    """

    output_damping: float = 1e-3
    name = "cross_entropy"

    def __post_init__(self) -> None:
        if not (self.output_damping >= 0):
            raise ValueError(f"output_damping: must be >= 0, got {self.output_damping}")

    def check_targets(self, y, f: Tensor) -> Tensor:
        c = f.shape[1]
        y = as_tensor(y, "y")
        if y.ndim == 1 and c > 1 and not y.is_floating_point():
            if y.shape[0] != f.shape[0]:
                raise ValueError(f"y: expected {f.shape[0]} class indices, got {y.shape[0]}")
            if bool((y < 0).any() | (y >= c).any()):
                raise ValueError(f"y: class indices must lie in [0, {c}), got {y.min()}..{y.max()}")
            return torch.nn.functional.one_hot(y.long(), c).to(dtype=f.dtype, device=f.device)
        if y.ndim == 1 and c > 1:
            raise ValueError(
                f"y: a vector of {y.dtype} values for C = {c} classes; class indices must be an integer tensor "
                f"(e.g. y.long()), or pass one-hot targets of shape ({f.shape[0]}, {c})"
            )
        y = _targets_2d(y, f)
        if y.shape[1] != c:
            raise ValueError(f"y: expected one-hot targets with {c} columns, got {y.shape[1]}")
        if bool((y < 0).any() | (y > 1).any()):
            raise ValueError("y: cross-entropy targets must be probabilities in [0, 1] (one-hot or soft)")
        return y

    def _probs(self, f: Tensor) -> Tensor:
        return torch.sigmoid(f) if f.shape[1] == 1 else torch.softmax(f, dim=1)

    def value(self, f: Tensor, y: Tensor) -> Tensor:
        if f.shape[1] == 1:
            return torch.nn.functional.binary_cross_entropy_with_logits(f, y)
        return -(y * torch.log_softmax(f, dim=1)).sum(1).mean()

    def residual(self, f: Tensor, y: Tensor) -> Tensor:
        return self._probs(f) - y

    def output_fisher(self, f: Tensor) -> Tensor:
        p = self._probs(f)
        if f.shape[1] == 1:
            lam = (p * (1 - p))[:, :, None]
        else:
            lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return lam + self.output_damping * torch.eye(f.shape[1], dtype=f.dtype, device=f.device)

    def sample_residuals(self, f: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """ŷ ~ categorical(softmax f) (Bernoulli(sigmoid f) for one output): r̂ = σ(f) − e_ŷ."""
        p = self._probs(f)
        n, c = f.shape
        if c == 1:
            draw = torch.rand(n, k, 1, generator=generator, dtype=f.dtype, device=f.device)
            return p[:, None, :] - (draw < p[:, None, :]).to(f.dtype)
        labels = torch.multinomial(p.double(), k, replacement=True, generator=generator)  # (N, k)
        return p[:, None, :] - torch.nn.functional.one_hot(labels, c).to(f.dtype)


def get(loss: str | Loss) -> Loss:
    """Resolve ``"mse"``, ``"cross_entropy"`` (alias ``"ce"``) or a :class:`Loss` instance."""
    if isinstance(loss, Loss):
        return loss
    key = str(loss).strip().lower().replace("-", "_")
    if key == "mse":
        return MSE()
    if key in ("cross_entropy", "ce", "crossentropy"):
        return CrossEntropy()
    raise ValueError(f"loss: unknown loss {loss!r}; use 'mse', 'cross_entropy' or a nat.losses.Loss")
