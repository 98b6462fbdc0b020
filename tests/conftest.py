"""Fixtures shared by the whole suite.

The thread count is set here, once: two threads (the development machine has two cores). Tests
marked ``slow`` (every test of the experiments' one ``reproduce all`` run, and the widest networks)
are part of the default run; ``pytest -m "not slow"`` is the fast subset (docs/development.md).
Helper modules next to the tests (``_explicit.py``) import as top-level modules because ``tests/``
has no ``__init__.py`` and pytest puts it on the path when it collects the files.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import natural_tangents as nat
from natural_tangents import cli
from natural_tangents.experiments import REGISTRY

torch.set_num_threads(2)


def pytest_collection_modifyitems(items):
    """Every test that needs the suite's ``reproduce all`` run is ``slow``: ``pytest -m "not slow"``
    skips the run along with them."""
    for item in items:
        if "reproduced" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


#: the width every experiment's networks are capped at in the suite's one ``reproduce all`` run
TINY_WIDTH = 128


def _unit_rows(n: int, m: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


@pytest.fixture(scope="session")
def unit_inputs():
    """``unit_inputs(n, m, seed=0)``: (n, m) float64 Gaussian rows scaled to unit norm (the paper's
    Assumption 2), the same for the same seed."""
    return _unit_rows


@pytest.fixture(scope="session")
def mnist_300():
    """30 packaged MNIST images of each digit, pixels / 255 standardized by their own mean and std,
    (300, 1, 28, 28) float32, shuffled, with their class indices (the batch of the LeNet tests)."""
    images, labels = nat.data.load_mnist_subset(dtype=torch.float32)
    idx = torch.cat([torch.nonzero(labels == d).flatten()[:30] for d in range(10)])
    x = images[idx] / 255.0
    x = ((x - x.mean()) / x.std()).reshape(-1, 1, 28, 28)
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))
    return x[perm], labels[idx][perm]


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory):
    """``natural-tangents reproduce all --quick --max-width 128``, run once for the whole suite.

    Returns a namespace: ``out`` (the output folder), ``code`` (the exit code), ``stdout``, and
    ``results``, each experiment's JSON payload (name, summary, settings, checks, rows) by name;
    ``rows(name, **columns)`` and ``check(name, quantity)`` read them by name, never by position.
    """
    out = tmp_path_factory.mktemp("reproduce")
    argv = ["reproduce", "all", "--quick", "--max-width", str(TINY_WIDTH), "--out", str(out), "--no-progress"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(argv)
    results = {}
    for name in REGISTRY:
        path = out / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    return _Reproduced(out, code, stdout.getvalue(), results)


@dataclass
class _Reproduced:
    out: Path
    code: int
    stdout: str
    results: dict[str, dict]

    def rows(self, name: str, **match) -> list[dict]:
        """The rows of experiment ``name`` whose columns equal ``match``."""
        return [r for r in self.results[name]["rows"] if all(r.get(k) == v for k, v in match.items())]

    def check(self, name: str, quantity: str) -> dict:
        """The one check of experiment ``name`` (quantity, paper, theory, experiment) whose quantity
        starts with ``quantity``: fails, listing the experiment's quantities, when none or several do."""
        checks = self.results[name]["checks"]
        found = [c for c in checks if c["quantity"].startswith(quantity)]
        if len(found) != 1:
            have = "; ".join(repr(c["quantity"]) for c in checks)
            pytest.fail(
                f"{name}: {len(found)} checks have a quantity starting with {quantity!r} (not 1); they are: {have}"
            )
        return found[0]
