"""Hyperparameter search with Optuna on the validation split, then the final run with the best.

`ranker tune --trials N [--timeout-min M]` (or `ranker train --tune N`): every trial trains the
main model on the train split with a configuration drawn from `SearchSpace` (Optuna's TPE
sampler, seeded), reports its validation loss after every epoch to Optuna's `MedianPruner`,
which stops a trial whose loss is worse than the median of the earlier trials at the same epoch,
and scores the best validation loss it reached (the weighted per-task log loss that early
stopping uses). The test split is never looked at. The best configuration is written to
`best_config.json` in the run directory and is the one the run's final model (and its
baselines) are trained with, so `ranker export` of the run publishes it; the report gets a
"tuning" section with every trial.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.data import Encoded, RawData, build_schema, encode_split, load_raw
from training.model import ModelConfig, inputs_from_schema
from training.pipeline import run_training
from training.spec import DatasetSpec
from training.tracking import Tracker
from training.train import TrainConfig, fit

log = logging.getLogger(__name__)

BEST_CONFIG = "best_config.json"


@dataclass(frozen=True)
class SearchSpace:
    """What a trial draws. Ranges are (low, high), drawn log-uniformly where marked; tuples of
    choices are categorical; one choice fixes a dimension, no choice leaves it at the caller's
    value (min_count: the spec's)."""

    lr: tuple[float, float] = (3e-4, 1e-2)  # log
    weight_decay: tuple[float, float] = (1e-7, 1e-4)  # log; every weight but the embeddings
    # log; up to 1e-2: 1e-3 is what held the sparse worlds of the issue-17 grid
    embedding_weight_decay: tuple[float, float] = (1e-7, 1e-2)
    embedding_lr_mult: tuple[float, float] = (0.1, 1.0)  # log
    dropout: tuple[float, float] = (0.0, 0.3)
    embedding_dropout: tuple[float, float] = (0.0, 0.2)
    n_experts: tuple[int, ...] = (4, 8, 12)
    expert_width: tuple[int, ...] = (16, 32, 64)  # expert_hidden = [w, w // 2]
    min_count: tuple[int, ...] = (1, 2, 5, 10)  # every listed categorical (rare ids -> OOV)
    batch_size: tuple[int, ...] = (512, 1024, 2048)
    # ModelConfig.cross_max: 0 = no automatic cross features; 1024 = every user x item pair of
    # categoricals of at most 1,024 cells (docs/experiments/world-grid/diagnosis.md)
    cross_max: tuple[int, ...] = (0, 1024)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One configuration from an Optuna trial: {name: value}."""
        p: dict[str, Any] = {}
        for name in ("lr", "weight_decay", "embedding_weight_decay", "embedding_lr_mult"):
            lo, hi = getattr(self, name)
            p[name] = trial.suggest_float(name, lo, hi, log=True)
        for name in ("dropout", "embedding_dropout"):
            lo, hi = getattr(self, name)
            p[name] = trial.suggest_float(name, lo, hi)
        for name in ("n_experts", "expert_width", "min_count", "batch_size", "cross_max"):
            choices = getattr(self, name)
            if choices:
                p[name] = trial.suggest_categorical(name, list(choices))
        return p

    def describe(self) -> dict[str, Any]:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}


def apply(
    params: dict[str, Any], model_kw: dict[str, Any], train_cfg: TrainConfig
) -> tuple[dict[str, Any], TrainConfig, int | None]:
    """A trial's (or the best) parameters applied to the caller's configuration:
    (model kwargs, train config, min_count or None for the spec's)."""
    mkw = dict(model_kw)
    for k in ("dropout", "embedding_dropout", "n_experts", "cross_max"):
        if k in params:
            mkw[k] = params[k]
    if "expert_width" in params:
        w = int(params["expert_width"])
        mkw["expert_hidden"] = [w, max(w // 2, 1)]
    tc_kw = {k: params[k] for k in ("lr", "weight_decay", "embedding_weight_decay",
                                    "embedding_lr_mult", "batch_size") if k in params}
    return mkw, dataclasses.replace(train_cfg, **tc_kw), params.get("min_count")


class _Splits:
    """Encoded train/val splits per min_count (a min_count changes the vocabularies)."""

    def __init__(self, spec: DatasetSpec, raw: RawData) -> None:
        self.spec, self.raw = spec, raw
        self.cache: dict[int | None, tuple[Any, Encoded, Encoded]] = {}

    def get(self, min_count: int | None) -> tuple[Any, Encoded, Encoded]:
        if min_count not in self.cache:
            spec = self.spec if min_count is None else self.spec.with_min_count(min_count)
            schema = build_schema(spec, self.raw)
            tr, va = (encode_split(spec, schema, self.raw, s) for s in ("train", "val"))
            self.cache[min_count] = (schema, tr, va)
        return self.cache[min_count]


def tune(
    spec: DatasetSpec,
    raw: RawData,
    model_kw: dict[str, Any],
    train_cfg: TrainConfig,
    *,
    n_trials: int,
    timeout_s: float | None = None,
    space: SearchSpace | None = None,
    pruner: Any = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Search on the validation split; returns the report's "tuning" entry (space, budget,
    every trial, the best parameters and validation loss)."""
    import optuna

    space = space or SearchSpace()
    splits = _Splits(spec, raw)
    pruner = pruner if pruner is not None else optuna.pruners.MedianPruner(
        n_startup_trials=2, n_warmup_steps=1
    )
    sampler = optuna.samplers.TPESampler(seed=train_cfg.seed)
    study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        mkw, tc, min_count = apply(params, model_kw, train_cfg)
        schema, train, val = splits.get(min_count)
        cfg = ModelConfig(inputs=inputs_from_schema(schema), tasks=spec.task_names, **mkw)

        def on_epoch(epoch: int, vl: float, _per_task: dict[str, float]) -> None:
            trial.report(vl, epoch)
            if tracker:
                tracker.log_metrics({"val_loss": vl}, step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: val loss {vl:.5f} above the median")

        log.info("trial %d: %s", trial.number, params)
        if tracker is None:
            _, hist = fit(cfg, train, val, tc, on_epoch=on_epoch)
        else:
            with tracker.run(f"trial {trial.number}", {"trial": trial.number, **params},
                             nested=True):
                try:
                    _, hist = fit(cfg, train, val, tc, on_epoch=on_epoch)
                except optuna.TrialPruned:
                    tracker.mlflow.set_tag("trial_state", "pruned")
                    raise
                tracker.mlflow.set_tag("trial_state", "complete")
        return min(hist.val_loss)

    t0 = time.perf_counter()
    study.optimize(objective, n_trials=n_trials, timeout=timeout_s, catch=())
    seconds = time.perf_counter() - t0
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError("tuning: no trial completed (all pruned or failed)")
    trials = [
        {
            "number": t.number,
            "state": t.state.name.lower(),
            "params": t.params,
            "value": t.value,
            "val_loss_per_epoch": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "seconds": (t.duration.total_seconds() if t.duration else None),
        }
        for t in study.trials
    ]
    return {
        "objective": "best validation loss (weighted per-task log loss) of the main model",
        "sampler": f"TPESampler(seed={train_cfg.seed})",
        "pruner": type(pruner).__name__,
        "space": space.describe(),
        "budget": {"trials": n_trials, "timeout_s": timeout_s},
        "trials_run": len(trials),
        "trials_pruned": sum(t["state"] == "pruned" for t in trials),
        "seconds": seconds,
        "best_trial": study.best_trial.number,
        "best_params": study.best_params,
        "best_val_loss": study.best_value,
        "trials": trials,
    }


def tune_and_train(
    spec: DatasetSpec,
    out: Path,
    model_kw: dict[str, Any],
    train_cfg: TrainConfig,
    *,
    n_trials: int,
    timeout_s: float | None = None,
    data_dir: Path | None = None,
    baselines: bool = True,
    seeds: Sequence[int] | None = None,
    tracker: Tracker | None = None,
    space: SearchSpace | None = None,
    pruner: Any = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Search, write `best_config.json`, then `run_training` with the best configuration."""
    torch.set_num_threads(threads)
    raw = load_raw(spec, data_dir)
    tuning = tune(spec, raw, model_kw, train_cfg, n_trials=n_trials, timeout_s=timeout_s,
                  space=space, pruner=pruner, tracker=tracker)
    mkw, tc, min_count = apply(tuning["best_params"], model_kw, train_cfg)
    best = {"model": mkw, "train": tc.to_dict(), "min_count": min_count,
            "params": tuning["best_params"], "val_loss": tuning["best_val_loss"],
            "trial": tuning["best_trial"]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / BEST_CONFIG).write_text(json.dumps(best, indent=2) + "\n")
    tuning["best_config"] = best
    final_spec = spec if min_count is None else spec.with_min_count(int(min_count))
    return run_training(final_spec, out, mkw, tc, baselines=baselines, seeds=seeds,
                        tracker=tracker, raw=raw, extra={"tuning": tuning}, threads=threads)
