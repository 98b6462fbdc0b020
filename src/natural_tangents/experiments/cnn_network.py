"""The CNN of the ``cnn-conditions`` experiment, its data, and what is measured on one network.

The network (L = 3 parameterized layers, as the paper's MLP; no biases)::

    (N, 1, 28, 28) → Scale → conv 3×3, stride 2, padding 1 (1 → M) → ReLU → 2×2 average pool
    → Scale → conv 3×3, stride 2, padding 1 (M → M) → ReLU → global average pool → Scale → linear (M → C)

(14 × 14 positions in the first convolution, 4 × 4 in the second). NTK-style parameterization: the
stock ``nn.Conv2d``/``nn.Linear`` layers have N(0, 1) weights, and each is preceded by a
parameter-free :class:`Scale` by σ_w/√fan_in (σ_w² = 2; fan_in = C_in·k², or M for the readout), so
the layer kernels Θ_l = J_l J_l^T / N have a width limit and a damping is measured against O(1)
kernels; the layers stay stock modules, read by the library's convolution kind (KFC, output channels
as units).

At ρ = 0 the choice does not change Θ̄ on the training set (so α̂, the condition number and the
linearized step): the standard parameterization with the same effective weights (He initialization)
multiplies each layer's Jacobian by a constant c_l and its Fisher blocks (layer, Kronecker factor,
unit) by c_l², and each Fisher's pseudo-inverse undoes it. The network's step is unchanged too for
the block-structured Fishers, not for the exact one: with P > N·C its G^+ is the minimum-norm step
in each parameterization's own metric.

Data: N unit-norm MNIST images (the paper's Assumption 2), digits 0 vs 7 with targets ±1 for C = 1,
ten classes with one-hot targets for C = 10; MSE loss.

Per Fisher (:func:`measure_bound`): Θ̄(x, x) = J G^{-1} J^T / N (S.4), its isotropy, and one NGD
step with η = 1/α̂ on the network and on its linearization; :func:`rank_formula` gives α̂ at ρ = 0 from
the ranks of the layers' Jacobians (and K-FAC's factors) alone.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import fisher as _fisher
from .. import theory
from ..data import load_mnist_subset, mnist_binary, normalize
from ..models import signals as model_signals
from ..signals import Signals
from .common import mse

__all__ = [
    "METHODS",
    "DEPTH",
    "SIGMA_W2",
    "RELATIVE_DAMPING",
    "Scale",
    "network",
    "mnist_ten_classes",
    "inputs",
    "fishers",
    "Measurement",
    "one_step",
    "measure_bound",
    "measure_fisher",
    "alpha_mlp",
    "rank_formula",
    "measure_network",
]

METHODS = ("exact", "block_diagonal", "block_tridiagonal", "kfac", "unitwise")
DEPTH = 3
SIGMA_W2 = 2.0
KERNEL = 3
#: the small damping, as a fraction of λ̄ = tr Θ / (N·C) of the network
RELATIVE_DAMPING = 1e-3


class Scale(nn.Module):
    """x ↦ c x, no parameters: the NTK parameterization's σ_w/√fan_in in front of a stock layer."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = float(c)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.c

    def extra_repr(self) -> str:
        return f"c={self.c:.4g}"


def network(channels: int, outputs: int, *, seed: int, dtype=torch.float64, device="cpu") -> nn.Sequential:
    """The CNN of the module docstring with M = ``channels`` and C = ``outputs``; weights N(0, 1) from
    ``seed``. Input (N, 1, H, W) (28 × 28 for MNIST; any H, W ≥ 1), output (N, C)."""
    if channels < 1 or outputs < 1:
        raise ValueError(f"channels, outputs: expected positive integers, got {channels}, {outputs}")
    gen = torch.Generator().manual_seed(seed)
    k2 = KERNEL * KERNEL
    conv1 = nn.Conv2d(1, channels, KERNEL, stride=2, padding=1, bias=False)
    conv2 = nn.Conv2d(channels, channels, KERNEL, stride=2, padding=1, bias=False)
    readout = nn.Linear(channels, outputs, bias=False)
    with torch.no_grad():
        for layer in (conv1, conv2, readout):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64))
    net = nn.Sequential(
        Scale(math.sqrt(SIGMA_W2 / k2)),
        conv1,
        nn.ReLU(),
        nn.AvgPool2d(2, ceil_mode=True),
        Scale(math.sqrt(SIGMA_W2 / (k2 * channels))),
        conv2,
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        Scale(math.sqrt(SIGMA_W2 / channels)),
        readout,
    )
    return net.to(dtype=dtype, device=device)


