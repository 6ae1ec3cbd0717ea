"""Train the next model from what was served: exported impressions joined with feedback.

The examples are the impressions (one row per served item) and their inputs are **the inputs
the serving model saw**, read from the log (`served_inputs`): nothing is looked up again in the
feature tables or in Redis, so a feature value written after the response cannot leak into
training and there is no training/serving skew. The feature schema and vocabularies are the
serving model's (from its version directory in the model repository), so the new model takes
the same inputs and the feature store needs no reload.

Labels: the join of `ranker.logjoin` (an event labels its impression's task when it comes within
`window_s` after it, once per impression and task; every other event is counted by kind), the
one rule the experiment report measures rates with too.

The split is by time: requests ordered by their ts, the first 80 % train, the next 10 %
validation, the last 10 % test, so validation and test are later than training.

Two ways to train the next model as production systems do rather than from the log alone:
`init_from` warm-starts the main model from the serving model's checkpoint (its run
directory's `model.pt`: continual training), and `with_data` adds an offline dataset's train
and validation splits (a spec's data directory, e.g. the one the serving model was trained on:
the accumulated data), encoded with the serving model's schema and vocabularies so that its
rows are the inputs the service would have sent for them. The test split stays the log's.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ranker.logjoin import (
    DEFAULT_WINDOW_S,
    JoinCounts,
    LogError,
    join_labels,
    read_feedback,
    read_impressions,
)
from ranker.manifest import Manifest, ManifestError, load_manifest, load_schema, version_dir
from ranker.schema import FeatureSchema
from ranker.servedlog import (
    FEEDBACK_DIR,
    IMPRESSIONS_DIR,
    part_files,
    served_inputs,
)
from training.data import Encoded, encode_split, load_raw
from training.distributed import current
from training.model import POSITION_INPUT, ModelConfig, MultiTaskModel, inputs_from_schema
from training.pipeline import CHECKPOINT, golden_from, train_models
from training.report import REPORT_MD, markdown, write_report
from training.spec import SpecError, load_spec
from training.train import TrainConfig, save_checkpoint

log = logging.getLogger(__name__)

DATASET = "served-log"
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
SPLITS = ("train", "val", "test")


@dataclass
class ServedLog:
    """A log ready to train on: the schema it was served with and the encoded time splits."""

    schema: FeatureSchema
    manifest: Manifest  # of the newest serving version in the log
    served_by: list[dict[str, Any]]  # [{"model", "version", "impressions"}]
    splits: dict[str, Encoded]
    ts: dict[str, tuple[float, float]]  # per split: first and last impression ts
    counts: JoinCounts
    sha256: str
    # per split: P(each impression was shown) under the logging policy; all 1 for a log of
    # a service that does not explore (and for logs from before the column)
    propensity: dict[str, np.ndarray] = field(default_factory=dict)


def log_sha256(files: Sequence[Path]) -> str:
    """Of the log's files, names and bytes (the dataset hash of the run's manifest)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.parent.name}/{f.name}".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def serving_schema(files: Sequence[Path], repo: Path) -> tuple[FeatureSchema, Manifest,
                                                                list[tuple[str, int]]]:
    """The one feature schema every impression was served with, from the model repository.

    Refuses a log whose impressions come from models of different schemas, naming the versions.
    """
    versions: set[tuple[str, int]] = set()
    for f in files:
        t = pq.read_table(f, columns=["model_name", "model_version"])
        versions |= set(zip(t["model_name"].to_pylist(), t["model_version"].to_pylist(),
                            strict=True))
    by_schema: dict[str, list[tuple[str, int]]] = {}
    loaded: dict[str, tuple[FeatureSchema, Manifest]] = {}
    for name, v in sorted(versions):
        vdir = version_dir(repo, name, v)
        try:
            manifest = load_manifest(vdir)
            schema = load_schema(vdir, manifest)
        except (ManifestError, OSError) as e:
            raise LogError(f"impressions served by {name}/{v}, which --model-repo {repo} cannot "
                           f"give: {e}") from e
        by_schema.setdefault(schema.version, []).append((name, v))
        loaded[schema.version] = (schema, manifest)  # sorted: the newest version's manifest
    if len(by_schema) > 1:
        desc = "; ".join(f"schema {s}: " + ", ".join(f"{n}/{v}" for n, v in vs)
                         for s, vs in by_schema.items())
        raise LogError(f"the log mixes feature schemas ({desc}); export or select the "
                       "impressions of one schema")
    if not loaded:
        raise LogError("the impression files hold no rows")
    schema, manifest = next(iter(loaded.values()))
    if manifest.task_kind != "binary":
        raise LogError(f"{manifest.name}/{manifest.version} predicts {manifest.task_kind} tasks; "
                       "feedback events make binary labels")
    return schema, manifest, sorted(versions)


