"""The command line's answers to a user's mistakes: one line on stderr naming the problem, a
non-zero exit status, no traceback, and no report.md left behind that looks complete."""

from __future__ import annotations

import os
import sys
import types

import matplotlib.pyplot as plt
import pytest

from natural_tangents import cli
from natural_tangents.experiments import Result


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("natural-tangents: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["reproduce", "nonsense"], ["unknown experiment 'nonsense'", "authors-example"]),
        (["reproduce", "convergence", "--dtype", "float16"], ["--dtype", "float16"]),
        (["reproduce", "convergence", "--device", "nonsense-device"], ["--device 'nonsense-device'"]),
        (["reproduce", "convergence", "--seed", "one"], ["--seed", "'one'"]),
        (["reproduce", "convergence", "--seed", "-3"], ["--seed must be >= 0"]),
        (["reproduce", "convergence", "--no-such-option"], ["--no-such-option"]),
        (["reproduce"], ["name"]),
        (["frobnicate"], ["frobnicate"]),
        ([], ["command"]),
    ],
)
def test_unknown_values_and_options_give_one_line(argv, needles, capsys, tmp_path):
    code, _, err = run([*argv, "--out", str(tmp_path)] if argv[:1] == ["reproduce"] else argv, capsys)
    assert code == 2
    assert_one_line_error(code, err, *needles)
    assert list(tmp_path.iterdir()) == []  # nothing was run or written


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("not a folder")
    code, _, err = run(["reproduce", "convergence", "--out", str(f), "--max-width", "8"], capsys)
    assert_one_line_error(code, err, "--out", "is a file, not a folder")
    assert f.read_text() == "not a folder"


def test_out_below_a_file(tmp_path, capsys):
    f = tmp_path / "blocker"
    f.write_text("")
    code, _, err = run(["reproduce", "convergence", "--out", str(f / "sub" / "dir"), "--max-width", "8"], capsys)
    assert_one_line_error(code, err, "--out", str(f), "is a file, not a folder")


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root (or Windows) ignores permission bits")
def test_out_not_writable(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run(["reproduce", "convergence", "--out", str(locked), "--max-width", "8"], capsys)
        assert_one_line_error(code, err, "--out", "cannot write")
        code, _, err = run(["reproduce", "convergence", "--out", str(locked / "new"), "--max-width", "8"], capsys)
        assert_one_line_error(code, err, "--out", "cannot create")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize(
    ("method", "needle"),
    [("write_bytes", "cannot write in this folder"), ("mkdir", "cannot create the folder")],
)
def test_out_refused_by_the_system(method, needle, tmp_path, capsys, monkeypatch):
    """The same answers when the system refuses (as it does for a non-root user in a locked folder)."""
    from pathlib import Path

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, method, refuse)
    code, _, err = run(["reproduce", "convergence", "--out", str(tmp_path / "new"), "--max-width", "8"], capsys)
    assert_one_line_error(code, err, "--out", needle, "Permission denied")


def test_a_failed_run_leaves_no_report_that_looks_complete(tmp_path, capsys):
    """A stale report.md from an earlier run is removed when 'reproduce all' starts; when the run
    then stops half-way, the folder holds the finished experiment's files but no report.md."""
    (tmp_path / "report.md").write_text("# an earlier, complete report\n")

    def interrupted(settings):
        raise KeyboardInterrupt  # the user stops the run during the second experiment

    def finishes(settings):
        fig = plt.figure(figsize=(1, 1))
        return Result("finishes", "finishes", "done", [], [{"step": 0}], fig, settings.describe())

    registry = {
        "finishes": types.SimpleNamespace(NAME="finishes", TITLE="finishes", run=finishes),
        "stops": types.SimpleNamespace(NAME="stops", TITLE="stops half-way", run=interrupted),
    }
    code = cli.main(["reproduce", "all", "--quick", "--no-progress", "--out", str(tmp_path)], registry=registry)
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "report.md").exists()
    assert (tmp_path / "finishes.json").stat().st_size > 0
    assert not list(tmp_path.glob(".report.md*"))


def test_report_is_written_atomically(tmp_path, monkeypatch):
    """write_report renames a finished temporary file onto report.md: a failure while writing
    leaves the earlier report.md untouched and no temporary file behind."""
    from pathlib import Path

    from natural_tangents.experiments import report

    (tmp_path / "report.md").write_text("old")
    real = Path.write_text

    def failing(self, *args, **kwargs):
        real(self, "half a rep", encoding="utf-8")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError, match="No space"):
        report.write_report([], tmp_path, {"quick": True})
    monkeypatch.setattr(Path, "write_text", real)
    assert (tmp_path / "report.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    path = report.write_report([], tmp_path, {"quick": True})
    assert path.read_text().startswith("# natural-tangents")


def test_help_speaks_of_the_paper_not_the_seed(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reproduce", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the paper's settings" in text
    assert "seed's" not in text and "of the seed" not in text
    assert "random seed" in text  # --seed is the random seed
