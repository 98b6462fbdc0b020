"""``natural-tangents reproduce all`` (cli.py): the files every experiment writes, the report, and the CLI's
handling of bad names. The run itself is the suite's one (the ``reproduced`` fixture)."""

from __future__ import annotations

from natural_tangents import cli
from natural_tangents.experiments import REGISTRY


def test_reproduce_all_succeeds_and_names_the_report(reproduced):
    assert reproduced.code == 0
    assert "report:" in reproduced.stdout
    assert len(REGISTRY) >= 9 and set(reproduced.results) == set(REGISTRY)


def test_every_experiment_writes_json_csv_and_png(reproduced):
    for name, payload in reproduced.results.items():
        png = reproduced.out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        csv_lines = (reproduced.out / f"{name}.csv").read_text().splitlines()
        assert len(csv_lines) == len(payload["rows"]) + 1, name  # header + one line per row
        assert payload["name"] == name and payload["summary"] and payload["checks"] and payload["rows"]
        for check in payload["checks"]:
            assert set(check) == {"quantity", "paper", "theory", "experiment"}, name


def test_report_has_every_figure_and_the_paper_column(reproduced):
    report = (reproduced.out / "report.md").read_text()
    for name in REGISTRY:
        assert f"![{name}]({name}.png)" in report
    assert "| quantity | paper | theory (ours) | experiment (ours) |" in report
    assert report.splitlines()[0] == "# natural-tangents: the paper's experiments, theory against experiment"


def test_cli_lists_and_rejects_unknown_names(capsys):
    assert cli.main(["list"]) == 0
    assert "convergence" in capsys.readouterr().out
    assert cli.main(["reproduce", "nonsense", "--quick"]) == 2
    assert "unknown experiment 'nonsense'" in capsys.readouterr().err
    assert cli.main(["reproduce", "convergence", "--device", "nonsense-device"]) == 2


def test_condition_experiment_runs_in_float32(tmp_path, capsys):
    """K-FAC at ρ = 1e-12 on a float32 network used to end this run with a traceback (its N × N
    factors were factored in float32); they are now formed and factored in float64 there."""
    argv = ["reproduce", "condition", "--quick", "--dtype", "float32", "--max-width", "128", "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "condition.json").is_file()
