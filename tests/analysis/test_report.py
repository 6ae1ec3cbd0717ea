"""`ranker experiment report` on hand-built logs with known answers: A/A, A/B, SRM, heavy users,
and the join's attribution window."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.report import REPORT_JSON, REPORT_MD, REPORT_PNG, experiment_report
from launch.cli import main as ranker
from ranker.logjoin import LogError
from tests.analysis.logs import Users, experiments_file, write_log

HALF = {"control": 0.5, "treatment": 0.5}


def run_report(tmp_path: Path, shares: dict[str, float] | None = HALF, *extra: str,
               ) -> tuple[int, dict, str]:
    out = tmp_path / "report"
    argv = ["experiment", "report", "--logs", str(tmp_path / "log"), "--out", str(out),
            "--resamples", "1000", *extra]
    if shares is not None:
        argv += ["--experiments", str(experiments_file(tmp_path, shares))]
    rc = ranker(argv)
    if rc != 0:
        return rc, {}, ""
    return rc, json.loads((out / REPORT_JSON).read_text()), (out / REPORT_MD).read_text()


def arm(report: dict, name: str) -> dict:
    (e,) = report["experiments"]
    return next(a for a in e["arms"] if a["name"] == name)


def test_an_aa_log_shows_no_difference_and_no_srm(tmp_path: Path) -> None:
    write_log(tmp_path / "log", [Users("control", 600, 0.1), Users("treatment", 600, 0.1)],
              seed=1)
    rc, report, md = run_report(tmp_path)
    assert rc == 0
    (e,) = report["experiments"]
    assert e["control"] == "control" and e["srm"]["checked"] and not e["srm"]["mismatch"]
    for t in ("click", "like", "share"):
        lf = arm(report, "treatment")["tasks"][t]["lift"]
        assert not lf["significant"] and lf["p_value"] > 0.05, (t, lf)
        assert lf["ci"][0] < 0 < lf["ci"][1]
    c = arm(report, "control")
    assert (c["users"], c["requests"], c["impressions"]) == (600, 2400, 12000)
    assert "## exp" in md and "no mismatch" in md
    assert (tmp_path / "report" / REPORT_PNG).stat().st_size > 1000


def test_an_ab_log_with_a_large_difference_is_significant(tmp_path: Path) -> None:
    true = write_log(tmp_path / "log", [Users("control", 500, 0.12),
                                        Users("treatment", 500, 0.06)], seed=2)
    rc, report, md = run_report(tmp_path)
    assert rc == 0
    t = arm(report, "treatment")["tasks"]["click"]
    c = arm(report, "control")["tasks"]["click"]
    assert c["rate"] == pytest.approx(true["control"]) and t["rate"] == pytest.approx(
        true["treatment"])
    assert c["ci"][0] < c["rate"] < c["ci"][1]
    lf = t["lift"]
    assert lf["significant"] and lf["p_value"] < 0.01 and lf["naive_p_value"] < 0.01
    assert lf["ci"][1] < 0 and lf["ci"][0] < -0.5 < lf["ci"][1]  # true lift 0.06/0.12 - 1
    assert not report["experiments"][0]["srm"]["mismatch"]
    assert " *" in md


def test_a_60_40_split_with_declared_50_50_is_a_sample_ratio_mismatch(tmp_path: Path) -> None:
    write_log(tmp_path / "log", [Users("control", 600, 0.1), Users("treatment", 400, 0.1)])
    rc, report, md = run_report(tmp_path)
    assert rc == 0
    srm = report["experiments"][0]["srm"]
    assert srm["mismatch"] and srm["p_value"] < 1e-6
    assert srm["observed"] == {"control": 600, "treatment": 400}
    assert "**MISMATCH**" in md
    # the same log against the shares it was built with is fine
    rc, report, _ = run_report(tmp_path, {"control": 0.6, "treatment": 0.4})
    assert rc == 0
    assert not report["experiments"][0]["srm"]["mismatch"]


def test_without_an_experiments_file_the_srm_check_is_skipped_and_said_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANKER_EXPERIMENTS_FILE", raising=False)
    write_log(tmp_path / "log", [Users("a", 50, 0.1), Users("b", 50, 0.1)])
    rc, report, md = run_report(tmp_path, None, "--no-plot", "--control", "b")
    assert rc == 0 and not report["experiments"][0]["srm"]["checked"]
    assert report["experiments"][0]["control"] == "b" and "not checked" in md
    assert not (tmp_path / "report" / REPORT_PNG).exists()


def test_few_heavy_users_make_the_users_ci_wider_than_the_naive_one(tmp_path: Path) -> None:
    heavy = Users("control", 10, 0.6, requests=200, prefix="heavy")
    light = Users("control", 490, 0.02, requests=2, prefix="light")
    write_log(tmp_path / "log", [heavy, light, Users("treatment", 500, 0.05)], seed=4)
    rc, report, _ = run_report(tmp_path)
    assert rc == 0
    c = arm(report, "control")["tasks"]["click"]
    assert c["ci"][1] - c["ci"][0] > 3 * (c["naive_ci"][1] - c["naive_ci"][0])
    assert c["design_effect"] > 9


def test_the_report_uses_the_trainers_join_window(tmp_path: Path) -> None:
    """Likes come 2 s and shares 3 s after their impression: a 2.5 s window keeps likes only."""
    write_log(tmp_path / "log", [Users("control", 100, 0.3), Users("treatment", 100, 0.3)])
    report = experiment_report(tmp_path / "log", window_s=2.5, n_resamples=200)
    assert report["join"]["late"] > 0 and report["join"]["labels"]["share"] == 0
    assert arm(report, "control")["tasks"]["share"]["events"] == 0
    assert arm(report, "control")["tasks"]["like"]["events"] > 0


def test_refusals_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ranker(["experiment", "report", "--logs", str(tmp_path / "none"), "--out",
                   str(tmp_path / "o")]) == 2
    assert "no impression files" in capsys.readouterr().err
    write_log(tmp_path / "log", [Users("a", 5, 0.1), Users("b", 5, 0.1)])
    with pytest.raises(LogError, match=r"no arm 'control' in the log \(arms: a, b\)"):
        experiment_report(tmp_path / "log", control="control", n_resamples=100)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[experiment]]\nname = "exp"\nsalt = "s"\n')
    assert ranker(["experiment", "report", "--logs", str(tmp_path / "log"), "--out",
                   str(tmp_path / "o"), "--experiments", str(bad)]) == 2
    assert "experiment[0].arm: an experiment needs at least 2 arms" in capsys.readouterr().err


def test_impressions_outside_any_experiment_are_counted_not_measured(tmp_path: Path) -> None:
    write_log(tmp_path / "log", [Users("a", 20, 0.1)], experiment=None)
    report = experiment_report(tmp_path / "log", n_resamples=100)
    assert report["experiments"] == [] and report["outside_experiments"]["impressions"] == 400


def test_the_report_runs_without_torch_and_without_matplotlib_when_not_plotting(
        tmp_path: Path) -> None:
    """In a fresh interpreter where importing torch (or matplotlib) fails, as on a host with only
    the analysis extra's statistics installed."""
    write_log(tmp_path / "log", [Users("control", 20, 0.1), Users("treatment", 20, 0.1)])
    code = ("import sys\n"
            "BLOCKED = {'torch', 'onnx', 'onnxruntime', 'fastapi', 'matplotlib'}\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in BLOCKED:\n"
            "            raise ImportError(f'{name} is not installed here')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from launch.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    out = subprocess.run(
        [sys.executable, "-c", code, "experiment", "report", "--logs", str(tmp_path / "log"),
         "--out", str(tmp_path / "o"), "--resamples", "100", "--no-plot"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o" / REPORT_JSON).is_file()
