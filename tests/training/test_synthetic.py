"""The synthetic generator: deterministic, realistic rates, like/share after click, oracle AUC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from training.synthetic import SyntheticConfig, generate, write_dataset

EXPECTED_FILES = {
    "users.parquet",
    "items.parquet",
    "impressions_train.parquet",
    "impressions_val.parquet",
    "impressions_test.parquet",
    "dataset.json",
}


def test_writes_the_files_the_feature_loader_reads(small_data: Path) -> None:
    assert {p.name for p in small_data.iterdir()} == EXPECTED_FILES
    users = pq.read_table(small_data / "users.parquet")
    items = pq.read_table(small_data / "items.parquet")
    log = pq.read_table(small_data / "impressions_test.parquet")
    assert users.column_names[0] == "user_id" and users["user_id"][0].as_py() == "u0"
    assert items.column_names[0] == "item_id" and items["item_id"][0].as_py() == "i0"
    for col in ("user_id", "item_id", "hour", "surface", "click", "like", "share",
                "p_click", "p_like", "p_share"):
        assert col in log.column_names, col


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path: Path) -> None:
    cfg = SyntheticConfig.small(n_impressions=3000)
    a = write_dataset(cfg, tmp_path / "a")
    b = write_dataset(cfg, tmp_path / "b")
    c = write_dataset(SyntheticConfig.small(n_impressions=3000, seed=1), tmp_path / "c")
    assert a["sha256"] == b["sha256"]
    assert a["sha256"] != c["sha256"]
    text = [(tmp_path / d / "dataset.json").read_text() for d in "ab"]
    assert text[0] == text[1]


def test_rates_and_click_dependence(small_data: Path) -> None:
    info = json.loads((small_data / "dataset.json").read_text())
    train = info["rates"]["train"]
    assert 0.05 <= train["click"] <= 0.15
    assert 0.01 <= train["like"] <= 0.03
    assert 0.0 < train["share"] < 0.01
    assert train["share"] < train["like"] < train["click"]
    # like and share mostly happen after a click
    assert info["after_click"]["like"] > 0.7
    assert info["after_click"]["share"] > 0.7
    log = pq.read_table(small_data / "impressions_train.parquet")
    click = log["click"].to_numpy().astype(bool)
    like = log["like"].to_numpy().astype(bool)
    assert like[click].mean() > 5 * like[~click].mean()


def test_oracle_auc_is_sane_and_true_probabilities_are_calibrated(small_data: Path) -> None:
    info = json.loads((small_data / "dataset.json").read_text())
    for task, value in info["oracle_auc"].items():
        assert 0.65 < value < 0.97, (task, value)
    log = pq.read_table(small_data / "impressions_train.parquet")
    for task in ("click", "like"):
        p = log[f"p_{task}"].to_numpy()
        y = log[task].to_numpy()
        assert abs(p.mean() - y.mean()) < 0.2 * y.mean() + 0.002, task


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def test_relatedness_knob_controls_task_correlation() -> None:
    def corr(rho: float) -> float:
        t = generate(SyntheticConfig.small(n_impressions=5000, relatedness=rho))[
            "impressions_train"
        ]
        pc, pl = t["p_click"].to_numpy(), t["p_like"].to_numpy()
        leak = SyntheticConfig().leak
        q_like = pl / (pc + leak * (1 - pc))  # like given click: the task's own score
        return float(np.corrcoef(_logit(pc), _logit(np.clip(q_like, 1e-6, 1 - 1e-6)))[0, 1])

    low, high = corr(0.0), corr(1.0)
    assert high > 0.95
    assert abs(low) < 0.3
