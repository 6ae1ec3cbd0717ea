"""Train the next model from what was served: exported impressions joined with feedback.

The examples are the impressions (one row per served item) and their inputs are **the inputs
the serving model saw**, read from the log (`served_inputs`): nothing is looked up again in the
feature tables or in Redis, so a feature value written after the response cannot leak into
training and there is no training/serving skew. The feature schema and vocabularies are the
serving model's (from its version directory in the model repository), so the new model takes
the same inputs and the feature store needs no reload.

Labels: an event (request_id, item_id, event, ts) is a label for task `event` of the impression
(request_id, item_id) when `0 <= event.ts - impression.ts <= window_s` (both edges included),
once per impression and task. Every other event is counted, in this order: `unknown_task` (not a
task of the model), `orphan` (no such impression in the log), `early` (before the impression),
`late` (after the window), `duplicate` (the impression already has that label: a transport
retry or a second click). `labels + unknown_task + orphan + early + late + duplicate = events`.

The split is by time: requests ordered by their ts, the first 80 % train, the next 10 %
validation, the last 10 % test, so validation and test are later than training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ranker.manifest import Manifest, ManifestError, load_manifest, load_schema, version_dir
from ranker.schema import FeatureSchema
from ranker.servedlog import (
    FEEDBACK_DIR,
    IMPRESSIONS_DIR,
    STREAM_ID,
    part_files,
    served_inputs,
)
from training.data import Encoded
from training.distributed import current
from training.model import ModelConfig, inputs_from_schema
from training.pipeline import CHECKPOINT, golden_from, train_models
from training.report import REPORT_MD, markdown, write_report
from training.train import TrainConfig, save_checkpoint

log = logging.getLogger(__name__)

DATASET = "served-log"
DEFAULT_WINDOW_S = 3600.0
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
SPLITS = ("train", "val", "test")


class LogError(ValueError):
    """A served log that cannot be trained on; the message says why."""


@dataclass
class JoinCounts:
    """What the join found: every feedback event is a label or exactly one of the other counts."""

    window_s: float
    impressions: int = 0  # rows trained on (one per served item)
    requests: int = 0
    duplicate_impressions: int = 0  # a (request, item) logged twice: the later rows are dropped
    events: int = 0
    labels: dict[str, int] = field(default_factory=dict)  # per task
    unknown_task: int = 0
    orphan: int = 0
    early: int = 0
    late: int = 0
    duplicate: int = 0
    window_open: int = 0  # impressions whose window ends after the log's last record

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def read_impressions(files: Sequence[Path]) -> pa.Table:
    """All impression files, one table sorted by time (ts, stream id, position)."""
    try:
        table = pa.concat_tables([pq.read_table(f) for f in files])
    except pa.ArrowInvalid as e:
        raise LogError(f"impression files of one schema have different columns: {e}") from e
    if not table.num_rows:
        raise LogError("the impression files hold no rows")
    ms, seq = _stream_ids(table)
    order = np.lexsort((table["position"].to_numpy(), seq, ms, table["ts"].to_numpy()))
    return table.take(pa.array(order))


def _stream_ids(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The rows' stream ids as (milliseconds, sequence) int64 columns (`parse_stream_id`,
    vectorised)."""
    parts = pc.split_pattern(table[STREAM_ID], "-")

    def column(i: int) -> np.ndarray:
        return np.asarray(pc.cast(pc.list_element(parts, i), pa.int64()).to_numpy(), np.int64)

    return column(0), column(1)


def read_feedback(files: Sequence[Path]) -> pa.Table:
    """All feedback files, sorted by (ts, stream id); empty with the columns when none."""
    if not files:
        return pa.table({c: pa.array([], pa.float64() if c == "ts" else pa.string())
                         for c in (STREAM_ID, "ts", "request_id", "item_id", "event")})
    table = pa.concat_tables([pq.read_table(f) for f in files])
    ms, seq = _stream_ids(table)
    order = np.lexsort((seq, ms, table["ts"].to_numpy()))
    return table.take(pa.array(order, pa.int64()))


def join_labels(
    impressions: pa.Table, feedback: pa.Table, tasks: Sequence[str], window_s: float
) -> tuple[np.ndarray, np.ndarray, JoinCounts]:
    """Labels of each impression row (N, T) float32, the rows kept (N,) bool, and the counts.

    `feedback` must be sorted by time: of repeated events the earliest is the label.
    """
    if not window_s >= 0 or math.isinf(window_s):
        raise LogError(f"attribution window {window_s} s must be finite and >= 0")
    counts = JoinCounts(window_s=window_s, labels=dict.fromkeys(tasks, 0))
    n = impressions.num_rows
    imp_ts = impressions["ts"].to_numpy()
    keep = np.ones(n, dtype=bool)
    row_of: dict[tuple[str, str], int] = {}
    for i, key in enumerate(zip(impressions["request_id"].to_pylist(),
                                impressions["item_id"].to_pylist(), strict=True)):
        if key in row_of:
            keep[i] = False
            counts.duplicate_impressions += 1
        else:
            row_of[key] = i
    task_index = {t: j for j, t in enumerate(tasks)}
    labels = np.zeros((n, len(tasks)), dtype=np.float32)
    for req, item, event, ts in zip(feedback["request_id"].to_pylist(),
                                    feedback["item_id"].to_pylist(),
                                    feedback["event"].to_pylist(),
                                    feedback["ts"].to_pylist(), strict=True):
        counts.events += 1
        j = task_index.get(event)
        row = row_of.get((req, item))
        if j is None:
            counts.unknown_task += 1
        elif row is None:
            counts.orphan += 1
        elif ts < imp_ts[row]:
            counts.early += 1
        elif ts - imp_ts[row] > window_s:
            counts.late += 1
        elif labels[row, j]:
            counts.duplicate += 1
        else:
            labels[row, j] = 1.0
            counts.labels[event] += 1
    ends = [float(imp_ts.max())] if n else []
    if feedback.num_rows:
        ends.append(float(pc.max(feedback["ts"]).as_py()))
    log_end = max(ends, default=0.0)
    counts.impressions = int(keep.sum())
    counts.requests = len(set(impressions["request_id"].filter(pa.array(keep)).to_pylist()))
    counts.window_open = int(np.sum(keep & (imp_ts + window_s > log_end)))
    return labels, keep, counts


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
    idx = split_by_time(impressions["request_id"].to_pylist(), fractions)
    ts = impressions["ts"].to_numpy()
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
    )


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
) -> dict[str, Any]:
    """Train on a served log, evaluate per task on its latest requests, write a run directory
    (`ranker export --run` exports it as the next version of the serving model's name)."""
    torch.set_num_threads(threads)  # as run_training: small matmuls on a shared 2-core box
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    served = load_served_log(log_dir, repo, window_s=window_s, fractions=fractions)
    tasks = list(served.manifest.tasks)
    unknown = set(train_cfg.loss_weights) - set(tasks)
    if unknown:
        raise LogError(f"loss weights for {sorted(unknown)}: the model's tasks are {tasks}")
    train, val, test = (served.splits[s] for s in SPLITS)
    main_cfg = ModelConfig(inputs=inputs_from_schema(served.schema), tasks=tasks, **model_kw)
    models, main_model = train_models(main_cfg, train, val, test, train_cfg, baselines=baselines)
    info: dict[str, Any] = {
        "dataset": DATASET,
        "sha256": served.sha256,
        "rows": {s: len(served.splits[s]) for s in SPLITS},
        "window_s": window_s,
        "served_by": served.served_by,
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
