"""Data parallelism with torch.distributed: 2 and 3 gloo processes on 127.0.0.1 with uneven shards
against the single-process run on the whole batch (every Fisher's natural gradient, Θ̄ and α̂ to
1e-10, an NGD step, GD steps, and the History that nat.train records), and the refusals
(uninitialized group, differing replicas, differing shards).

Each rank is a fresh Python process (tests/_dist_worker.py) with a timeout, so a hung collective
fails the test instead of the suite; the port is picked free for each run.
"""

import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import _dist_worker as W
import natural_tangents as nat

WORKER = Path(W.__file__)
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(case: str, world: int, tmp_path, *extra: str) -> list[dict]:
    port = _free_port()
    outs = [tmp_path / f"{case}-{world}-{r}.pt" for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), case, str(r), str(world), str(port), str(outs[r]), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(o, weights_only=False) for o in outs]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference():
    net, x, y, labels = W.problem()
    return W.results(net, x, y, labels, None)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """``sharded(world)``: every rank's results of the "fishers" case, run once per world size."""
    runs = {}

    def run(world: int) -> list[dict]:
        if world not in runs:
            runs[world] = _run("fishers", world, tmp_path_factory.mktemp(f"fishers-{world}"))
        return runs[world]

    return run


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_batch_equals_the_single_process_run(world, sharded, reference):
    ranks = sharded(world)
    for got in ranks:
        assert "ok" in got, got.get("error")
        got = got["ok"]
        for name in W.FISHERS:
            want = reference[name]
            assert len(got[name]["ng"]) == len(want["ng"])
            for a, b in zip(got[name]["ng"], want["ng"]):
                assert _rel(a, b) < 1e-10, name
            assert _rel(got[name]["coef"], want["coef"]) < 1e-10, name
            assert got[name]["alpha"] == pytest.approx(want["alpha"], rel=1e-10), name
        for a, b in zip(got["after_step"], reference["after_step"]):
            assert _rel(a, b) < 1e-10
        for a, b in zip(got["gd_delta"], reference["gd_delta"]):  # data-parallel GD: the whole batch's steps
            assert _rel(a, b) < 1e-10
    # every rank holds the identical update
    for other in ranks[1:]:
        for a, b in zip(other["ok"]["exact"]["ng"], ranks[0]["ok"]["exact"]["ng"]):
            assert torch.equal(a, b)


@pytest.fixture(scope="module")
def trained_reference():
    _, x, y, labels = W.problem()
    return W.trained(x, y, labels, *W.test_batch(), None)


@pytest.mark.parametrize("world", [2, 3])
def test_train_records_the_whole_batch_history(world, sharded, trained_reference):
    """nat.train(..., process_group=) on uneven shards of the training and the test batch: every rank
    records the single-process run's whole-batch losses and accuracies (train and test), distances
    and learning rate, for NGD and GD, and its own rows of the outputs."""
    for r, got in enumerate(sharded(world)):
        assert "ok" in got, got.get("error")
        for method, want in trained_reference.items():
            hist = got["ok"]["train"][method]
            assert hist.steps == want.steps == [0, 1, 2, 3], method
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "distance"):
                assert getattr(hist, key) == pytest.approx(getattr(want, key), rel=1e-10, abs=1e-14), (method, key)
            assert hist.lr == pytest.approx(want.lr, rel=1e-10), method
            for mine, whole in zip(hist.f_train, want.f_train):
                rows = W.shard(torch.from_numpy(whole), r, world).numpy()
                assert np.allclose(mine, rows, rtol=1e-10, atol=1e-12), method
            for mine, whole in zip(hist.f_test, want.f_test):
                rows = W.shard(torch.from_numpy(whole), r, world, W.TEST_SPLITS).numpy()
                assert np.allclose(mine, rows, rtol=1e-10, atol=1e-12), method


@pytest.mark.parametrize(
    ("case", "patterns"),
    [
        ("mismatched_parameters", [r"parameters on rank 1 differ from rank 0's.*broadcast"] * 2),
        ("mismatched_width", [r"rank 1 could not compute", r"x: expected 6 features"]),
        ("mismatched_outputs", [r"rank 1 has a different parameter count"] * 2),
    ],
)
def test_mismatched_replicas_and_shards_are_refused_on_every_rank(case, patterns, tmp_path):
    ranks = _run(case, 2, tmp_path)
    for got, pattern in zip(ranks, patterns):
        assert "error" in got, f"{case}: rank computed a result instead of refusing"
        assert re.search(pattern, got["error"]), got["error"]


def test_ranks_share_the_tiles_of_the_empirical_kernel_in_memory_and_in_one_file(tmp_path):
    net, x, _, _ = W.problem()
    want = nat.empirical_ntk(net, x)
    path = tmp_path / "kernel.npy"
    ranks = _run("empirical_kernel", 2, tmp_path, str(path))
    for got in ranks:
        assert "ok" in got, got.get("error")
        for key in ("memory", "file"):
            assert float((got["ok"][key] - want).abs().max()) <= 1e-12 * float(want.abs().max()), key
    stored = torch.from_numpy(np.load(path)).permute(2, 3, 0, 1)  # (C, C, N, N) layout on disk
    assert float((stored - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_an_uninitialized_process_group_is_refused():
    net, x, y, _ = W.problem()
    with pytest.raises(RuntimeError, match=r"process_group: torch\.distributed is not initialized"):
        nat.fisher.Exact().natural_gradient(net, x, y, process_group=object())
    with pytest.raises(RuntimeError, match=r"not initialized"):
        nat.NGD(net, nat.fisher.Exact(), process_group=object())
