"""The step-cost table of the time-to-accuracy benchmark: one training step of each optimizer as a
multiple of one SGD step, on the LeNet-style CNN with batches of 100 (for ``time_to_accuracy.py``).

Protocol (paired, in one process): after ``warmup`` steps of every optimizer, each of ``rounds``
rounds times, for every optimizer in turn, ``k`` SGD steps immediately followed by ``k`` steps of
that optimizer (each step: zero_grad, forward, loss, backward, curvature work, update; one
``perf_counter`` per step, synchronized on a GPU). A round's ratio is the mean step time of the
optimizer over the mean of the SGD steps just before it, so it is the amortized cost when ``k`` is
a multiple of every refresh interval (10 here). Reported: the median ratio over rounds and its
quartiles, and the median step time. Inputs: fixed standard-normal images and random labels; the
learning rates are tiny (1e-4; the step's cost does not depend on them).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import natural_tangents as nat
from _tta_optimizers import SPECS, Builder, adam, asdl_kfac, ngd, sgd
from _tta_tasks import lenet

TINY = {"lr": 1e-4, "damping": 1e-2}


@dataclass(frozen=True)
class CostRow:
    """A step-cost row: the optimizer, its builder and the module it needs (None: torch only)."""

    name: str
    build: Builder
    needs: str | None = None


K, E, U = nat.fisher.KFAC, nat.fisher.Exact, nat.fisher.Unitwise
COST_ROWS = [
    CostRow("SGD (momentum 0.9)", sgd),
    CostRow("Adam", adam),
    CostRow("K-FAC expectation, every step", ngd(K, "expectation", False)),
    CostRow("K-FAC mc, every step", ngd(K, "mc", False)),
    CostRow("K-FAC empirical, every step", ngd(K, "empirical", False)),
    CostRow("Exact mc (dual N × N), every step", ngd(E, "mc", False)),
    CostRow("Unit-wise mc (on the convolutions too), every step", ngd(U, "mc", False)),
    CostRow("Unit-wise mc, every 10", ngd(U, "mc", True)),
    CostRow("K-FAC mc, curvature and inverse every 10", ngd(K, "mc", True)),
    CostRow("K-FAC expectation, curvature and inverse every 10", ngd(K, "expectation", True)),
    CostRow("ASDL K-FAC mc, every step", asdl_kfac(1), needs="asdl"),
    CostRow("ASDL K-FAC mc, every 10", asdl_kfac(10), needs="asdl"),
    CostRow("HeavyBall SOAP (eager)", SPECS["soap"].build, needs="heavyball"),
    CostRow("HeavyBall Muon (eager)", SPECS["muon"].build, needs="heavyball"),
]


def _available(row: CostRow) -> bool:
    return row.needs is None or importlib.util.find_spec(row.needs) is not None


def step_costs(
    rounds: int, k: int, warmup: int, device: torch.device, sync: Callable[[], None], rows: list[CostRow] | None = None
) -> dict:
    """The table's rows: {name: {"ratio", "q1", "q3", "step_ms"} or {"error"}};
    also "skipped": the rows whose module is absent."""
    rows = COST_ROWS if rows is None else rows
    torch.manual_seed(0)
    x = torch.randn(100, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (100,), device=device)
    init = lenet().to(device)
    steps, out, skipped = {}, {}, []
    for row in rows:
        if not _available(row):
            skipped.append(f"step cost: {row.name} skipped, {row.needs} is not installed")
            continue
        model = lenet().to(device)
        model.load_state_dict(init.state_dict())
        try:
            step = row.build(model, TINY, 0)
            for _ in range(warmup):
                step(x, y)
            steps[row.name] = step
        except Exception as err:  # a peer's failure (its version) or an unsupported case: say so and go on
            out[row.name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    baseline = steps[rows[0].name]

    def block(step) -> list[float]:
        times = []
        for _ in range(k):
            sync()
            t0 = time.perf_counter()
            step(x, y)
            sync()
            times.append(time.perf_counter() - t0)
        return times

    ratios: dict[str, list[float]] = {n: [] for n in steps}
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            base = block(baseline)
            own = block(step)
            ratios[name].append(statistics.fmean(own) / statistics.fmean(base))
            times[name].extend(own)
    for row in rows:
        if row.name not in steps:
            continue
        r = sorted(ratios[row.name])
        q1, q3 = (statistics.quantiles(r, n=4)[0], statistics.quantiles(r, n=4)[2]) if len(r) > 1 else (r[0], r[0])
        out[row.name] = {
            "ratio": statistics.median(r), "q1": q1, "q3": q3, "step_ms": 1e3 * statistics.median(times[row.name]),
        }  # fmt: skip
    return {"rows": {row.name: out[row.name] for row in rows if row.name in out}, "skipped": skipped,
            "rounds": rounds, "k": k, "warmup": warmup}  # fmt: skip