def mnist_ten_classes(n: int, *, seed: int, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """n images (⌈n/10⌉ or ⌊n/10⌋ per digit) from the packaged MNIST subset, drawn reproducibly from
    ``seed``, unit-norm rows (N, 784), and one-hot targets (N, 10)."""
    images, labels = load_mnist_subset(dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for d in range(10):
        pool = torch.nonzero(labels == d).flatten()
        picks.append(pool[torch.randperm(len(pool), generator=gen)[: n // 10 + (d < n % 10)]])
    idx = torch.cat(picks)[torch.randperm(n, generator=gen)]
    y = nn.functional.one_hot(labels[idx], 10).to(dtype)
    return normalize(images[idx]).to(dtype), y


def inputs(outputs: int, n: int, *, seed: int, dtype=torch.float64, device="cpu") -> tuple[Tensor, Tensor]:
    """(x (N, 1, 28, 28) unit-norm images, y (N, C)): digits 0 vs 7 with ±1 targets for C = 1, ten
    classes with one-hot targets for C = 10."""
    if outputs == 1:
        ds = mnist_binary((0, 7), n_train=n, n_test=0, seed=seed, dtype=dtype)
        x, y = ds.x_train, ds.y_train
    elif outputs == 10:
        x, y = mnist_ten_classes(n, seed=seed, dtype=dtype)
    else:
        raise ValueError(f"outputs: expected 1 (two digits) or 10 (ten digits), got {outputs}")
    return x.reshape(n, 1, 28, 28).to(device), y.to(device)


def fishers(damping: float = 0.0) -> dict[str, _fisher.Fisher]:
    """The five Fishers of the paper at one damping ρ (0: the ρ → 0 limit)."""
    return {cls.name: cls(damping=damping) for cls in _fisher.ALL}


@dataclass
class Measurement:
    """One Fisher on one network: Θ̄(x, x) flat (N·C, N·C), its isotropy, the one-step loss ratio
    of the network and of its linearization, the step's size relative to the weights ||η Δθ|| / ||θ||,
    and the number of RuntimeWarnings the Fisher raised."""

    theta_bar: Tensor
    isotropy: _fisher.Isotropy
    loss_ratio: float
    loss_ratio_linear: float
    relative_step: float
    warnings: int


def one_step(net: nn.Module, x: Tensor, y: Tensor, update: list[Tensor], lr: float) -> float:
    """The training loss after θ ← θ − lr · update (the parameters are restored afterwards)."""
    params = list(net.parameters())
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, u in zip(params, update):
                p.sub_(u.to(p.dtype), alpha=lr)
            return mse(net(x), y)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def measure_bound(bound: _fisher.BoundFisher, x: Tensor, y: Tensor) -> Measurement:
    """Θ̄ = J G^{-1} J^T / N of a Fisher bound to the batch x of its model (S.4), its isotropy, and one
    NGD step with η = 1/α̂ (the model's parameters are restored)."""
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        theta_bar = _fisher.flatten_coefficient(bound.coefficient())
        iso = _fisher.isotropy(theta_bar)
        update = bound.natural_gradient(y)
    caught = sum(issubclass(w.category, RuntimeWarning) for w in log)
    f0 = bound.signals.f
    r = (f0 - y).to(theta_bar.dtype).reshape(-1)
    lr = 1.0 / iso.alpha
    r1 = r - lr * (theta_bar @ r)
    linear = float(r1.square().sum() / r.square().sum())
    ratio = one_step(bound.model, x, y, update, lr) / mse(f0, y)
    weights = torch.cat([p.detach().reshape(-1) for p in bound.model.parameters()])
    step = lr * torch.cat([u.reshape(-1) for u in update])
    return Measurement(theta_bar, iso, ratio, linear, float(step.norm() / weights.norm()), caught)


def measure_fisher(fisher: _fisher.Fisher, net: nn.Module, x: Tensor, y: Tensor) -> Measurement:
    """:func:`measure_bound` of ``fisher`` bound to the batch (x, y) of ``net``."""
    return measure_bound(fisher.at(net, x), x, y)


def alpha_mlp(method: str, channels: int, outputs: int, n: int) -> float:
    """The closed-form α of the paper's MLP with the same depth and widths [784, M, M, C] (ReLU,
    σ_w² = 2, σ_b² = 0; ``nat.theory.alpha``); NaN where the rule does not apply (K-FAC needs M ≥ N).

    Unit-wise with C > 1: Σ_{l<L} γ_l M_l / C + 1. A hidden unit's per-sample Jacobian rows (one per
    output) are all multiples of that sample's input, so its projection has rank ≤ N (of N·C), and
    the C output units add one projection each of rank N; ``nat.theory.alpha`` gives the paper's C = 1
    count, Σ γ_l M_l + C, which this reduces to at C = 1."""
    widths = [784, channels, channels, outputs]
    kw = {"activation": "relu", "sigma_w2": SIGMA_W2, "sigma_b2": 0.0, "n_train": n}
    try:
        if method == "unitwise" and outputs > 1:
            return theory.alpha(_fisher.get(method), widths=widths, include_output=False, **kw) / outputs + 1.0
        return float(theory.alpha(_fisher.get(method), widths=widths, **kw))
    except ValueError:
        return float("nan")


def rank_formula(sig: Signals, ranks: list[int], rank_total: int) -> dict[str, float]:
    """α̂ at ρ = 0 from ranks alone, per Fisher (NaN where there is no such formula).

    Exact: rank Θ / (N·C) (Θ̄ projects on the range of J). Block diagonal: Σ_l rank Θ_l / (N·C)
    (Θ̄ = Σ_l Θ_l Θ_l^+, (S.71)). Block tri-diagonal: Σ_l (Σ^{-1} 1)_l rank Θ_l / (N·C) (S.74).
    K-FAC, an estimate: Σ_l s_l rank A*_l · rank B*_l / (N·C) with s_L = N for the paper's output
    factor, else 1 — what tr (B*_l ⊗ A*_l)^+ F_l gives if the exact block F_l = J_l^T J_l / N were
    B*_l ⊗ A*_l, i.e. if different positions (and a, δ) were uncorrelated; for the MLP it is N L
    (S.107). ``ranks``: rank Θ_l per layer; ``rank_total``: rank Θ = rank Σ_l Θ_l."""
    nc = sig.n * sig.c
    w = torch.linalg.solve(_fisher.tridiagonal_sigma(len(ranks)), torch.ones(len(ranks), dtype=torch.float64))
    kfac = 0.0
    for l, layer in enumerate(sig.layers):
        kr = layer.kronecker
        rank_a = int(torch.linalg.matrix_rank(kr.a2.double()))
        rank_b = int(torch.linalg.matrix_rank(kr.d.double().reshape(-1, kr.out_width)))
        kfac += (sig.n if l == len(sig.layers) - 1 else 1) * rank_a * rank_b
    return {
        "exact": rank_total / nc,
        "block_diagonal": sum(ranks) / nc,
        "block_tridiagonal": float(w @ torch.tensor(ranks, dtype=torch.float64)) / nc,
        "kfac": kfac / nc,
        "unitwise": float("nan"),
    }


def measure_network(net: nn.Module, x: Tensor, y: Tensor) -> tuple[list[dict], dict]:
    """Every Fisher at ρ = 0 and ρ = 10⁻³ λ̄ on one network: (rows, facts) with facts λ̄ and the row
    rank of each layer's Jacobian (rank Θ_l)."""
    sig = model_signals(net, x)
    rows = []
    zero = fishers(0.0)
    exact = zero["exact"].bind(sig, net)
    kernels = exact.layer_kernels  # (L, N·C, N·C), also the exact Fisher's own at ρ = 0
    lam_bar = float(torch.diagonal(kernels.sum(0)).mean())
    ranks = [int(torch.linalg.matrix_rank(k, hermitian=True)) for k in kernels]
    formula = rank_formula(sig, ranks, int(torch.linalg.matrix_rank(kernels.sum(0), hermitian=True)))
    rho = RELATIVE_DAMPING * lam_bar
    for rel, fs in ((0.0, zero), (RELATIVE_DAMPING, fishers(rho))):
        for name in METHODS:
            bound = exact if fs[name] is zero["exact"] else fs[name].bind(sig, net)
            m = measure_bound(bound, x, y)
            ev = m.isotropy.eigenvalues
            rows.append(
                {
                    "method": name,
                    "damping_relative": rel,
                    "damping": fs[name].damping,
                    "alpha_hat": m.isotropy.alpha,
                    "alpha_rank_formula": formula[name] if rel == 0 else float("nan"),
                    "condition_number": m.isotropy.condition_number,
                    "deviation": m.isotropy.deviation,
                    "rank_fraction": float((ev > 1e-9 * ev[-1]).double().mean()),
                    "loss_ratio": m.loss_ratio,
                    "loss_ratio_linear": m.loss_ratio_linear,
                    "relative_step": m.relative_step,
                    "runtime_warnings": m.warnings,
                }
            )
    return rows, {"lambda_bar": lam_bar, "layer_ranks": ranks}
