"""The tiling engine against direct computation, its .npy output and lock, and torch.distributed
process groups (2 and 3 spawned gloo processes) against the single-process result."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from natural_tangents import theory
from natural_tangents.tiling import tiled, tiles

F64 = torch.float64


def _data(n: int, m: int, seed: int) -> torch.Tensor:
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("batch_size", [1, 4, 7, 13, 40])
def test_tiles_cover_the_kernel_once(batch_size):
    sym = tiles(13, None, batch_size)
    hits = torch.zeros(13, 13, dtype=torch.int64)
    for r, c in sym:
        hits[r, c] += 1
        if r != c:
            hits[c, r] += 1
    assert bool((hits == 1).all())
    hits = torch.zeros(13, 6, dtype=torch.int64)
    for r, c in tiles(13, 6, batch_size):
        hits[r, c] += 1
    assert bool((hits == 1).all())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch_size", [5, 6, 30, 64])  # 5 and 7 do not divide 30, 6 does, 64 > N
def test_tiled_equals_direct(batch_size, threads):
    x, y = _data(30, 4, 0), _data(17, 4, 1)
    lead = lambda a, b: torch.stack([a @ b.T, torch.cos(a @ b.T)])  # noqa: E731  (two stacked kernels)
    sym = tiled(lambda r, c: lead(x[r], x[c]), 30, batch_size=batch_size, lead=(2,), threads=threads)
    pair = tiled(lambda r, c: lead(x[r], y[c]), 30, 17, batch_size=batch_size, lead=(2,), threads=threads)
    assert torch.allclose(sym, lead(x, x), rtol=0, atol=1e-12)
    assert torch.equal(sym, sym.transpose(-1, -2))  # mirrored tiles: exactly symmetric
    assert torch.allclose(pair, lead(x, y), rtol=0, atol=1e-12)


def test_symmetric_mode_computes_only_upper_tiles():
    calls = []
    x = _data(10, 3, 2)

    def block(r, c):
        calls.append((r.start, c.start))
        return x[r] @ x[c].T

    tiled(block, 10, batch_size=3, threads=1)
    assert all(c >= r for r, c in calls) and len(calls) == 4 * 5 // 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_out_file_equals_in_memory_kernel(tmp_path, dtype):
    x, y = _data(23, 5, 3), _data(11, 5, 4)
    mem = tiled(lambda r, c: x[r] @ y[c].T, 23, 11, batch_size=4, dtype=dtype)
    path = tmp_path / "k.npy"
    disk = tiled(lambda r, c: x[r] @ y[c].T, 23, 11, batch_size=4, out=path, dtype=dtype)
    back = np.load(path)
    assert back.dtype == np.dtype(str(dtype).removeprefix("torch.")) and back.shape == (23, 11)
    assert np.array_equal(back, mem.numpy()) and torch.equal(disk, mem)
    assert not Path(str(path) + ".lock").exists()  # the lock is gone after the run
    sym = tiled(lambda r, c: x[r] @ x[c].T, 23, batch_size=5, out=tmp_path / "s.npy", lead=(1,))
    assert np.array_equal(np.load(tmp_path / "s.npy"), tiled(lambda r, c: x[r] @ x[c].T, 23, batch_size=5)[None])
    assert sym.shape == (1, 23, 23)


def test_a_file_being_written_is_refused(tmp_path):
    path = tmp_path / "k.npy"
    Path(str(path) + ".lock").write_text("pid 1\n")
    with pytest.raises(FileExistsError, match=r"being written by another run.*k\.npy\.lock"):
        tiled(lambda r, c: torch.zeros(r.stop - r.start, c.stop - c.start), 4, out=path)
    assert not path.exists()


def test_the_lock_is_released_when_a_tile_fails(tmp_path):
    path = tmp_path / "k.npy"

    def bad(r, c):
        raise ArithmeticError("tile failed")

    with pytest.raises(ArithmeticError):
        tiled(bad, 8, batch_size=4, out=path)
    assert not Path(str(path) + ".lock").exists()


def test_bad_arguments_are_refused():
    ok = lambda r, c: torch.zeros(r.stop - r.start, c.stop - c.start)  # noqa: E731
    with pytest.raises(ValueError, match="batch_size"):
        tiled(ok, 4, batch_size=0)
    with pytest.raises(ValueError, match="n1"):
        tiled(ok, 0)
    with pytest.raises(ValueError, match="block_fn: returned a tile of shape"):
        tiled(lambda r, c: torch.zeros(2, 2), 5, batch_size=3, threads=1)


def test_uninitialized_and_one_rank_process_groups(tmp_path):
    """A one-rank group gives the single-process kernel; a destroyed group is refused clearly."""
    x = _data(12, 3, 5)
    opts = {"depth": 3, "activation": "relu", "sigma_w2": 2.0, "sigma_b2": 0.1, "batch_size": 5}
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        group = dist.group.WORLD
        assert torch.equal(theory.ntk(x, process_group=group, **opts), theory.ntk(x, **opts))
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match=r"process_group: torch\.distributed is not initialized"):
        theory.ntk(x, process_group=group, **opts)


# ------------------------------------------------------------------------------- spawned processes
WORKER = textwrap.dedent(
    """
    import datetime, json, os, sys
    import numpy as np, torch, torch.distributed as dist
    from natural_tangents import theory
    from natural_tangents.tiling import tiled

    rank, world, port, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    g = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(29, 6, generator=gen, dtype=torch.float64)
    x2 = torch.randn(13, 6, generator=gen, dtype=torch.float64)
    opts = dict(depth=3, activation="relu", sigma_w2=2.0, sigma_b2=0.1)
    np.save(f"{folder}/mem_sym_{rank}.npy", theory.ntk(x, batch_size=7, process_group=g, **opts).numpy())
    np.save(f"{folder}/mem_pair_{rank}.npy", theory.ntk(x, x2, batch_size=4, process_group=g, **opts).numpy())
    k = theory.kernels(x, batch_size=6, process_group=g, **opts)
    np.save(f"{folder}/mem_layers_{rank}.npy", k.per_layer.numpy())
    disk = theory.ntk(x, batch_size=5, process_group=g, out=f"{folder}/file_sym.npy", **opts)
    assert torch.equal(disk, torch.from_numpy(np.load(f"{folder}/file_sym.npy")))
    theory.ntk(x, x2, batch_size=6, process_group=g, out=f"{folder}/file_pair.npy", **opts)
    tiled(lambda r, c: x[r] @ x[c].T, 29, batch_size=8, process_group=g, out=f"{folder}/gram.npy")
    first = dist.new_group([0])  # rank 0 alone: the others are not members
    refusals = {}
    for name, call in {
        "member": lambda: theory.ntk(x[:5], process_group=first, **opts),
        "sizes": lambda: theory.ntk(x[: 20 + rank], batch_size=5, process_group=g, **opts),
        "settings": lambda: theory.ntk(x, batch_size=5, process_group=g, **{**opts, "sigma_w2": 2.0 + rank}),
        "data": lambda: theory.ntk(x + rank, batch_size=5, process_group=g, **opts),
        "lock": lambda: theory.ntk(x, process_group=g, out=f"{folder}/locked.npy", **opts),
    }.items():
        try:
            call()
            refusals[name] = "not refused"
        except (ValueError, FileExistsError, RuntimeError) as err:
            refusals[name] = f"{type(err).__name__}: {err}"
    with open(f"{folder}/refusals_{rank}.json", "w") as f:
        json.dump(refusals, f)
    dist.barrier()
    # leave without tearing the group down: rank 0 hosts the TCP store, and a rank whose teardown
    # outlives rank 0 can abort in torch's C++ threads ("terminate called without an active exception")
    os._exit(0)
    """
)


def _launch(world: int, folder: Path, timeout: float = 150.0) -> None:
    script = folder / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(world), port, str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)  # a hung collective fails the test here
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [(r, p.returncode, log[-2000:]) for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode != 0]
    assert not bad, f"worker failures: {bad}"


@pytest.mark.parametrize("world", [2, 3])
def test_process_groups_give_the_single_process_kernels(tmp_path, world):
    Path(tmp_path / "locked.npy.lock").write_text("pid 1\n")  # another run is writing locked.npy
    _launch(world, tmp_path)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(29, 6, generator=gen, dtype=F64)
    x2 = torch.randn(13, 6, generator=gen, dtype=F64)
    opts = {"depth": 3, "activation": "relu", "sigma_w2": 2.0, "sigma_b2": 0.1}
    sym, pair = theory.ntk(x, **opts).numpy(), theory.ntk(x, x2, **opts).numpy()
    layers = theory.kernels(x, **opts).per_layer.numpy()
    for r in range(world):
        assert np.allclose(np.load(tmp_path / f"mem_sym_{r}.npy"), sym, rtol=0, atol=1e-12)
        assert np.allclose(np.load(tmp_path / f"mem_pair_{r}.npy"), pair, rtol=0, atol=1e-12)
        assert np.allclose(np.load(tmp_path / f"mem_layers_{r}.npy"), layers, rtol=0, atol=1e-12)
        refusals = json.loads((tmp_path / f"refusals_{r}.json").read_text())
        for what in ("sizes", "settings", "data"):
            assert refusals[what].startswith("ValueError: process_group: the ranks disagree"), refusals[what]
        assert refusals["lock"].startswith("FileExistsError: out:") and "locked.npy.lock" in refusals["lock"]
        member = "not refused" if r == 0 else "RuntimeError: process_group: this process is not a member"
        assert refusals["member"].startswith(member), refusals["member"]
    assert np.allclose(np.load(tmp_path / "file_sym.npy"), sym, rtol=0, atol=1e-12)
    assert np.allclose(np.load(tmp_path / "file_pair.npy"), pair, rtol=0, atol=1e-12)
    assert np.allclose(np.load(tmp_path / "gram.npy"), (x @ x.T).numpy(), rtol=0, atol=1e-12)
    assert not list(tmp_path.glob("file_*.lock")) and (tmp_path / "locked.npy.lock").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [7, 600])
def test_symmetric_gram_is_the_plain_product(dtype, n):
    """outer_gram's one-triangle products (BLAS syrk above 512 rows) against x x^T: the full matrix
    (exactly symmetric when mirrored from one triangle), and with mirror=False its lower triangle with
    zeros above."""
    from natural_tangents.layers.base import mirror_lower, outer_gram

    x = torch.randn(n, 300, generator=torch.Generator().manual_seed(n), dtype=dtype)
    want = x.double() @ x.double().T
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    full = outer_gram(x)
    assert full.dtype == dtype and full.is_contiguous()
    if n > 512:
        assert torch.equal(full, full.T)
    assert float((full.double() - want).abs().max() / want.abs().max()) < tol
    lower = outer_gram(x, mirror=False)
    assert float(lower.triu(1).abs().max()) == 0.0
    assert torch.equal(lower, full.tril())
    sym = mirror_lower(lower.clone())
    assert torch.equal(sym, sym.T) and torch.equal(sym.tril(), full.tril())
