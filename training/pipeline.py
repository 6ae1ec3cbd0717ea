"""End-to-end jobs: train a model and its baselines into a run directory, export a run, and
`ensure_default_model` for the main job (data -> train -> export when the repository is empty).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranker.manifest import list_versions, version_dir
from ranker.schema import CANDIDATE_ENTITY, FeatureSchema
from training.data import (
    Encoded,
    RawData,
    build_schema,
    encode_split,
    load_raw,
    training_data_info,
)
from training.distributed import current
from training.export import export_model
from training.metrics import auc
from training.model import ModelConfig, MultiTaskModel, inputs_from_schema
from training.report import write_report
from training.seeds import paired_tests, seed_summary
from training.spec import DatasetSpec, load_spec
from training.synthetic import SyntheticConfig, read_dataset_info, write_dataset
from training.tracking import Tracker
from training.train import TrainConfig, evaluate, fit, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT = "model.pt"
GOLDEN_ROWS = 8
DEFAULT_SPEC = "synthetic"


def golden_from(
    schema: FeatureSchema, data: Encoded, n: int = GOLDEN_ROWS
) -> dict[str, np.ndarray]:
    """Real encoded test rows as the service sends them: one user and context over n items.

    Without an item group (census) every group carries the same n rows.
    """
    has_items = schema.group(CANDIDATE_ENTITY) is not None
    out = {}
    for s in schema.input_specs():
        rows = 1 if has_items and s.entity != CANDIDATE_ENTITY else n
        out[s.name] = np.ascontiguousarray(data.inputs[s.name][:rows])
    return out


def baseline_configs(main: ModelConfig) -> dict[str, ModelConfig]:
    """Shared-Bottom, one single-task model per task, and OMoE, sized like the main model
    (and MMoE when the main model is PLE or CGC)."""
    out = {}
    if main.model_type != "shared_bottom":
        out["shared_bottom"] = dataclasses.replace(main, model_type="shared_bottom")
    if len(main.tasks) > 1:
        for t in main.tasks:
            out[f"single_{t}"] = dataclasses.replace(main, model_type="shared_bottom", tasks=[t],
                                                     chain={})
    if main.model_type != "omoe":
        out["omoe"] = dataclasses.replace(main, model_type="omoe")
    if main.is_ple:
        out["mmoe"] = dataclasses.replace(main, model_type="mmoe")
    return out


def run_training(
    spec: DatasetSpec,
    out: Path,
    model_kw: dict[str, Any],
    train_cfg: TrainConfig,
    *,
    data_dir: Path | None = None,
    baselines: bool = True,
    threads: int = 1,
    seeds: Sequence[int] | None = None,
    tracker: Tracker | None = None,
    raw: RawData | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the main model (and baselines) on `spec`, evaluate on test, write the run directory.

    `seeds`: train every model once per seed (default: `train_cfg.seed` alone); the report then
    gains "seeds" (mean ± std per model and task, paired tests), and the checkpoint is the first
    seed's main model. `tracker`: log to its active MLflow run (the caller opens it). `raw`:
    the already loaded data (the tuner's). `extra`: more report entries (the tuner's "tuning").
    """
    # one intra-op thread: these matmuls are small, and on a busy 2-core box a second spinning
    # thread made steps much slower (measured in docs/training.md, "Model, training, evaluation")
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = raw if raw is not None else load_raw(spec, data_dir)
    schema = build_schema(spec, raw)
    train, val, test = (encode_split(spec, schema, raw, s) for s in ("train", "val", "test"))
    main_cfg = ModelConfig(inputs=inputs_from_schema(schema), tasks=spec.task_names, **model_kw)
    seed_list = list(seeds) if seeds else [train_cfg.seed]
    if len(set(seed_list)) != len(seed_list):
        raise ValueError(f"seeds: each seed once, got {seed_list}")
    runs: dict[int, dict[str, Any]] = {}
    main_model: MultiTaskModel | None = None
    for seed in seed_list:
        tc = dataclasses.replace(train_cfg, seed=seed)
        with contextlib.ExitStack() as stack:
            if tracker and len(seed_list) > 1:  # a nested MLflow run per seed
                stack.enter_context(tracker.run(f"seed {seed}", {"seed": seed}, nested=True))
            runs[seed], model = train_models(main_cfg, train, val, test, tc, baselines=baselines)
            if tracker and len(seed_list) > 1:
                tracker.log_models(runs[seed], spec.task_names)
        if main_model is None:
            main_model = model
    assert main_model is not None
    models = runs[seed_list[0]]
    info = training_data_info(spec, raw)
    report: dict[str, Any] = {
        "dataset": spec.name,
        "spec": str(spec.path) if spec.path else None,
        "tasks": spec.task_names,
        "task_rules": {t.name: t.rule for t in spec.tasks},
        "main": main_cfg.model_type,
        "model_name": spec.model_name,
        "config": main_cfg.to_dict(),
        "train_config": dataclasses.replace(train_cfg, seed=seed_list[0]).to_dict(),
        "training_data": info,
        "models": models,
        **(extra or {}),
    }
    if len(seed_list) > 1:
        report["seeds"] = {
            "seeds": seed_list,
            "summary": seed_summary(runs, spec.task_names),
            "paired": paired_tests(runs, spec.task_names, main_cfg.model_type),
            "runs": {str(s): runs[s] for s in seed_list},
        }
    if current().enabled:  # trained data-parallel (`torchrun`): say on how many ranks
        report["distributed"] = current().describe()
    if test.oracle is not None:
        report["oracle_auc"] = {
            t: auc(test.labels[:, j], test.oracle[:, j]) for j, t in enumerate(spec.task_names)
        }
    save_checkpoint(
        out / CHECKPOINT,
        main_model,
        features=schema.describe(),
        vocab=schema.vocabularies(),
        model_name=spec.model_name,
        metrics={
            "test": models[main_cfg.model_type]["test"],
            "oracle_auc": report.get("oracle_auc"),
        },
        training_data=info,
        golden={k: torch.from_numpy(v) for k, v in golden_from(schema, test).items()},
    )
    write_report(report, out)
    if tracker:
        tracker.log_params({"dataset": spec.name, "seeds": ",".join(map(str, seed_list)),
                            "model": {k: v for k, v in main_cfg.to_dict().items()
                                      if k != "inputs"},
                            "train": report["train_config"]})
        if test.oracle is not None:
            tracker.log_metrics({f"oracle.test_{t}_auc": x
                                 for t, x in report["oracle_auc"].items()})
        if "seeds" in report:
            tracker.log_metrics(_seed_metrics(report["seeds"]["summary"]))
        else:
            tracker.log_models(models, spec.task_names)
        tracker.log_run_dir(out)
    return report


