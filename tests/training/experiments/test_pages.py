"""The experiment pages' table generator on hand-made report.json files (no training, < 1 s)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

from training.experiments.pages import (
    Arm,
    Page,
    World,
    grid_rows,
    mean_std_table,
    ndcg_at,
    paired_rows,
    pool,
    render,
    splice,
    values,
)


def _models(auc: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {name: {"model_type": name, "tasks": list(t),
                   "test": {k: {"auc": v, "log_loss": 1 - v, "ece": 0.01} for k, v in t.items()}}
            for name, t in auc.items()}


def _seeds_report(path: Path, per_seed: dict[int, dict[str, dict[str, float]]],
                  oracle: dict[str, float] | None = None) -> None:
    path.mkdir(parents=True)
    runs = {str(s): _models(m) for s, m in per_seed.items()}
    report: dict[str, Any] = {"main": "mmoe", "train_config": {"seed": min(per_seed)},
                              "models": runs[str(min(per_seed))],
                              "seeds": {"seeds": sorted(per_seed), "runs": runs}}
    if oracle:
        report["oracle_auc"] = oracle
    (path / "report.json").write_text(json.dumps(report))


def _one_seed_report(path: Path, seed: int, auc: dict[str, dict[str, float]]) -> None:
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps(
        {"main": "mmoe", "train_config": {"seed": seed}, "models": _models(auc)}))


MMOE = [0.80, 0.82, 0.81]
SB = [0.79, 0.80, 0.805]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _seeds_report(tmp_path / "field", {
        s: {"mmoe": {"a": MMOE[s], "b": 0.9}, "shared_bottom": {"a": SB[s], "b": 0.89},
            "single_a": {"a": 0.7 + s / 100}, "single_b": {"b": 0.6}} for s in range(3)},
        oracle={"a": 0.825, "b": 0.95})
    for s in (0, 1):  # one directory per seed, pooled by a glob
        _one_seed_report(tmp_path / f"pos/t-s{s}", s, {"mmoe": {"a": 0.5 + s / 10, "b": 0.5}})
    return tmp_path


def test_pool_reads_seeds_globs_and_joins_single_task_models(root: Path) -> None:
    p = pool(root, [Arm("m", "field", "mmoe"), Arm("st", "field", "single_*"),
                    Arm("g", "pos/t-s*", "mmoe")])
    assert values(p, "m", "a", "auc") == MMOE
    assert values(p, "st", "a", "auc") == pytest.approx([0.70, 0.71, 0.72])
    assert values(p, "st", "b", "auc") == [0.6, 0.6, 0.6]
    assert values(p, "g", "a", "auc") == pytest.approx([0.5, 0.6])
    assert values(p, "m", "a", "ece") == [0.01] * 3
    assert values(p, "m", "a", "ndcg10") is None


def test_tables_mean_std_best_in_bold_and_paired_tests_match_scipy(root: Path) -> None:
    p = pool(root, [Arm("m", "field", "mmoe"), Arm("sb", "field", "shared_bottom")])
    table = mean_std_table(p, ["m", "sb"], ["a", "b"], "auc", {"a": 0.83, "b": 0.95})
    m, s = np.mean(MMOE), np.std(MMOE, ddof=1)
    assert table[2] == f"| m | 3 | **{m:.4f} ± {s:.4f}** | **0.9000 ± 0.0000** |"
    assert table[-1] == "| oracle (true p) | | 0.8300 | 0.9500 |"
    rows = paired_rows(p, ["m", "sb"], "m", ["a"], "auc")
    d = np.array(SB) - np.array(MMOE)
    t_p = sps.ttest_rel(SB, MMOE).pvalue
    assert rows[2].startswith(f"| sb | a | {d.mean():+.4f} | {d.std(ddof=1):.4f} | {t_p:.3g} |")


def test_grid_checks_say_met_and_not_met(root: Path) -> None:
    rows = grid_rows(root, [World("w", 1, 1, 1, 0.5, ("field", "mmoe"),
                                  ("field", "shared_bottom"))], ["a", "b"])
    by = {r["task"]: r for r in rows}
    assert by["a"]["gap_met"] and not by["b"]["gap_met"]  # 0.825 - 0.81 = 0.015; 0.95 - 0.9 = 0.05
    assert by["a"]["sb_met"] and by["b"]["sb_met"]
    assert by["b"]["gap"] == pytest.approx([0.05] * 3)


def test_render_writes_a_page_with_its_commands(root: Path, tmp_path: Path) -> None:
    (root / "queue.txt").write_text("field\tranker train --seeds 0,1,2\nother\tx\n")
    (root / "jobs.tsv").write_text("field\t10:00:00\t10:01:00\t60\t1.0\t2.0\t0\n")
    docs = tmp_path / "docs"
    (docs / "pg").mkdir(parents=True)
    page = Page("pg", "T", "intro", ["a"], [Arm("m", "field", "mmoe"),
                                            Arm("sb", "field", "shared_bottom")], "m",
                jobs=["field"], oracle_run="field")
    text = render(page, root, docs)
    assert "ranker train --seeds 0,1,2" in text and "| field | 10:00:00 – 10:01:00 | 60 |" in text
    assert "\nx\n" not in text


def test_splice_replaces_only_the_block() -> None:
    text = "a\n<!-- pages:r -->\nold\n<!-- /pages:r -->\nb\n"
    assert splice(text, "r", "new") == "a\n<!-- pages:r -->\nnew\n<!-- /pages:r -->\nb\n"
    with pytest.raises(ValueError):
        splice(text, "missing", "x")


def test_ndcg_is_one_for_the_true_order_and_matches_a_hand_count() -> None:
    gain = np.array([0.9, 0.5, 0.1, 0.3, 0.2])
    groups = np.array([0, 0, 0, 1, 1])
    assert ndcg_at(gain, gain, groups) == pytest.approx(1.0)
    pred = np.array([0.1, 0.5, 0.9, 0.3, 0.2])  # group 0 reversed, group 1 right
    disc = 1 / np.log2([2, 3, 4])
    g0 = (np.array([0.1, 0.5, 0.9]) @ disc) / (np.array([0.9, 0.5, 0.1]) @ disc)
    assert ndcg_at(pred, gain, groups) == pytest.approx((g0 + 1.0) / 2)
    assert ndcg_at(pred, gain, groups, k=1) == pytest.approx((0.1 / 0.9 + 1.0) / 2)


def test_write_all_on_missing_runs_says_not_run(tmp_path: Path) -> None:
    from training.experiments.page_set import write_all

    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- pages:results -->\n<!-- /pages:results -->\n")
    training = tmp_path / "training.md"
    training.write_text("<!-- pages:comparisons -->\n<!-- /pages:comparisons -->\n"
                        "<!-- pages:grid -->\n<!-- /pages:grid -->\n")
    write_all(tmp_path / "runs", tmp_path / "docs", readme, training)
    assert "not run before the deadline" in readme.read_text()
    assert "**not run**" in (tmp_path / "docs" / "README.md").read_text()
    assert "Not run before the deadline: default" in (
        tmp_path / "docs" / "world-grid" / "README.md").read_text()
