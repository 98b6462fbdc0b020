"""The seed's experiments at a tiny size: each one runs, writes its files and shows its headline.

Widths are capped (``Settings.max_width``), so the finite-width effects are large: the assertions
are the ones that hold at any width (α counts, the shape of the one-step loss curve, one
function-space path for cross-entropy) rather than the wide-network numbers of the report.
"""

import json

import numpy as np
import pytest

from natural_tangents import cli
from natural_tangents.experiments import REGISTRY, Settings, write
from natural_tangents.experiments.common import timed

TINY = Settings(quick=True, progress=False, max_width=128)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    names = ["convergence", "unitwise", "learning-rate", "generalization", "cross-entropy"]
    return {n: write(timed(REGISTRY[n].run, TINY), out) for n in names}, out


def test_every_experiment_writes_json_csv_and_png(results):
    res, out = results
    for name, r in res.items():
        for kind in ("json", "csv", "png"):
            assert (out / r.files[kind]).stat().st_size > 0
        payload = json.loads((out / r.files["json"]).read_text())
        assert payload["name"] == name and payload["checks"] and payload["rows"]
        assert r.summary


def test_convergence_ngd_outruns_gd(results):
    rows = results[0]["convergence"].rows
    final = {r["method"]: r["train_loss"] for r in rows if r["step"] == max(x["step"] for x in rows)}
    for name in ("exact", "block_diagonal", "unitwise"):
        assert final[name] < 1e-2 * final["gd"]


def test_unitwise_alpha_matches_the_analytic_gamma(results):
    checks = results[0]["unitwise"].checks
    assert checks[0].experiment == pytest.approx(2.0, abs=1e-9)  # tanh: every unit active
    for c in checks[1:]:
        assert c.experiment == pytest.approx(c.theory, rel=0.05)


def test_learning_rate_curve_follows_one_minus_eta_alpha_squared_at_small_rates(results):
    rows = [r for r in results[0]["learning-rate"].rows if r["method"] == "exact"]
    small = [r for r in rows if r["eta_alpha"] <= 0.11]
    for r in small:  # the linear regime: (1 − ηα)² to a few per cent of L_0
        assert r["loss_ratio"] == pytest.approx(r["loss_ratio_theory"], abs=0.05)
    ratios = np.array([r["loss_ratio"] for r in rows])
    assert ratios.min() < 0.6 and ratios[-1] > ratios.min()


def test_generalization_exact_ngd_matches_the_analytic_prediction(results):
    check = results[0]["generalization"].checks[1]
    assert check.experiment == pytest.approx(check.theory, rel=0.3)


def test_cross_entropy_exact_and_layerwise_follow_one_path(results):
    r = results[0]["cross-entropy"]
    assert r.checks[0].experiment < 0.5  # at width 128; 0.028 at 1024 and smaller at 4096 (report)
    for method in ("exact", "block_diagonal"):
        loss = [x["train_loss"] for x in r.rows if x["method"] == method]
        assert loss[-1] < 0.1 * loss[0]


def test_cli_lists_and_rejects_unknown_names(capsys):
    assert cli.main(["list"]) == 0
    assert "convergence" in capsys.readouterr().out
    assert cli.main(["reproduce", "nonsense", "--quick"]) == 2
    assert "unknown experiment 'nonsense'" in capsys.readouterr().err
    assert cli.main(["reproduce", "convergence", "--device", "nonsense-device"]) == 2


def test_cli_reproduce_all_writes_the_report_with_every_figure(tmp_path, capsys):
    code = cli.main(["reproduce", "all", "--quick", "--max-width", "128", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    report = (tmp_path / "report.md").read_text()
    for name in REGISTRY:
        assert f"![{name}]({name}.png)" in report
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert len(REGISTRY) == 10
    assert "report:" in capsys.readouterr().out
