"""Regularisation for sparse ids: dropout, embedding lr / weight decay groups, min count -> OOV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from launch.cli import main as ranker
from ranker.schema import OOV_INDEX
from training.data import Encoded, RawData, build_schema, encode_split
from training.model import ModelConfig, MultiTaskModel, inputs_from_schema
from training.spec import DatasetSpec
from training.train import TrainConfig, fit, param_groups, to_tensors

TINY = {"n_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}


def _cfg(schema: object, **kw: object) -> ModelConfig:
    return ModelConfig(inputs=inputs_from_schema(schema), **{**TINY, **kw})  # type: ignore[arg-type]


def _batch(data: Encoded, n: int = 64) -> dict[str, torch.Tensor]:
    return to_tensors({k: v[:n] for k, v in data.inputs.items()})


def test_dropout_is_on_in_training_and_off_in_eval(
    small_schema: object, small_encoded: dict[str, Encoded]
) -> None:
    x = _batch(small_encoded["train"])
    for kw in ({"dropout": 0.5}, {"embedding_dropout": 0.5}):
        torch.manual_seed(0)
        model = MultiTaskModel(_cfg(small_schema, **kw))
        model.train()
        a, b = model(x)["click"], model(x)["click"]
        assert not torch.equal(a, b), kw  # a different mask each call
        model.eval()
        assert torch.equal(model(x)["click"], model(x)["click"]), kw


def test_defaults_train_exactly_as_before(
    small_schema: object, small_encoded: dict[str, Encoded]
) -> None:
    """dropout 0 and the embedding options at their defaults: one Adam group, no random draw
    for dropout, so the weights are those of a plain fit (the same seed twice is the proof that
    nothing else draws; a model with dropout 0.0 given explicitly is the same model)."""
    tc = TrainConfig(epochs=1, progress=False, batch_size=512)
    m0 = MultiTaskModel(_cfg(small_schema))
    assert len(param_groups(m0, tc)) == 1
    a, _ = fit(_cfg(small_schema), small_encoded["train"], small_encoded["val"], tc)
    b, _ = fit(_cfg(small_schema, dropout=0.0, embedding_dropout=0.0), small_encoded["train"],
               small_encoded["val"], TrainConfig(epochs=1, progress=False, batch_size=512,
                                                 embedding_weight_decay=None,
                                                 embedding_lr_mult=1.0))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_embedding_param_group(small_schema: object, small_encoded: dict[str, Encoded]) -> None:
    tc = TrainConfig(epochs=1, progress=False, batch_size=512, embedding_lr_mult=0.0,
                     embedding_weight_decay=0.0, weight_decay=1e-4)
    groups = param_groups(MultiTaskModel(_cfg(small_schema)), tc)
    assert len(groups) == 2
    assert groups[1]["lr"] == 0.0 and groups[1]["weight_decay"] == 0.0
    torch.manual_seed(tc.seed)
    init = MultiTaskModel(_cfg(small_schema)).state_dict()
    model, _ = fit(_cfg(small_schema), small_encoded["train"], small_encoded["val"], tc)
    after = model.state_dict()
    emb = [k for k in after if k.startswith("encoders.")]
    rest = [k for k in after if not k.startswith("encoders.")]
    assert emb and rest
    for k in emb:  # lr 0 on the tables: not a single embedding row moved
        assert torch.equal(after[k], init[k]), k
    assert any(not torch.equal(after[k], init[k]) for k in rest)


def test_min_count_maps_rare_ids_to_oov(
    synthetic_spec: DatasetSpec, small_raw: RawData
) -> None:
    spec = synthetic_spec.with_min_count(5)
    assert all(f.min_count == 5 for f in spec.features if f.type == "categorical")
    schema = build_schema(spec, small_raw)
    user_id = schema.group("user").categorical[0]  # type: ignore[union-attr]
    counts = pc.value_counts(small_raw.splits["train"]["user_id"]).to_pylist()
    rare = sorted(c["values"] for c in counts if c["counts"] < 5)
    kept = sorted(c["values"] for c in counts if c["counts"] >= 5)
    assert rare, "the tiny world must have rare users for this test"
    assert sorted(user_id.vocab.values) == kept
    assert user_id.vocab.encode(rare).tolist() == [OOV_INDEX] * len(rare)
    enc = encode_split(spec, schema, small_raw, "train")
    train_ids = small_raw.splits["train"]["user_id"].to_numpy(zero_copy_only=False)
    is_rare = np.isin(train_ids, rare)
    assert (enc.inputs["user_cat"][is_rare, 0] == OOV_INDEX).all()
    assert (enc.inputs["user_cat"][~is_rare, 0] != OOV_INDEX).all()


def test_cli_flags_reach_the_run_and_export(
    small_data: Path, tmp_path: Path, synthetic_spec: DatasetSpec, small_raw: RawData
) -> None:
    run = tmp_path / "run"
    assert ranker(["train", "--data", str(small_data), "--out", str(run), "--epochs", "1",
                   "--experts", "2", "--expert-hidden", "8", "--tower-hidden", "4",
                   "--no-baselines", "--no-progress", "--dropout", "0.2",
                   "--embedding-dropout", "0.1", "--embedding-weight-decay", "1e-3",
                   "--embedding-lr-mult", "0.5", "--min-count", "4", "--no-track"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["config"]["dropout"] == 0.2 and report["config"]["embedding_dropout"] == 0.1
    assert report["train_config"]["embedding_weight_decay"] == 1e-3
    assert report["train_config"]["embedding_lr_mult"] == 0.5
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["config"]["dropout"] == 0.2
    want = build_schema(synthetic_spec.with_min_count(4), small_raw).vocabularies()
    assert ckpt["vocab"] == want  # --min-count reached every listed categorical
    # export traces the model in eval mode: no dropout in the graph, parity holds (checked by
    # the exporter on the golden rows)
    assert ranker(["export", "--run", str(run), "--repo", str(tmp_path / "models")]) == 0
