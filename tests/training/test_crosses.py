"""Cross features (ModelConfig.crosses / cross_max): the flags reach the run and the export, and
their tables train with the other weights, not with the id embeddings' decay."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from launch.cli import main as ranker
from ranker.schema import FeatureSchema
from training.data import Encoded
from training.model import ModelConfig, MultiTaskModel, inputs_from_schema
from training.train import TrainConfig, fit, param_groups

TINY = {"n_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}


def test_cross_tables_train_outside_the_embedding_group(
    small_schema: FeatureSchema, small_encoded: dict[str, Encoded]
) -> None:
    cfg = ModelConfig(inputs=inputs_from_schema(small_schema), crosses=["interest:category"],
                      **TINY)  # type: ignore[arg-type]
    (cross,) = cfg.cross_pairs
    assert cross.name == "user.interest:item.category" and not cross.hashed
    tc = TrainConfig(epochs=1, progress=False, batch_size=512, embedding_lr_mult=0.0,
                     embedding_weight_decay=1e-3)
    model = MultiTaskModel(cfg)
    emb_group = {id(p) for p in param_groups(model, tc)[1]["params"]}
    assert id(model.cross_tables[0].weight) not in emb_group
    trained, _ = fit(cfg, small_encoded["train"], small_encoded["val"], tc)
    table = trained.cross_tables[0].weight
    assert torch.count_nonzero(table) > 0  # it learned from 0, with the id tables frozen


def test_cross_flags_reach_the_run_and_export(small_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert ranker(["train", "--data", str(small_data), "--out", str(run), "--epochs", "1",
                   "--experts", "2", "--expert-hidden", "8", "--tower-hidden", "4",
                   "--no-baselines", "--no-progress", "--no-track",
                   "--cross", "interest:category,user.device:item.category",
                   "--cross-max", "500", "--cross-mode", "embedding", "--cross-dim", "3"]) == 0
    config = json.loads((run / "report.json").read_text())["config"]
    assert config["crosses"] == ["interest:category", "user.device:item.category"]
    assert (config["cross_max"], config["cross_mode"], config["cross_dim"]) == (500, "embedding", 3)
    ckpt = torch.load(run / "model.pt", weights_only=True)
    names = [x.name for x in ModelConfig.from_dict(ckpt["config"]).cross_pairs]
    assert names[:2] == ["user.interest:item.category", "user.device:item.category"]
    assert "user.country:item.category" in names  # from --cross-max
    # the exporter checks onnxruntime against PyTorch on the golden rows
    assert ranker(["export", "--run", str(run), "--repo", str(tmp_path / "models")]) == 0
