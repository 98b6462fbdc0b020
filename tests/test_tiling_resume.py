"""Out-of-core kernels that are interrupted: killed runs (SIGKILL in a subprocess, one and two ranks)
resumed against the uninterrupted kernel, counting every computed tile; the unfinished file never at
``out``; stale, live and foreign locks; re-runs with other arguments; an existing finished ``out``
(library ``overwrite=`` and the command's ``--force``)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import natural_tangents as nat
from natural_tangents import cli_kernel, theory
from natural_tangents.tiling import fingerprint, finished_tiles, tiled, tiles

F64 = torch.float64
OPTS = {"depth": 3, "activation": "relu", "sigma_w2": 2.0, "sigma_b2": 0.1}


def _x(n: int = 23, m: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _beside(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _run(script: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


# ------------------------------------------------------------------------------ killed and resumed
KILLED_GRAM = """
    import os, signal, sys, torch
    from natural_tangents.tiling import fingerprint, tiled
    out, log, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    x = torch.randn(23, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    def block(r, c):
        with open(log, "a") as f:
            f.write(f"{r.start} {c.start}\\n")
        return x[r] @ x[c].T
    def on_tile(index, rows, cols):
        on_tile.seen += 1
        if on_tile.seen == k:
            os.kill(os.getpid(), signal.SIGKILL)
    on_tile.seen = 0
    tiled(block, 23, batch_size=4, out=out, signature=(fingerprint(x),), threads=1, checkpoint=0, on_tile=on_tile)
"""


def test_a_killed_run_leaves_no_file_at_out_and_resumes_without_recomputing(tmp_path):
    """tiled into a file, killed (SIGKILL) after 5 of 21 recorded tiles, then resumed: every tile is
    computed exactly once over the two runs, and the result is the uninterrupted kernel."""
    out, log = tmp_path / "k.npy", tmp_path / "computed.txt"
    done = _run(KILLED_GRAM, str(out), str(log), "5")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    every = tiles(23, None, 4)
    first = [tuple(int(v) for v in line.split()) for line in log.read_text().splitlines()]
    assert len(first) == 5 and finished_tiles(out) == set(range(5))  # checkpoint=0: all 5 recorded
    # the unfinished kernel is not at out; its unfinished tiles are zeros in the .partial file
    assert not out.exists() and _beside(out, ".partial").exists() and _beside(out, ".lock").exists()
    x = _x()
    want = x @ x.T
    partial = np.load(_beside(out, ".partial"))
    r, c = every[-1]
    assert float(np.abs(partial[r, c]).max()) == 0.0 and float(want[r, c].abs().max()) > 0
    r, c = every[4]
    assert np.array_equal(partial[r, c], (x[r] @ x[c].T).numpy())  # a recorded tile

    second: list[tuple[int, int]] = []

    def block(r, c):
        second.append((r.start, c.start))
        return x[r] @ x[c].T

    with pytest.warns(UserWarning) as notes:
        got = tiled(block, 23, batch_size=4, out=out, signature=(fingerprint(x),), threads=2)
    text = " ".join(str(n.message) for n in notes)
    assert "took over the lock" in text and "no longer running" in text  # the dead run's stale lock
    assert "resuming the interrupted run" in text and "5 of 21 tiles" in text
    computed = Counter(first + second)
    assert set(computed) == {(r.start, c.start) for r, c in every} and max(computed.values()) == 1
    mirrored = torch.triu(want) + torch.triu(want, 1).T  # the engine keeps the diagonal tiles' upper triangle
    assert torch.equal(got, tiled(lambda r, c: x[r] @ x[c].T, 23, batch_size=4)) and torch.allclose(got, mirrored)
    assert np.array_equal(np.load(out), got.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["computed.txt", "k.npy"]  # no partial, journal, lock


KILLED_NTK = """
    import os, signal, sys, torch
    from natural_tangents import theory
    out, log = sys.argv[1], sys.argv[2]
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    def on_tile(index, rows, cols):  # the first recorded tile: die
        with open(log, "w") as f:
            f.write(str(index))
        os.kill(os.getpid(), signal.SIGKILL)
    theory.ntk(x, batch_size=3, out=out, on_tile=on_tile, depth=3, activation="erf", sigma_w2=1.5, sigma_b2=0.2)
"""


def test_a_killed_analytic_ntk_resumes_from_its_journal(tmp_path):
    """nat.theory.ntk(out=) with its default threads and checkpoint, killed at its first recorded
    tile: the re-run computes exactly the tiles the journal lacks and gives the uninterrupted kernel."""
    out, log = tmp_path / "ntk.npy", tmp_path / "first.txt"
    done = _run(KILLED_NTK, str(out), str(log), env={"OMP_NUM_THREADS": "2"})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    journal = finished_tiles(out)
    assert int(log.read_text()) in journal and not out.exists()
    total = len(tiles(40, None, 3))
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    opts = {"depth": 3, "activation": "erf", "sigma_w2": 1.5, "sigma_b2": 0.2}
    again: list[int] = []
    with pytest.warns(UserWarning) as notes:
        got = theory.ntk(x, batch_size=3, out=out, on_tile=lambda i, r, c: again.append(i), **opts)
    assert [Path(n.filename).name for n in notes] == [Path(__file__).name] * 2  # the user's line
    assert "took over the lock" in str(notes[0].message)
    assert f"{len(journal)} of {total} tiles were done" in str(notes[1].message)
    assert len(again) == len(set(again)) and set(again) == set(range(total)) - journal
    assert torch.equal(got, theory.ntk(x, batch_size=3, **opts))
    assert float((got - theory.ntk(x, **opts)).abs().max()) < 1e-13


RANK = """
    import datetime, os, signal, sys, torch, torch.distributed as dist
    from natural_tangents import theory
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    x = torch.randn(29, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    def on_tile(index, rows, cols):
        os.kill(os.getpid(), signal.SIGKILL)
    theory.ntk(x, batch_size=5, out=out, process_group=dist.group.WORLD, on_tile=on_tile,
               depth=3, activation="relu", sigma_w2=2.0, sigma_b2=0.1)
"""


def test_two_killed_ranks_leave_one_journal_each_and_one_process_resumes_them(tmp_path):
    """Two gloo ranks share the tiles round-robin and each records its own in its own journal; both
    are killed at their first recorded tile; a single process resumes from the union of the journals."""
    out = tmp_path / "ntk.npy"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(RANK), str(r), port, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, logs
    heads = [json.loads(_beside(out, s).read_text().splitlines()[0]) for s in (".journal", ".journal.1")]
    assert heads[0] == heads[1] and heads[0]["tiles"] == len(tiles(29, None, 5))  # one header, two writers
    assert finished_tiles(out) == {0, 1}  # rank 0's first tile and rank 1's first tile
    x = _x(29, 6)
    again: list[int] = []
    with pytest.warns(UserWarning) as notes:  # rank 0's lock taken over, then the resume
        got = theory.ntk(x, batch_size=5, out=out, on_tile=lambda i, r, c: again.append(i), **OPTS)
    assert "2 of 21 tiles were done" in str(notes[-1].message)
    assert sorted(again) == list(range(2, 21))
    assert torch.equal(got, theory.ntk(x, batch_size=5, **OPTS))
    assert not _beside(out, ".journal.1").exists() and not _beside(out, ".journal").exists()


# --------------------------------------------------------------------------- interrupted in-process
class Stop(Exception):
    pass


def _interrupt(x, out, after: int = 3, **opts) -> None:
    """theory.ntk into ``out``, stopped by an exception (as Ctrl-C would) after ``after`` tiles."""
    seen = []

    def stop(i, r, c):
        seen.append(i)
        if len(seen) == after:
            raise Stop

    with pytest.raises(Stop):
        theory.ntk(x, batch_size=4, out=out, on_tile=stop, **{**OPTS, **opts})


def test_an_exception_keeps_the_finished_tiles_and_releases_the_lock(tmp_path):
    out, x = tmp_path / "k.npy", _x()
    _interrupt(x, out)
    assert finished_tiles(out) == {0, 1, 2} and not out.exists() and not _beside(out, ".lock").exists()
    again = []
    with pytest.warns(UserWarning, match="3 of 21 tiles were done"):
        got = theory.ntk(x, batch_size=4, out=out, on_tile=lambda i, r, c: again.append(i), **OPTS)
    assert sorted(again) == list(range(3, 21)) and torch.equal(got, theory.ntk(x, batch_size=4, **OPTS))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"x": _x(seed=1)}, "other inputs or settings"),  # same shape, other data
        ({"sigma_b2": 0.3}, "other inputs or settings"),
        ({"batch_size": 5}, "batch_size (the tile side) 4 there, 5 here"),
        ({"x": _x(n=20)}, "shape [23, 23] there, [20, 20] here"),
        ({"dtype": torch.float32}, "dtype float64 there, float32 here"),
    ],
)
def test_a_re_run_with_other_arguments_is_refused_unless_overwrite(tmp_path, change, named):
    """The unfinished run is kept (its tiles do not match); overwrite=True discards it and starts afresh."""
    out, x = tmp_path / "k.npy", _x()
    _interrupt(x, out)
    args = {"x": x, "batch_size": 4, **OPTS}
    args.update(change)
    new_x = args.pop("x")
    with pytest.raises(FileExistsError, match="unfinished run") as err:
        theory.ntk(new_x, out=out, **args)
    message = str(err.value)
    assert message.startswith(f"out: {out} has an unfinished run in {out}.partial") and named in message
    assert "re-run with that run's arguments to resume it, or pass overwrite=True" in message
    assert finished_tiles(out) == {0, 1, 2}  # still there to resume
    again = []
    got = theory.ntk(new_x, out=out, overwrite=True, on_tile=lambda i, r, c: again.append(i), **args)
    assert len(again) == len(tiles(len(new_x), None, args["batch_size"]))  # nothing reused
    assert torch.equal(got, theory.ntk(new_x, **args))


def test_custom_activations_and_models_are_told_apart_by_their_values(tmp_path):
    """Two callables under one label (the same repr) and two networks of one architecture with other
    weights are other arguments, not a resumable run."""
    out, x = tmp_path / "k.npy", _x()
    softsign = nat.activations.Elementwise(lambda u: u / (1 + u.abs()), label="mine")
    tanh = nat.activations.Elementwise(torch.tanh, label="mine")
    _interrupt(x, out, activation=softsign)
    with pytest.raises(FileExistsError, match="other inputs or settings"):
        theory.ntk(x, batch_size=4, out=out, **{**OPTS, "activation": tanh})
    out2 = tmp_path / "e.npy"
    a = nat.MLP([4, 8, 1], "relu", 2.0, 0.1, seed=0, dtype=F64)
    b = nat.MLP([4, 8, 1], "relu", 2.0, 0.1, seed=1, dtype=F64)

    def stop(i, r, c):
        raise Stop

    with pytest.raises(Stop):
        nat.empirical_ntk(a, x, batch_size=4, out=out2, on_tile=stop)
    with pytest.raises(FileExistsError, match="other inputs or settings"):
        nat.empirical_ntk(b, x, batch_size=4, out=out2)
    with pytest.warns(UserWarning, match="1 of 21 tiles were done"):
        got = nat.empirical_ntk(a, x, batch_size=4, out=out2)
    assert torch.allclose(got, nat.empirical_ntk(a, x), rtol=0, atol=1e-12)


def test_without_a_signature_an_unfinished_run_is_discarded_not_resumed(tmp_path):
    out, x = tmp_path / "g.npy", _x()

    def stop(i, r, c):
        raise Stop

    with pytest.raises(Stop):
        tiled(lambda r, c: x[r] @ x[c].T, 23, batch_size=4, out=out, on_tile=stop)
    y = _x(seed=5)
    with pytest.warns(UserWarning, match="without a signature of the inputs it cannot be resumed"):
        got = tiled(lambda r, c: y[r] @ y[c].T, 23, batch_size=4, out=out)
    assert torch.equal(got, tiled(lambda r, c: y[r] @ y[c].T, 23, batch_size=4))


# ----------------------------------------------------------------------------------------- locks
def test_locks_of_dead_live_and_foreign_processes(tmp_path):
    out, x = tmp_path / "k.npy", _x()
    lock = _beside(out, ".lock")
    lock.write_text(f"pid {_dead_pid()} host {socket.gethostname()}\n")
    with pytest.warns(UserWarning, match=r"took over the lock .*k\.npy\.lock of process \d+, which is no longer"):
        got = theory.ntk(x, batch_size=4, out=out, **OPTS)
    assert torch.equal(got, theory.ntk(x, batch_size=4, **OPTS)) and not lock.exists()
    out.unlink()
    for owner in (f"pid {os.getpid()} host {socket.gethostname()}", f"pid {_dead_pid()} host elsewhere", "pid 1"):
        lock.write_text(owner + "\n")  # alive here; another host's (cannot be checked); an old lock
        with pytest.raises(FileExistsError, match=r"being written by another run .*delete .*k\.npy\.lock"):
            theory.ntk(x, batch_size=4, out=out, **OPTS)
        assert lock.read_text() == owner + "\n" and not out.exists()


# ------------------------------------------------------------------------------ an existing out
def test_an_existing_out_is_refused_unless_overwrite(tmp_path):
    out, x = tmp_path / "k.npy", _x()
    np.save(out, np.arange(3.0))
    with pytest.raises(FileExistsError, match=r"k\.npy exists; pass overwrite=True to replace it"):
        theory.ntk(x, out=out, **OPTS)
    assert np.array_equal(np.load(out), np.arange(3.0))
    got = theory.ntk(x, out=out, overwrite=True, **OPTS)
    assert torch.equal(got, theory.ntk(x, **OPTS)) and np.array_equal(np.load(out), got.numpy())


def _parsers():
    p = argparse.ArgumentParser(prog="natural-tangents")
    return p, cli_kernel.add_parser(p.add_subparsers(dest="command", required=True))


def _parse(argv):
    return _parsers()[0].parse_args(["kernel", *argv])


def test_the_command_refuses_an_existing_out_unless_force(tmp_path, capsys):
    out = tmp_path / "k.npy"
    np.save(out, np.arange(3.0))
    argv = ["--samples", "12", "--batch-size", "4", "--no-progress", "--out", str(out)]
    assert cli_kernel.run(_parse(argv)) == 2
    err = capsys.readouterr().err
    assert err == f"natural-tangents kernel: --out: {out} exists; pass --force to replace it, or choose another path\n"
    assert np.array_equal(np.load(out), np.arange(3.0))
    assert cli_kernel.run(_parse([*argv, "--force"])) == 0
    assert np.load(out).shape == (12, 12)
    helps = " ".join(" ".join(_parsers()[1].format_help().split()).split("--out OUT")[1:])
    assert "an existing file is refused unless --force is given" in helps


def test_the_command_names_its_own_flags_for_an_unfinished_run_of_other_arguments(tmp_path, capsys):
    out = tmp_path / "k.npy"

    def stop(i, r, c):
        raise Stop

    with pytest.raises(Stop):  # an unfinished (12, 12) run of other data
        tiled(lambda r, c: torch.ones(r.stop - r.start, c.stop - c.start), 12, batch_size=4, out=out,
              signature=("other",), on_tile=stop)  # fmt: skip
    argv = ["--samples", "12", "--batch-size", "4", "--no-progress", "--out", str(out)]
    assert cli_kernel.run(_parse(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"natural-tangents kernel: --out: {out} has an unfinished run") and err.count("\n") == 1
    assert "pass --force to discard it and start afresh" in err and "overwrite" not in err
    assert cli_kernel.run(_parse([*argv, "--force"])) == 0
    capsys.readouterr()
    assert not _beside(out, ".partial").exists() and np.load(out).shape == (12, 12)
