"""The commands end to end on tiny data: ranker data / train / export, and ensure_default_model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from launch.cli import main as ranker
from ranker.manifest import list_versions, load_manifest, load_schema, verify_files
from training.pipeline import ensure_default_model

FAST_MODEL = ["--experts", "3", "--expert-hidden", "8", "--bottom-hidden", "8",
              "--tower-hidden", "4", "--no-progress", "--batch-size", "512"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`ranker data --small` then `ranker train` with baselines, 2 epochs."""
    base = tmp_path_factory.mktemp("pipeline")
    data, run = base / "data", base / "run"
    assert ranker(["data", "--small", "--impressions", "6000", "--out", str(data)]) == 0
    assert ranker(["train", "--data", str(data), "--out", str(run), "--epochs", "2",
                   *FAST_MODEL]) == 0
    return data, run


def test_train_writes_report_and_plots(trained_run: tuple[Path, Path]) -> None:
    data, run = trained_run
    for name in ("model.pt", "report.json", "report.md", "training_curves.png",
                 "gate_heatmap.png"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert set(report["models"]) == {"mmoe", "shared_bottom", "single_click", "single_like",
                                     "single_share", "omoe"}
    for task in ("click", "like", "share"):
        auc = report["models"]["mmoe"]["test"][task]["auc"]
        assert 0.0 <= auc <= 1.0
        assert 0.5 < report["oracle_auc"][task] <= 1.0
    gates = np.asarray(report["models"]["mmoe"]["test"]["gates_mean"])
    assert gates.shape == (3, 3)
    np.testing.assert_allclose(gates.sum(1), 1.0, atol=1e-5)
    info = json.loads((data / "dataset.json").read_text())
    assert report["training_data"]["rows"]["train"] == info["sizes"]["impressions_train"]
    assert report["training_data"]["sha256"] == info["sha256"]  # the data it was trained on
    md = (run / "report.md").read_text()
    assert "| mmoe |" in md and "| oracle (true p) |" in md and "| single_share |" in md


def test_export_writes_a_version_with_real_golden_rows(
    trained_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run = trained_run
    repo = tmp_path / "models"
    assert ranker(["export", "--run", str(run), "--repo", str(repo)]) == 0
    assert ranker(["export", "--run", str(run), "--repo", str(repo)]) == 0
    assert list_versions(repo, "mmoe") == [1, 2]  # the spec's model name; versions increase
    vdir = repo / "mmoe" / "2"
    m = load_manifest(vdir)
    verify_files(vdir, m)
    schema = load_schema(vdir, m)
    assert m.training_data["dataset"] == "synthetic" and len(m.training_data["sha256"]) == 64
    assert m.metrics["test"]["click"]["auc"] > 0
    assert {"report.md", "report.json", "gate_heatmap.png"} <= set(m.files)
    # golden = one real test user and context over 8 real test items (the serving layout)
    assert len(m.golden.inputs["user_cat"]) == 1 and len(m.golden.inputs["item_cat"]) == 8
    assert any(v != 0 for v in m.golden.inputs["item_cat"][0])  # real ids, not OOV
    sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {k: np.asarray(v, dtype=np.int64 if k.endswith("_cat") else np.float32)
             for k, v in m.golden.inputs.items()}
    out = sess.run(["click"], feeds)[0]
    np.testing.assert_allclose(out, m.golden.outputs["click"], atol=1e-5, rtol=0)
    assert schema.version == m.features["version"]


def test_bad_loss_weight_task_is_a_usage_error(trained_run: tuple[Path, Path]) -> None:
    data, _ = trained_run
    with pytest.raises(SystemExit) as e:
        ranker(["train", "--data", str(data), "--loss-weights", "follow=2"])
    assert e.value.code == 2


def test_ensure_default_model_trains_once(tmp_path: Path) -> None:
    repo, data = tmp_path / "models", tmp_path / "data"
    vdir = ensure_default_model(repo, data, small=True)
    assert vdir == repo / "mmoe" / "1"
    assert (data / "dataset.json").is_file()
    verify_files(vdir, load_manifest(vdir))
    # a second call finds the version and does not train again
    assert ensure_default_model(repo, data, small=True) == vdir
    assert list_versions(repo, "mmoe") == [1]