def split_by_time(
    request_ids: Sequence[str], fractions: Sequence[float] = DEFAULT_SPLIT
) -> dict[str, np.ndarray]:
    """Row indices per split, whole requests in time order (rows are sorted by time)."""
    order: dict[str, int] = {}
    for r in request_ids:
        order.setdefault(r, len(order))
    n = len(order)
    if n < 3:
        raise LogError(f"{n} requests in the log: too few for train, validation and test")
    n_val = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise LogError(f"{n} requests leave none for training with the split {fractions}")
    rank = np.array([order[r] for r in request_ids])
    return {
        "train": np.flatnonzero(rank < n_train),
        "val": np.flatnonzero((rank >= n_train) & (rank < n_train + n_val)),
        "test": np.flatnonzero(rank >= n_train + n_val),
    }


def _encoded_inputs(table: pa.Table, schema: FeatureSchema) -> dict[str, np.ndarray]:
    """The served inputs, checked against the schema's model inputs (names, dtypes, widths)."""
    inputs = served_inputs(table)
    want = {s.name: s for s in schema.input_specs()}
    if set(inputs) != set(want):
        raise LogError(f"the log's inputs {sorted(inputs)} are not the schema's {sorted(want)}")
    for name, s in want.items():
        arr = inputs[name]
        if arr.dtype != np.dtype(s.dtype) or arr.shape[1] != s.width:
            raise LogError(f"input {name}: logged {arr.dtype}[{arr.shape[1]}], the schema "
                           f"takes {s.dtype}[{s.width}]")
    return {name: np.ascontiguousarray(inputs[name]) for name in want}


def load_served_log(
    log_dir: Path,
    repo: Path,
    *,
    window_s: float = DEFAULT_WINDOW_S,
    fractions: Sequence[float] = DEFAULT_SPLIT,
) -> ServedLog:
    """Read `log_dir/impressions` and `log_dir/feedback`, join, split by time, encode."""
    log_dir = Path(log_dir)
    imp_files = part_files(log_dir / IMPRESSIONS_DIR)
    fb_files = part_files(log_dir / FEEDBACK_DIR)
    if not imp_files:
        raise LogError(f"{log_dir / IMPRESSIONS_DIR}: no impression files (ranker logs export)")
    schema, manifest, versions = serving_schema(imp_files, repo)
    impressions = read_impressions(imp_files)
    feedback = read_feedback(fb_files)
    labels, keep, counts = join_labels(impressions, feedback, manifest.tasks, window_s)
    impressions = impressions.filter(pa.array(keep))
    labels = labels[keep]
    inputs = _encoded_inputs(impressions, schema)
    # the served position: for `--position-tower` only (a training-only input, as a spec's log)
    inputs[POSITION_INPUT] = impressions["position"].to_numpy().astype(np.int64)
    idx = split_by_time(impressions["request_id"].to_pylist(), fractions)
    ts = impressions["ts"].to_numpy()
    propensity = (impressions["propensity"].to_numpy() if "propensity" in impressions.column_names
                  else np.ones(len(impressions)))
    served_by = []
    for name, v in versions:
        mask = pc.and_(pc.equal(impressions["model_name"], name),
                       pc.equal(impressions["model_version"], v))
        served_by.append({"model": name, "version": v,
                          "impressions": int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)})
    return ServedLog(
        schema=schema,
        manifest=manifest,
        served_by=served_by,
        splits={s: Encoded({k: v[i] for k, v in inputs.items()}, labels[i], None)
                for s, i in idx.items()},
        ts={s: (float(ts[i].min()), float(ts[i].max())) for s, i in idx.items()},
        counts=counts,
        sha256=log_sha256([*imp_files, *fb_files]),
        propensity={s: propensity[i] for s, i in idx.items()},
    )


