"""Training reduces the loss, is seeded, and checkpoints round-trip with weights_only=True."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ranker.schema import FeatureSchema
from training.data import Encoded
from training.metrics import log_loss
from training.model import ModelConfig, MultiTaskModel, inputs_from_schema
from training.pipeline import baseline_configs
from training.train import TrainConfig, fit, load_checkpoint, predict, save_checkpoint

TASKS = ["click", "like", "share"]
FAST = TrainConfig(epochs=3, batch_size=256, lr=3e-3, patience=5, progress=False)


def small_config(schema: FeatureSchema) -> ModelConfig:
    return ModelConfig(inputs=inputs_from_schema(schema), tasks=TASKS, n_experts=4,
                       expert_hidden=[16], tower_hidden=[8])


def weighted_loss(model: MultiTaskModel, data: Encoded) -> float:
    pred = predict(model, data)
    return sum(log_loss(data.labels[:, j], pred[t]) for j, t in enumerate(TASKS))


def test_training_reduces_the_loss(
    small_schema: FeatureSchema, small_encoded: dict[str, Encoded]
) -> None:
    cfg = small_config(small_schema)
    torch.manual_seed(FAST.seed)
    before = weighted_loss(MultiTaskModel(cfg).eval(), small_encoded["test"])
    model, hist = fit(cfg, small_encoded["train"], small_encoded["val"], FAST)
    after = weighted_loss(model, small_encoded["test"])
    assert after < 0.8 * before, (before, after)
    assert hist.train_loss[-1] < hist.train_loss[0]
    assert 1 <= hist.best_epoch <= len(hist.val_loss)
    assert hist.val_loss[hist.best_epoch - 1] == min(hist.val_loss)  # best weights kept


def test_training_is_seeded(
    small_schema: FeatureSchema, small_encoded: dict[str, Encoded]
) -> None:
    cfg = small_config(small_schema)
    one = dataclasses.replace(FAST, epochs=1)
    a, _ = fit(cfg, small_encoded["train"], small_encoded["val"], one)
    b, _ = fit(cfg, small_encoded["train"], small_encoded["val"], one)
    c, _ = fit(cfg, small_encoded["train"], small_encoded["val"], dataclasses.replace(one, seed=1))
    pa, pb, pc = (predict(m, small_encoded["test"])["click"] for m in (a, b, c))
    np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(pa, pc)


def test_loss_weights_change_what_is_learned(
    small_schema: FeatureSchema, small_encoded: dict[str, Encoded]
) -> None:
    cfg = small_config(small_schema)
    # no weight decay here: with Adam's L2 term a weight moves even without a loss gradient
    one = dataclasses.replace(FAST, epochs=1, weight_decay=0.0)
    zero_share = dataclasses.replace(one, loss_weights={"share": 0.0})
    a, _ = fit(cfg, small_encoded["train"], small_encoded["val"], one)
    b, _ = fit(cfg, small_encoded["train"], small_encoded["val"], zero_share)
    # with weight 0 the share tower gets no gradient: it keeps its initial weights
    torch.manual_seed(one.seed)
    init = MultiTaskModel(cfg)
    t = TASKS.index("share")
    for w_b, w_init, w_a in zip(b.towers.weights, init.towers.weights, a.towers.weights,
                                strict=True):
        torch.testing.assert_close(w_b[t], w_init[t])
        assert not torch.equal(w_a[t], w_init[t])


def test_checkpoint_round_trip_with_weights_only(
    small_schema: FeatureSchema, small_encoded: dict[str, Encoded], tmp_path: Path
) -> None:
    cfg = small_config(small_schema)
    model, _ = fit(cfg, small_encoded["train"], small_encoded["val"],
                   dataclasses.replace(FAST, epochs=1))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, features={"version": "abc"}, golden={"x": torch.zeros(2)})
    ckpt = torch.load(path, weights_only=True)  # raises if anything but plain data was pickled
    assert ckpt["config"] == cfg.to_dict() and ckpt["features"] == {"version": "abc"}
    loaded, _ = load_checkpoint(path)
    assert loaded.config == cfg
    for k, v in predict(model, small_encoded["test"]).items():
        np.testing.assert_array_equal(predict(loaded, small_encoded["test"])[k], v)


def test_baselines_share_the_code_path(
    small_schema: FeatureSchema, small_encoded: dict[str, Encoded]
) -> None:
    cfg = small_config(small_schema)
    b = baseline_configs(cfg)
    assert set(b) == {"shared_bottom", "single_click", "single_like", "single_share", "omoe"}
    assert b["single_like"].tasks == ["like"] and b["single_like"].model_type == "shared_bottom"
    assert b["omoe"].n_gates == 1 and cfg.n_gates == 3
