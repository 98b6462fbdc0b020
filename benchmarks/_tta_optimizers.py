"""The time-to-accuracy benchmark's optimizers, each with its tuning grid (for ``time_to_accuracy.py``).

Every optimizer is driven by the same loop, the one practitioners write::

    opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()

(ASDL's K-FAC through its gradient maker, which runs that forward and backward itself). A spec's
``build(model, settings, seed)`` returns ``step(x, y) -> loss``; ``settings`` is one point of its
grid. Grids are small on purpose (the tuning runs are short, see ``time_to_accuracy.py``).

natural-tangents NGD: ``nat.NGD(model, fisher, lr, lr_unit="alpha", kl_clip=1e-3)`` (η = lr / α̂, α̂
this Fisher's isotropy constant measured on the first batch, so that one lr means a comparable step
for every Fisher; the step clipped to a KL trust region), the cross-entropy loss, plain NGD steps
(no momentum), K-FAC with ``output_factor="fisher"``; "every 10" is curvature read every 10 steps
into a running average with decay 0.95 and inverted every 10 steps. Grids: lr × damping.

Peers (optional imports, listed only when importable): ASDL's K-FAC (``asdfghjkl``, imported as
``asdl``; Monte-Carlo Fisher, curvature and inverse every 10 steps, each refresh the batch's own
curvature — ASDL's running average (``ema_decay``) calls CUDA's NVTX and fails on a CPU build — SGD
with momentum 0.9 on the preconditioned gradient, clipped to norm 1 as ASDL's own training
configurations do) and HeavyBall's SOAP and Muon (eager: no torch.compile).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import natural_tangents as nat
from natural_tangents.models import has_training_batchnorm

Step = Callable[[Tensor, Tensor], Tensor]
Builder = Callable[[nn.Module, dict, int], Step]

#: curvature kept across mini-batches: read every 10 steps, running average decay 0.95, inverted every 10
AMORTIZED = {"curvature_every": 10, "inverse_every": 10, "ema": 0.95}
ASDL_CLIP = 1.0
#: NGD's trust region: the step's second-order KL divergence at most this (``NGD(kl_clip=…)``)
KL_CLIP = 1e-3
#: ASDL averages its curvature over this many samples: the batch size of every task
ASDL_DATA_SIZE = 100


@dataclass(frozen=True)
class OptSpec:
    """One optimizer of the benchmark. ``key``: its short name on the command line; ``family``:
    "baseline" (torch), "ngd" (natural-tangents) or "peer"; ``grid``: the settings tried when tuning;
    ``needs``: the module it imports (skipped with a message when absent)."""

    key: str
    name: str
    family: str
    build: Builder
    grid: list[dict] = field(default_factory=list)
    needs: str | None = None

    def available(self) -> bool:
        return self.needs is None or importlib.util.find_spec(self.needs) is not None


def grid(**axes: list) -> list[dict]:
    """Every combination of the axes' values, as settings dicts."""
    names = list(axes)
    return [dict(zip(names, values)) for values in product(*(axes[n] for n in names))]


# ----------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------


def _loop(model: nn.Module, opt: torch.optim.Optimizer, after_backward: Callable[[], None] | None = None) -> Step:
    def step(x: Tensor, y: Tensor) -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        return loss.detach()

    return step


def sgd(model: nn.Module, s: dict, seed: int) -> Step:
    return _loop(model, torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=0.9))


def adam(model: nn.Module, s: dict, seed: int) -> Step:
    return _loop(model, torch.optim.Adam(model.parameters(), lr=s["lr"]))


def ngd(fisher: type, fisher_type: str, amortized: bool) -> Builder:
    """natural-tangents NGD with ``fisher`` (a class of ``nat.fisher``) of ``fisher_type``: the
    recommended settings of :meth:`natural_tangents.NGD.recommended` (KL trust region ``KL_CLIP``,
    lr in units of 1/α̂, K-FAC's output factor the Fisher's), every step or amortized."""

    def build(model: nn.Module, s: dict, seed: int) -> Step:
        extra = {"output_factor": "fisher"} if fisher is nat.fisher.KFAC else {}
        if has_training_batchnorm(model):  # the batch statistics held constant for the curvature
            extra["batch_statistics"] = "constant"
        f = fisher(damping=s["damping"], loss="cross_entropy", fisher_type=fisher_type, **extra)
        kw = AMORTIZED if amortized else {}
        return _loop(model, nat.NGD(model, f, lr=s["lr"], lr_unit="alpha", seed=seed, kl_clip=KL_CLIP, **kw))

    return build