DEFAULT_IPS_CLIP = 10.0
DEFAULT_WITH_SPEC = "synthetic"


def checkpoint_path(init_from: Path) -> Path:
    """A run directory's checkpoint, or the checkpoint file itself."""
    p = Path(init_from)
    return p / CHECKPOINT if p.is_dir() else p


def warm_start_state(init_from: Path, schema: FeatureSchema, main_cfg: ModelConfig
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights to start from: a checkpoint of the same feature schema whose parameters
    are the main model's (same architecture; dropout and regularisation may differ)."""
    path = checkpoint_path(init_from)
    if not path.is_file():
        raise LogError(f"--init-from {init_from}: no {CHECKPOINT} (the serving model's run "
                       "directory, as `ranker train --out` wrote it, or its checkpoint)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    got = ckpt.get("features", {}).get("version")
    if got != schema.version:
        raise LogError(f"--init-from {path}: feature schema {got}, the log was served with "
                       f"{schema.version}; warm-start from the serving model's run")
    state: dict[str, torch.Tensor] = ckpt["state_dict"]
    try:
        MultiTaskModel(main_cfg).load_state_dict(state)
    except RuntimeError as e:
        raise LogError(f"--init-from {path}: its weights do not fit the model to train "
                       f"(train the same architecture as the checkpoint's "
                       f"{ckpt['config'].get('model_type')}): {str(e).splitlines()[0]}") from e
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return state, {"checkpoint": str(path), "sha256": digest,
                   "model_type": ckpt["config"].get("model_type"),
                   "training_data": ckpt.get("training_data", {}).get("dataset")}


def offline_splits(data_dir: Path, schema: FeatureSchema, tasks: Sequence[str],
                   spec_name: str = DEFAULT_WITH_SPEC) -> tuple[dict[str, Encoded], dict[str, Any]]:
    """An offline dataset's train and validation splits encoded with the serving schema (its
    vocabularies and dense statistics, not refitted), with the log's input names."""
    try:
        spec = load_spec(spec_name)
        raw = load_raw(spec, data_dir)
    except (SpecError, FileNotFoundError, OSError) as e:
        raise LogError(f"--with-data {data_dir}: {e}") from e
    if list(spec.task_names) != list(tasks):
        raise LogError(f"--with-data {data_dir}: spec {spec.name} has tasks {spec.task_names}, "
                       f"the serving model {list(tasks)}")
    want = {g.entity: set(g.feature_names) for g in schema.groups}
    have = {e: {f.name for f in spec.features_of(e)} for e in want}
    if want != have:
        raise LogError(f"--with-data {data_dir}: spec {spec.name}'s features {have} are not the "
                       f"serving schema's {want}")
    out = {}
    for split in ("train", "val"):
        enc = encode_split(spec, schema, raw, split)
        out[split] = Encoded({k: np.ascontiguousarray(np.asarray(v))  # a Gathered materialises
                              for k, v in enc.inputs.items()}, enc.labels, None)
    info = {"data_dir": str(data_dir), "dataset": spec.name, "sha256": raw.sha256,
            "rows": {s: len(e) for s, e in out.items()}}
    return out, info


def union(log: Encoded, offline: Encoded, position: int | None = None) -> Encoded:
    """The log's rows then the offline rows, on the inputs both have (the served position is
    the log's only: it goes when the offline data has none, unless `position` gives the offline
    rows one: 0, the top, examined always, is right for an unbiased offline log)."""
    if position is not None and POSITION_INPUT in log.inputs:
        offline = Encoded({**offline.inputs, POSITION_INPUT: np.full(len(offline), position,
                                                                     np.int64)},
                          offline.labels, offline.oracle)
    names = [k for k in log.inputs if k in offline.inputs]
    missing = set(log.inputs) - set(names) - {POSITION_INPUT}
    if missing:
        raise LogError(f"--with-data: the offline data lacks the inputs {sorted(missing)}")
    return Encoded({k: np.concatenate([log.inputs[k], offline.inputs[k].astype(
                        log.inputs[k].dtype, copy=False)]) for k in names},
                   np.concatenate([log.labels, offline.labels]), None)


def ips_resample(data: Encoded, propensity: np.ndarray, clip: float, seed: int
                 ) -> tuple[Encoded, dict[str, float]]:
    """Inverse-propensity weighting by resampling: as many rows as `data`, drawn with
    replacement with probability proportional to min(1 / propensity, clip), so the model
    trains on what a uniform choice of the shown items would have shown (an item the logging
    policy shows rarely counts more), with the weights clipped to bound the variance.
    Resampling, not a weighted loss: the training loop (balancers, DDP) stays the one path.
    A log without exploration (every propensity 1) is returned as it is."""
    n = len(data)
    if clip <= 0 or n == 0 or bool(np.all(propensity >= 1.0)):
        return data, {"applied": 0.0}
    w = np.minimum(1.0 / propensity, clip)
    idx = np.random.default_rng(seed).choice(n, size=n, replace=True, p=w / w.sum())
    ess = float(w.sum() ** 2 / np.square(w).sum())  # Kish's effective sample size
    stats = {"applied": 1.0, "clip": clip, "clipped_share": float(np.mean(1.0 / propensity > clip)),
             "propensity_min": float(propensity.min()),
             "propensity_median": float(np.median(propensity)), "effective_rows": round(ess, 1),
             "distinct_rows_drawn": float(np.unique(idx).size)}
    return data.take(idx), stats


def log_markdown(report: dict[str, Any]) -> str:
    """The report's served-log section: what was joined and what was not a label."""
    f = report["from_logs"]
    c = f["counts"]
    served = ", ".join(f"{s['model']}/{s['version']} ({s['impressions']})" for s in f["served_by"])
    per_task = ", ".join(f"{t} {n}" for t, n in c["labels"].items())
    lines = [
        "## Served log",
        "",
        f"Log `{f['log_dir']}`, served by {served}; feature schema `{f['schema_version']}`.",
        "",
        "| impressions | requests | labels per task | late | orphan | duplicate | unknown task "
        "| early | window (s) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {c['impressions']} | {c['requests']} | {per_task} | {c['late']} | {c['orphan']} "
        f"| {c['duplicate']} | {c['unknown_task']} | {c['early']} | {c['window_s']:g} |",
        "",
        f"{c['events']} feedback events; an event is a label when it comes within the window "
        "after its impression (both edges included), once per impression and task. "
        f"{c['duplicate_impressions']} duplicate impressions dropped; {c['window_open']} "
        "impressions have a window that ends after the log's last record (labels may still "
        "come). Split by time (requests in ts order): "
        + ", ".join(f"{s} {_utc(f['split_ts'][s][0])} .. {_utc(f['split_ts'][s][1])}"
                    for s in SPLITS)
        + ".",
        "",
    ]
    if "init_from" in f:
        w = f["init_from"]
        lines += [f"Warm-started from `{w['checkpoint']}` ({w['model_type']}, trained on "
                  f"{w['training_data']}; sha256 {w['sha256'][:12]}).", ""]
    if "with_data" in f:
        d, rows = f["with_data"], report["training_data"].get("trained_on", {})
        lines += [f"Trained on the union of the log and `{d['data_dir']}` ({d['dataset']}, "
                  f"encoded with the serving schema): {d['rows']['train']} offline train and "
                  f"{d['rows']['val']} validation rows added, {rows.get('train')} train and "
                  f"{rows.get('val')} validation rows in all; the test split is the log's.", ""]
    ips = f.get("ips", {})
    if ips.get("applied"):
        lines += [
            f"Inverse-propensity resampling of train and validation (weights min(1/p, "
            f"{ips['clip']:g})): train propensities from {ips['propensity_min']:.3g} (median "
            f"{ips['propensity_median']:.3g}), {ips['clipped_share']:.1%} clipped; effective "
            f"rows {ips['effective_rows']:.0f}, "
            f"distinct rows drawn {ips['distinct_rows_drawn']:.0f}.",
            "",
        ]
    return "\n".join(lines)


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1e3) % 1000:03d}Z"