def _seed_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """`<model>.test_<task>_auc_mean` / `_std` for the parent run of a multi-seed run."""
    out = {}
    for name, per_task in summary.items():
        for t, c in per_task.items():
            out[f"{name}.test_{t}_auc_mean"] = c["auc"]["mean"]
            out[f"{name}.test_{t}_auc_std"] = c["auc"]["std"]
    return out


def train_models(
    main_cfg: ModelConfig,
    train: Encoded,
    val: Encoded,
    test: Encoded,
    train_cfg: TrainConfig,
    *,
    baselines: bool = True,
    init_state: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], MultiTaskModel]:
    """Fit the main model (and its baselines) on train/val, evaluate each on test.
    `init_state`: the main model starts from these weights (warm start); baselines start cold.

    Returns the report's "models" entry (per model: type, tasks, history, test metrics) and the
    trained main model.
    """
    configs: dict[str, ModelConfig] = {main_cfg.model_type: main_cfg}
    if baselines:
        configs.update(baseline_configs(main_cfg))
    models: dict[str, Any] = {}
    main_model: MultiTaskModel | None = None
    for name, cfg in configs.items():
        log.info("training %s", name)
        tc = train_cfg
        if set(cfg.tasks) != set(main_cfg.tasks):
            tc = dataclasses.replace(
                train_cfg, loss_weights={t: train_cfg.loss_weights.get(t, 1.0) for t in cfg.tasks}
            )
        model, hist = fit(cfg, _select(train, main_cfg, cfg), _select(val, main_cfg, cfg), tc,
                          init_state=init_state if cfg is main_cfg else None)
        models[name] = {
            "model_type": cfg.model_type,
            "tasks": cfg.tasks,
            "history": hist.to_dict(),
            "test": evaluate(model, _select(test, main_cfg, cfg)),
        }
        if main_model is None:
            main_model = model
    assert main_model is not None
    return models, main_model


def _select(data: Encoded, main: ModelConfig, cfg: ModelConfig) -> Encoded:
    """The label columns a (single-task) model trains on."""
    if cfg.tasks == main.tasks:
        return data
    cols = [main.tasks.index(t) for t in cfg.tasks]
    return Encoded(
        data.inputs,
        np.ascontiguousarray(data.labels[:, cols]),
        None if data.oracle is None else data.oracle[:, cols],
    )


def export_run(run_dir: Path, repo: Path, name: str | None = None) -> Path:
    """Export a run's checkpoint as a new version of `name` (default: the dataset's model name)."""
    run_dir = Path(run_dir)
    model, ckpt = load_checkpoint(run_dir / CHECKPOINT)
    schema = FeatureSchema.from_description(ckpt["features"], ckpt["vocab"])
    golden = {k: v.numpy() for k, v in ckpt["golden"].items()}
    extra = {
        p.name: p
        for p in sorted(run_dir.iterdir())
        if p.is_file() and p.suffix in (".md", ".json", ".png") and p.name != "manifest.json"
    }
    return export_model(
        model,
        schema,
        repo,
        name or ckpt["model_name"],
        golden,
        metrics=ckpt["metrics"],
        training_data=ckpt["training_data"],
        extra_files=extra,
    )


# The main job's model is the default model (`ModelConfig`'s defaults) trained by a short run:
# `TrainConfig`'s defaults but these epochs, no baselines, no progress bar.
DEFAULT_MODEL_EPOCHS = 4
DEFAULT_MODEL_EPOCHS_SMALL = 2


def ensure_default_model(
    repo: Path,
    data_dir: Path,
    name: str = "mmoe",
    small: bool = False,
    run_dir: Path | None = None,
) -> Path:
    """The newest version of `name` in `repo`; if none, generate data (if absent), train, export.

    Used by the main job on a fresh checkout. No baselines; a short run (see docs/training.md).
    """
    versions = list_versions(repo, name)
    if versions:
        return version_dir(repo, name, versions[-1])
    data_dir = Path(data_dir)
    if read_dataset_info(data_dir) is None:
        log.info("generating synthetic data into %s", data_dir)
        write_dataset(SyntheticConfig.small() if small else SyntheticConfig(), data_dir)
    spec = load_spec(DEFAULT_SPEC)
    epochs = DEFAULT_MODEL_EPOCHS_SMALL if small else DEFAULT_MODEL_EPOCHS
    train_cfg = TrainConfig(epochs=epochs, progress=False)
    with tempfile.TemporaryDirectory(prefix="ranker-run-") as tmp:
        out = Path(run_dir) if run_dir else Path(tmp)
        run_training(spec, out, {}, train_cfg, data_dir=data_dir, baselines=False)
        return export_run(out, repo, name)