def asdl_kfac(interval: int = 10) -> Builder:
    def build(model: nn.Module, s: dict, seed: int) -> Step:
        import asdl

        torch.manual_seed(seed)  # its Monte-Carlo labels come from torch's global generator
        cfg = asdl.PreconditioningConfig(
            data_size=ASDL_DATA_SIZE, damping=s["damping"], curvature_upd_interval=interval,
            preconditioner_upd_interval=interval,
        )  # fmt: skip  # no ema_decay: ASDL's running average calls CUDA's NVTX and fails on a CPU build
        maker = asdl.KfacGradientMaker(model, cfg, fisher_type="fisher_mc")
        opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=0.9)

        def step(x: Tensor, y: Tensor) -> Tensor:
            opt.zero_grad(set_to_none=True)
            out = maker.setup_model_call(model, x)
            maker.setup_loss_call(F.cross_entropy, out, y)
            _, loss = maker.forward_and_backward()
            nn.utils.clip_grad_norm_(model.parameters(), ASDL_CLIP)
            opt.step()
            return loss.detach()

        return step

    return build


def heavyball(name: str) -> Builder:
    def build(model: nn.Module, s: dict, seed: int) -> Step:
        import heavyball as hb
        import heavyball.utils

        heavyball.utils.compile_mode = None  # eager (no torch.compile)
        return _loop(model, getattr(hb, name)(model.parameters(), lr=s["lr"]))

    return build


# ----------------------------------------------------------------------------------------------
# the list
# ----------------------------------------------------------------------------------------------

# lr in units of 1/α̂, and damping; every NGD run clips its step to a KL trust region of KL_CLIP.
# Without the clip the every-10 runs diverged on the MNIST-1D CNN at every lr from 3e-3 to 0.3 (the
# stale curvature's steps grow); with it every lr from 0.03 to 1 trained there (93-95% validation
# accuracy in 4 s) and on LeNet (97%), so one grid serves every Fisher and Fisher type.
_LR = [0.03, 0.1, 0.3, 1.0]
_DAMPING = [1e-2, 1e-1]


def _ngd_spec(key: str, name: str, fisher: type, fisher_type: str, amortized: bool, lrs: list[float]) -> OptSpec:
    return OptSpec(key, name, "ngd", ngd(fisher, fisher_type, amortized), grid(lr=lrs, damping=_DAMPING))


K, E, U, B = nat.fisher.KFAC, nat.fisher.Exact, nat.fisher.Unitwise, nat.fisher.BlockDiagonal
SPECS: dict[str, OptSpec] = {
    s.key: s
    for s in (
        OptSpec("sgd", "SGD (momentum 0.9)", "baseline", sgd, grid(lr=[0.01, 0.03, 0.1, 0.3])),
        OptSpec("adam", "Adam", "baseline", adam, grid(lr=[3e-4, 1e-3, 3e-3, 1e-2])),
        _ngd_spec("kfac-exp", "K-FAC expectation", K, "expectation", False, _LR),
        _ngd_spec("kfac-mc", "K-FAC mc", K, "mc", False, _LR),
        _ngd_spec("kfac-emp", "K-FAC empirical", K, "empirical", False, _LR),
        _ngd_spec("kfac-exp-10", "K-FAC expectation, every 10", K, "expectation", True, _LR),
        _ngd_spec("kfac-mc-10", "K-FAC mc, every 10", K, "mc", True, _LR),
        _ngd_spec("kfac-emp-10", "K-FAC empirical, every 10", K, "empirical", True, _LR),
        _ngd_spec("exact-exp", "Exact expectation", E, "expectation", False, _LR),
        _ngd_spec("exact-mc", "Exact mc", E, "mc", False, _LR),
        _ngd_spec("exact-emp", "Exact empirical", E, "empirical", False, _LR),
        _ngd_spec("unit-mc-10", "Unit-wise mc, every 10", U, "mc", True, _LR),
        _ngd_spec("blockdiag-exp", "Block-diagonal expectation", B, "expectation", False, _LR),
        OptSpec("asdl-kfac-10", "ASDL K-FAC mc, every 10 (clipped)", "peer", asdl_kfac(10),
                grid(lr=[0.01, 0.03, 0.1], damping=[1e-3, 1e-2]), needs="asdl"),
        OptSpec("soap", "HeavyBall SOAP", "peer", heavyball("SOAP"), grid(lr=[1e-3, 3e-3, 1e-2]), needs="heavyball"),
        OptSpec("muon", "HeavyBall Muon", "peer", heavyball("Muon"), grid(lr=[1e-3, 3e-3, 1e-2, 3e-2]),
                needs="heavyball"),
    )
}  # fmt: skip