def run_training_from_logs(
    log_dir: Path,
    out: Path,
    model_kw: dict[str, Any],
    train_cfg: TrainConfig,
    *,
    repo: Path,
    window_s: float = DEFAULT_WINDOW_S,
    fractions: Sequence[float] = DEFAULT_SPLIT,
    baselines: bool = True,
    threads: int = 1,
    ips_clip: float = DEFAULT_IPS_CLIP,
    init_from: Path | None = None,
    with_data: Path | None = None,
    with_spec: str = DEFAULT_WITH_SPEC,
    with_data_position: int | None = None,
) -> dict[str, Any]:
    """Train on a served log, evaluate per task on its latest requests, write a run directory
    (`ranker export --run` exports it as the next version of the serving model's name). A log
    of an exploring service trains and early-stops on inverse-propensity resampled train and
    validation splits (`ips_resample`; `ips_clip` 0 = off); the test split is as logged.
    `init_from`: warm-start the main model from this run directory's checkpoint (or file);
    `with_data`: train and validate on the union of the log and this dataset (`with_spec`;
    `with_data_position`: the position its rows get, for a position tower)."""
    torch.set_num_threads(threads)  # as run_training: small matmuls on a shared 2-core box
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    served = load_served_log(log_dir, repo, window_s=window_s, fractions=fractions)
    tasks = list(served.manifest.tasks)
    unknown = set(train_cfg.loss_weights) - set(tasks)
    if unknown:
        raise LogError(f"loss weights for {sorted(unknown)}: the model's tasks are {tasks}")
    train, val, test = (served.splits[s] for s in SPLITS)
    train, ips = ips_resample(train, served.propensity["train"], ips_clip, train_cfg.seed)
    val, _ = ips_resample(val, served.propensity["val"], ips_clip, train_cfg.seed + 1)
    main_cfg = ModelConfig(inputs=inputs_from_schema(served.schema), tasks=tasks, **model_kw)
    extra: dict[str, Any] = {}
    if with_data is not None:
        if main_cfg.position_buckets and with_data_position is None:
            raise LogError("--with-data: the offline data has no served positions for "
                           "--position-tower (--with-data-position gives its rows one)")
        offline, extra["with_data"] = offline_splits(with_data, served.schema, tasks, with_spec)
        extra["with_data"]["position"] = with_data_position
        train = union(train, offline["train"], with_data_position)
        val = union(val, offline["val"], with_data_position)
    init_state = None
    if init_from is not None:
        init_state, extra["init_from"] = warm_start_state(init_from, served.schema, main_cfg)
    models, main_model = train_models(main_cfg, train, val, test, train_cfg, baselines=baselines,
                                      init_state=init_state)
    info: dict[str, Any] = {
        "dataset": DATASET,
        "sha256": served.sha256,
        "rows": {s: len(served.splits[s]) for s in SPLITS},
        "window_s": window_s,
        "served_by": served.served_by,
        **({"trained_on": {"train": len(train), "val": len(val)}} if with_data else {}),
        **extra,
    }
    report: dict[str, Any] = {
        "dataset": DATASET,
        "spec": None,
        "tasks": tasks,
        "main": main_cfg.model_type,
        "model_name": served.manifest.name,
        "config": main_cfg.to_dict(),
        "train_config": train_cfg.to_dict(),
        "training_data": info,
        "models": models,
        "from_logs": {
            "log_dir": str(log_dir),
            "schema_version": served.schema.version,
            "served_by": served.served_by,
            "counts": served.counts.as_dict(),
            "split_ts": served.ts,
            "split": list(fractions),
            "ips": ips,
            **extra,
        },
    }
    save_checkpoint(
        out / CHECKPOINT,
        main_model,
        features=served.schema.describe(),
        vocab=served.schema.vocabularies(),
        model_name=served.manifest.name,
        metrics={"test": models[main_cfg.model_type]["test"], "oracle_auc": None},
        training_data={**info, "from_logs": served.counts.as_dict()},
        golden={k: torch.from_numpy(v) for k, v in golden_from(served.schema, test).items()},
    )
    write_report(report, out)
    if current().is_main:  # rank 0 writes, as write_report does
        (out / REPORT_MD).write_text(report_markdown(report))
    return report


def report_markdown(report: dict[str, Any]) -> str:
    """A run's report.md: the metrics table of any run, then the served log's section."""
    return markdown(report) + "\n" + log_markdown(report)
