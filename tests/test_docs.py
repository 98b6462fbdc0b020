"""Every fenced Python block of README.md and docs/*.md runs as written.

The blocks of one page run in order in one namespace (a later block may use what an earlier one
made), in a fresh working folder. A block whose first line is ``# file: NAME.py — torchrun`` is a
program for several processes: it is written to NAME.py and run under torchrun with two gloo
processes (the reader's command), with a timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[str]:
    return FENCE.findall(page.read_text())


def _torchrun(code: str, name: str, cwd: Path) -> None:
    path = cwd / name
    path.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(path)]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_every_python_block_runs(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"docs_{page.stem}")  # a real module: dataclasses look their class's module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    threads = torch.get_num_threads()
    try:
        for i, code in enumerate(blocks(page)):
            first = code.splitlines()[0] if code.strip() else ""
            match = re.match(r"# file: (\w+\.py) — torchrun", first)
            if match:
                _torchrun(code, match.group(1), tmp_path)
                continue
            try:
                exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
            except Exception as err:  # name the block in the failure
                raise AssertionError(f"{page.name}, block {i} failed: {err!r}\n{code}") from err
    finally:
        torch.set_num_threads(threads)
