"""The Optuna search: a 3-trial budget end to end, pruning, the best config used and exported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import torch

from launch.cli import main as ranker
from ranker.manifest import load_manifest
from training.data import RawData
from training.spec import DatasetSpec
from training.train import TrainConfig
from training.tune import BEST_CONFIG, SearchSpace, apply, tune

TINY = {"n_experts": 2, "expert_hidden": [8], "bottom_hidden": [8], "tower_hidden": [4]}
# a small space so that 3 trials on tiny data take seconds
SMALL = SearchSpace(n_experts=(2, 3), expert_width=(8,), min_count=(1, 3), batch_size=(512,))


def test_tune_three_trials_then_train_and_export(small_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert ranker(["tune", "--trials", "3", "--data", str(small_data), "--out", str(run),
                   "--epochs", "2", "--patience", "1", "--experts", "2", "--expert-hidden", "8",
                   "--bottom-hidden", "8", "--tower-hidden", "4", "--batch-size", "1024",
                   "--no-baselines", "--no-progress"]) == 0
    best = json.loads((run / BEST_CONFIG).read_text())
    report = json.loads((run / "report.json").read_text())
    tuning = report["tuning"]
    assert tuning["budget"]["trials"] == 3 and tuning["trials_run"] == 3
    assert tuning["pruner"] == "MedianPruner" and tuning["sampler"] == "TPESampler(seed=0)"
    assert set(tuning["space"]) >= {"lr", "embedding_lr_mult", "dropout", "n_experts",
                                    "expert_width", "min_count", "batch_size", "cross_max"}
    assert all(t["val_loss_per_epoch"] for t in tuning["trials"])  # reported every epoch
    done = [t for t in tuning["trials"] if t["state"] == "complete"]
    assert tuning["best_val_loss"] == min(t["value"] for t in done)
    assert best["params"] == tuning["best_params"] == tuning["best_config"]["params"]
    # the final model is trained with the best configuration ...
    p = best["params"]
    assert report["config"]["n_experts"] == p["n_experts"]
    assert report["config"]["expert_hidden"] == [p["expert_width"], p["expert_width"] // 2]
    assert report["config"]["dropout"] == p["dropout"]
    assert report["config"]["cross_max"] == p["cross_max"]
    assert report["train_config"]["lr"] == p["lr"]
    assert report["train_config"]["batch_size"] == p["batch_size"]
    assert report["train_config"]["embedding_lr_mult"] == p["embedding_lr_mult"]
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["config"]["n_experts"] == p["n_experts"]
    assert "Hyperparameter search (3 trials" in (run / "report.md").read_text()
    # ... and export publishes that model, with best_config.json beside it
    repo = tmp_path / "models"
    assert ranker(["export", "--run", str(run), "--repo", str(repo)]) == 0
    vdir = repo / "mmoe" / "1"
    m = load_manifest(vdir)
    assert m.n_experts == p["n_experts"] and BEST_CONFIG in m.files
    assert json.loads((vdir / BEST_CONFIG).read_text()) == best


class PruneFromTrial(optuna.pruners.BasePruner):
    """Prunes every trial from number `first` on, at its first report."""

    def __init__(self, first: int) -> None:
        self.first = first

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number >= self.first


def test_pruned_trials_stop_early_and_are_recorded(
    synthetic_spec: DatasetSpec, small_raw: RawData
) -> None:
    tc = TrainConfig(epochs=3, patience=3, progress=False, batch_size=512)
    out = tune(synthetic_spec, small_raw, TINY, tc, n_trials=2, space=SMALL,
               pruner=PruneFromTrial(1))
    t0, t1 = out["trials"]
    assert t0["state"] == "complete" and len(t0["val_loss_per_epoch"]) == 3
    assert t1["state"] == "pruned" and list(t1["val_loss_per_epoch"]) == ["1"]  # one epoch
    assert out["trials_pruned"] == 1 and out["best_trial"] == 0


def test_apply_maps_params_onto_the_configs() -> None:
    params: dict[str, Any] = {"lr": 1e-3, "weight_decay": 1e-6, "embedding_weight_decay": 1e-4,
                              "embedding_lr_mult": 0.3, "dropout": 0.1,
                              "embedding_dropout": 0.05, "n_experts": 4, "expert_width": 32,
                              "min_count": 5, "batch_size": 2048}
    mkw, tc, min_count = apply(params, dict(TINY), TrainConfig())
    assert mkw["n_experts"] == 4 and mkw["expert_hidden"] == [32, 16]
    assert mkw["dropout"] == 0.1 and mkw["embedding_dropout"] == 0.05
    assert mkw["tower_hidden"] == [4]  # not searched: the caller's
    assert (tc.lr, tc.weight_decay, tc.embedding_weight_decay, tc.embedding_lr_mult,
            tc.batch_size) == (1e-3, 1e-6, 1e-4, 0.3, 2048)
    assert tc.epochs == TrainConfig().epochs and min_count == 5
