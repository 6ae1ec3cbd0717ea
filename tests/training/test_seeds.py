"""Several seeds: mean ± std per model and task, paired tests between models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from launch.cli import main as ranker
from training.seeds import paired_tests, seed_summary


def fake_runs(aucs: dict[str, list[float]]) -> dict[int, dict[str, Any]]:
    """seed -> models entry with one task, from AUCs per model over seeds 0..n-1."""
    n = len(next(iter(aucs.values())))
    return {
        s: {m: {"test": {"click": {"auc": v[s], "log_loss": 1 - v[s]}}} for m, v in aucs.items()}
        for s in range(n)
    }


def test_summary_and_paired_tests_are_scipy_s() -> None:
    a = [0.75, 0.76, 0.74, 0.77, 0.75]
    b = [0.74, 0.74, 0.73, 0.75, 0.74]
    runs = fake_runs({"mmoe": a, "shared_bottom": b, "same": a})
    summary = seed_summary(runs, ["click"])
    cell = summary["mmoe"]["click"]["auc"]
    assert cell["values"] == a
    assert cell["mean"] == pytest.approx(np.mean(a))
    assert cell["std"] == pytest.approx(np.std(a, ddof=1))
    rows = {r["other"]: r for r in paired_tests(runs, ["click"], "mmoe")}
    r = rows["shared_bottom"]
    assert r["n"] == 5 and r["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert r["ttest_rel_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert r["wilcoxon_p"] == pytest.approx(0.0625)  # 5 positive differences: exact 2/32
    assert rows["same"]["ttest_rel_p"] is None  # every difference 0: no test is defined


def test_train_with_seeds(small_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert ranker(["train", "--data", str(small_data), "--out", str(run), "--epochs", "1",
                   "--experts", "2", "--expert-hidden", "8", "--bottom-hidden", "8",
                   "--tower-hidden", "4", "--no-progress", "--seeds", "3,4"]) == 0
    report = json.loads((run / "report.json").read_text())
    sec = report["seeds"]
    assert sec["seeds"] == [3, 4] and set(sec["runs"]) == {"3", "4"}
    assert report["train_config"]["seed"] == 3  # the checkpoint's model is the first seed's
    assert report["models"] == sec["runs"]["3"]
    for name in ("mmoe", "shared_bottom", "omoe", "single_click"):
        assert name in sec["summary"]
    assert set(sec["summary"]["single_like"]) == {"like"}
    # different seeds draw different inits: the two runs are not the same numbers
    assert sec["runs"]["3"]["mmoe"]["test"] != sec["runs"]["4"]["mmoe"]["test"]
    pairs = {(r["other"], r["task"]) for r in sec["paired"]}
    assert ("shared_bottom", "share") in pairs and ("single_like", "like") in pairs
    assert ("single_like", "click") not in pairs
    md = (run / "report.md").read_text()
    assert "Over 2 seeds (3, 4)" in md and " ± " in md and "paired t p" in md


def test_repeated_seed_is_a_usage_error(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        ranker(["train", "--data", str(small_data), "--out", str(tmp_path / "r"),
                "--epochs", "1", "--no-baselines", "--no-progress", "--seeds", "1,1"])
    assert e.value.code == 2 and "each once" in capsys.readouterr().err
