"""``natural-tangents kernel`` (cli_kernel.run) in-process and under torchrun, against nat.theory.ntk."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import natural_tangents as nat
from natural_tangents import cli_kernel, theory


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="natural-tangents")
    cli_kernel.add_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["kernel", *argv])


def _subset(digits, n):
    images, labels = nat.data.load_mnist_subset()
    return nat.data.normalize(images[torch.isin(labels, torch.tensor(digits))][:n])


def test_analytic_kernel_of_the_packaged_subset(tmp_path, capsys):
    out = tmp_path / "k.npy"
    assert (
        cli_kernel.run(_parse(["--digits", "0", "7", "--samples", "40", "--batch-size", "16", "--out", str(out)])) == 0
    )
    ref = theory.ntk(_subset([0, 7], 40), depth=3, activation="relu", sigma_w2=2.0, sigma_b2=0.0)
    assert np.allclose(np.load(out), ref.numpy(), rtol=0, atol=1e-12)
    assert "wrote" in capsys.readouterr().out


def test_analytic_kernel_of_a_user_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 30).astype(np.uint8),
        "x_test": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 12).astype(np.uint8),
    }
    np.savez(tmp_path / "mnist.npz", **arrays)
    argv = ["--data", str(tmp_path / "mnist.npz"), "--split", "test", "--activation", "erf", "--depth", "4"]
    argv += ["--sigma-w2", "1.5", "--sigma-b2", "0.2", "--dtype", "float32", "--out", str(tmp_path / "k.npy")]
    assert cli_kernel.run(_parse(argv)) == 0
    x = nat.data.normalize(torch.from_numpy(arrays["x_test"].reshape(12, -1).astype(np.float64)))
    ref = theory.ntk(x, depth=4, activation="erf", sigma_w2=1.5, sigma_b2=0.2)
    got = np.load(tmp_path / "k.npy")
    assert got.dtype == np.float32 and np.allclose(got, ref.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "k.txt"], "--out: expected a path ending in .npy"),
        (["--samples", "999999", "--out", "{tmp}/k.npy"], "--samples: expected 1"),
        (["--digits", "12", "--out", "{tmp}/k.npy"], "--digits: 12 is not a digit"),
        (["--data", "{tmp}/missing", "--out", "{tmp}/k.npy"], "missing"),
        (["--samples", "4", "--out", "{tmp}/locked.npy"], "being written by another run"),
        (["--samples", "4", "--sigma-w2", "-1", "--out", "{tmp}/k.npy"], "sigma_w2"),
        (["--empirical", "--samples", "4", "--out", "{tmp}/k.npy"], "--width"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, capsys, argv, message):
    (tmp_path / "locked.npy.lock").write_text("pid 1\n")
    code = cli_kernel.run(_parse([a.format(tmp=tmp_path) for a in argv]))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_empirical_kernel_into_a_file_equals_the_in_memory_kernel(tmp_path):
    argv = ["--empirical", "--width", "64", "--samples", "10", "--batch-size", "4", "--out", str(tmp_path / "e.npy")]
    assert cli_kernel.run(_parse(argv)) == 0
    net = nat.MLP([784, 64, 64, 1], "relu", 2.0, 0.0, seed=0, dtype=torch.float64)
    ref = nat.empirical_ntk(net, _subset(list(range(10)), 10))
    assert np.allclose(np.load(tmp_path / "e.npy"), ref.numpy(), rtol=0, atol=1e-10)


SCRIPT = textwrap.dedent(
    """
    import argparse, sys
    from natural_tangents import cli_kernel
    p = argparse.ArgumentParser()
    cli_kernel.add_parser(p.add_subparsers(dest="command"))
    sys.exit(cli_kernel.run(p.parse_args(["kernel", *sys.argv[1:]])))
    """
)


def test_the_command_runs_unchanged_under_torchrun(tmp_path):
    script = tmp_path / "kernel.py"
    script.write_text(SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "k.npy"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(port), str(script), "--samples", "30", "--batch-size", "8", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = theory.ntk(_subset(list(range(10)), 30), depth=3, activation="relu", sigma_w2=2.0, sigma_b2=0.0)
    assert np.allclose(np.load(out), ref.numpy(), rtol=0, atol=1e-12)
    assert done.stdout.count("wrote") == 1  # rank 0 reports
