"""MLflow tracking of `ranker train`: params, per-epoch metrics, the report and plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.cli import main as ranker
from training import tracking

FAST = ["--epochs", "2", "--experts", "2", "--expert-hidden", "8", "--bottom-hidden", "8",
        "--tower-hidden", "4", "--no-progress"]


def test_untracked_without_mlflow_says_so_in_one_line(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(tracking, "mlflow_available", lambda: False)
    monkeypatch.delenv("RANKER_TRACK")
    assert ranker(["train", "--data", str(small_data), "--out", str(tmp_path / "run"),
                   "--no-baselines", *FAST]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "tracking" in line]
    assert err == [tracking.NOT_INSTALLED]


def test_flatten_params() -> None:
    got = tracking.flatten({"train": {"lr": 0.1, "loss_weights": {}}, "model": {"h": [8, 4]},
                            "seeds": "0,1"})
    assert got == {"train.lr": 0.1, "model.h": "[8, 4]", "seeds": "0,1"}


needs_mlflow = pytest.mark.skipif(not tracking.mlflow_available(),
                                  reason="mlflow is not installed (the optional `track` extra)")


@needs_mlflow
def test_a_tracked_run_lists_params_curves_and_artifacts(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir = tmp_path / "run-a"
    assert ranker(["train", "--data", str(small_data), "--out", str(run_dir), "--track",
                   "--seeds", "0,1", *FAST]) == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("synthetic")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "run-a")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["seed 0", "seed 1"]
    p = parent.data.params
    assert p["train.lr"] == "0.002" and p["model.n_experts"] == "2" and p["seeds"] == "0,1"
    assert "mmoe.test_click_auc_mean" in parent.data.metrics
    assert "oracle.test_share_auc" in parent.data.metrics
    child = children[0]
    curve = client.get_metric_history(child.info.run_id, "mmoe.val_loss")
    assert [m.step for m in curve] == list(range(1, len(curve) + 1)) and len(curve) >= 1
    assert client.get_metric_history(child.info.run_id, "shared_bottom.val_like_loss")
    assert "omoe.test_like_auc" in child.data.metrics
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.json", "report.md", "training_curves.png", "gate_heatmap.png"} <= names
    assert "model.pt" not in names


@needs_mlflow
def test_a_tracked_search_has_a_run_per_trial(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert ranker(["tune", "--trials", "2", "--data", str(small_data), "--out",
                   str(tmp_path / "tuned"), "--track", "--no-baselines", *FAST]) == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("synthetic")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "tuned")
    trials = sorted((r for r in runs if r.info.run_name.startswith("trial ")),
                    key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in trials] == ["trial 0", "trial 1"]
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["trial_state"] in ("complete", "pruned")
        assert "lr" in r.data.params and "min_count" in r.data.params
        assert client.get_metric_history(r.info.run_id, "val_loss")
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.json", "report.md"} <= names
