"""The served log and the feedback events: one format for the service that writes them, the
exporter that drains them to Parquet and the trainer that learns from them.

What was served is written down with **the model inputs exactly as the model saw them** (the
encoded arrays after feature fetch, defaults and context encoding), so a model trained from the
log sees what the serving model saw: no training/serving skew, and no feature value written after
the response can leak into training.

Transport: two Redis streams per feature-store prefix (capped by the writer)::

    {prefix}:log:served     one entry per logged /rank response      (encode_served)
    {prefix}:log:feedback   one entry per feedback event              (encode_feedback)

Exported Parquet (the exporter writes one file per stream batch, hour and record schema)::

    DIR/impressions/hour=YYYY-MM-DDTHH/part-<first stream id>-<last stream id>.parquet
    DIR/feedback/hour=YYYY-MM-DDTHH/part-<first stream id>-<last stream id>.parquet

- impressions: one row per served item: `IMPRESSION_COLUMNS`, then `score_<task>` per task,
  then `in_<input name>` per model input, a fixed-size list of the input's row for that item
  (user and context inputs are served once per request and repeated on each of its rows);
- feedback: one row per event: `FEEDBACK_COLUMNS`.

The hour is the record's `ts` in UTC (`hour_partition`); docs/closing-the-loop.md has the rest.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

FORMAT = 1
STREAM_ID = "stream_id"
IMPRESSION_COLUMNS = (
    STREAM_ID, "ts", "request_id", "user_id", "item_id", "position", "model_name",
    "model_version", "scoring", "weights", "context", "score", "experiment", "arm",
    "forced", "shadow_score", "propensity",
)
FEEDBACK_COLUMNS = (STREAM_ID, "ts", "request_id", "item_id", "event")
INPUT_PREFIX = "in_"
SCORE_PREFIX = "score_"
MAX_TS = 2.0**33  # unix seconds, the year 2242: a larger ts is a corrupt record
IMPRESSIONS_DIR, FEEDBACK_DIR = "impressions", "feedback"
PART_FILES = "hour=*/part-*.parquet"  # a kind's committed files, as a glob under its directory
_PART = re.compile(r"^part-(\d+)-(\d+)-(\d+)-(\d+)\.parquet$")
StreamId = tuple[int, int]


class LogFormatError(ValueError):
    """A stream entry that is not a record of this format; the message says what is wrong."""


def served_stream(prefix: str) -> str:
    """The stream of served responses under a feature-store key prefix."""
    return f"{prefix}:log:served"


def feedback_stream(prefix: str) -> str:
    """The stream of feedback events under a feature-store key prefix."""
    return f"{prefix}:log:feedback"


def parse_stream_id(sid: str) -> StreamId:
    """A stream id "1700000000000-3" as (milliseconds, sequence), which sorts as Redis does."""
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq)


def hour_partition(ts: float) -> str:
    """The partition directory of a unix time: "hour=2026-12-01T09" (UTC)."""
    return "hour=" + time.strftime("%Y-%m-%dT%H", time.gmtime(ts))


def part_name(first: str, last: str) -> str:
    """The file of one batch's entries first..last (stream ids) in one partition."""
    return f"part-{first}-{last}.parquet"


def part_range(name: str) -> tuple[StreamId, StreamId] | None:
    """The stream id range a file name gives, or None for a name that is not a part file."""
    m = _PART.match(name)
    if m is None:
        return None
    a, b, x, y = map(int, m.groups())
    return (a, b), (x, y)


def part_files(kind_dir: Path) -> list[Path]:
    """The committed files under `DIR/impressions` or `DIR/feedback`, in partition order."""
    return sorted(Path(kind_dir).glob(PART_FILES))


@dataclass(frozen=True)
class ServedRecord:
    """One logged /rank response: who, which model, how it combined, what it returned."""

    ts: float  # unix seconds when the response was built
    request_id: str
    user_id: str
    model_name: str
    model_version: int
    scoring: str
    weights: Mapping[str, float]
    context: Mapping[str, Any]
    tasks: tuple[str, ...]
    item_ids: Sequence[str]  # returned items, served order: position p is item_ids[p]
    scores: np.ndarray  # (K, T) per-task scores of the returned items, in served order
    final: np.ndarray  # (K,) final scores
    # model inputs as served: per-item inputs (K, width) in served order; user/context (1, width)
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    experiment: str | None = None
    arm: str | None = None
    forced: bool = False  # the arm was forced by the QA header: not a randomised user
    shadow: np.ndarray | None = None  # (K,) the shadow model's final scores, served order
    # (K,) P(each item is in the top K) under an exploring policy; None: deterministic (all 1)
    propensity: np.ndarray | None = None


@dataclass(frozen=True)
class FeedbackEvent:
    """What a user did with a served item: one of the serving model's tasks."""

    request_id: str
    item_id: str
    event: str
    ts: float


def encode_served(rec: ServedRecord) -> dict[bytes, bytes]:
    """Stream fields of a served record: the metadata as JSON, each input's raw bytes apart."""
    specs = {}
    fields: dict[bytes, bytes] = {}
    for name, arr in rec.inputs.items():
        a = np.ascontiguousarray(arr)
        specs[name] = [a.dtype.str, list(a.shape)]
        fields[f"{INPUT_PREFIX}{name}".encode()] = a.tobytes()
    meta = {
        "v": FORMAT, "ts": rec.ts, "request_id": rec.request_id, "user_id": rec.user_id,
        "model": [rec.model_name, rec.model_version], "scoring": rec.scoring,
        "weights": dict(rec.weights), "context": dict(rec.context), "tasks": list(rec.tasks),
        "items": list(rec.item_ids), "experiment": rec.experiment, "arm": rec.arm,
        "inputs": specs,
    }
    if rec.forced:  # absent when false: records of before the field decode the same
        meta["forced"] = True
    if rec.shadow is not None:
        fields[b"shadow"] = np.ascontiguousarray(rec.shadow, dtype="<f8").tobytes()
    if rec.propensity is not None:
        fields[b"propensity"] = np.ascontiguousarray(rec.propensity, dtype="<f8").tobytes()
    fields[b"meta"] = orjson.dumps(meta)
    fields[b"scores"] = np.ascontiguousarray(rec.scores, dtype="<f4").tobytes()
    fields[b"final"] = np.ascontiguousarray(rec.final, dtype="<f8").tobytes()
    return fields


def _field(fields: Mapping[bytes, bytes], name: bytes) -> bytes:
    try:
        return fields[name]
    except KeyError:
        raise LogFormatError(f"entry has no field {name.decode()!r}") from None


def _meta(fields: Mapping[bytes, bytes], what: str) -> dict[str, Any]:
    """The JSON metadata of an entry, checked to be of this format."""
    try:
        meta = orjson.loads(_field(fields, b"meta"))
    except orjson.JSONDecodeError as e:
        raise LogFormatError(f"{what} meta is not JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("v") != FORMAT:
        version = meta.get("v") if isinstance(meta, dict) else None
        raise LogFormatError(f"{what} format {version!r}, expected {FORMAT}")
    return meta


def decode_served(fields: Mapping[bytes, bytes]) -> ServedRecord:
    """The record `encode_served` wrote; LogFormatError for anything else, whatever the bytes."""
    try:
        return _decode_served(fields)
    except LogFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # JSON of another shape
        raise LogFormatError(f"served record: {type(e).__name__}: {e}") from None


def _decode_served(fields: Mapping[bytes, bytes]) -> ServedRecord:
    meta = _meta(fields, "served record")
    items = list(meta["items"])
    tasks = tuple(meta["tasks"])
    _check_types(meta, items, tasks)
    k, t = len(items), len(tasks)
    scores = np.frombuffer(_field(fields, b"scores"), dtype="<f4")
    final = np.frombuffer(_field(fields, b"final"), dtype="<f8")
    if scores.size != k * t or final.size != k:
        raise LogFormatError(f"served record of {k} items has {scores.size} scores, "
                             f"{final.size} final scores")
    inputs = {}
    for name, (dtype, shape) in meta["inputs"].items():
        if np.dtype(dtype).kind not in "biuf":
            raise LogFormatError(f"input {name}: dtype {dtype!r} is not numeric")
        arr = np.frombuffer(_field(fields, f"{INPUT_PREFIX}{name}".encode()), dtype=dtype)
        if arr.size != int(np.prod(shape)):
            raise LogFormatError(f"input {name}: {arr.size} values for shape {shape}")
        if len(shape) != 2 or shape[0] not in (1, k):
            raise LogFormatError(f"input {name}: shape {shape}, expected ({k} or 1, width)")
        inputs[name] = arr.reshape(shape)
    name, version = meta["model"]
    return ServedRecord(
        ts=_unix_time(meta["ts"]), request_id=meta["request_id"], user_id=meta["user_id"],
        model_name=name, model_version=int(version), scoring=meta["scoring"],
        weights=meta["weights"], context=meta["context"], tasks=tasks, item_ids=items,
        scores=scores.reshape(k, t), final=final, inputs=inputs,
        experiment=meta.get("experiment"), arm=meta.get("arm"),
        forced=bool(meta.get("forced", False)), shadow=_per_item(fields, b"shadow", k),
        propensity=_propensity(fields, k),
    )


def _per_item(fields: Mapping[bytes, bytes], name: bytes, k: int) -> np.ndarray | None:
    """An optional float64 field of one value per served item."""
    raw = fields.get(name)
    if raw is None:
        return None
    arr = np.frombuffer(raw, dtype="<f8")
    if arr.size != k:
        raise LogFormatError(f"served record of {k} items has {arr.size} {name.decode()} values")
    return arr


def _propensity(fields: Mapping[bytes, bytes], k: int) -> np.ndarray | None:
    arr = _per_item(fields, b"propensity", k)
    if arr is not None and not bool(np.all((arr > 0) & (arr <= 1))):  # also false for NaN
        raise LogFormatError("served record: a propensity outside (0, 1]")
    return arr


def _check_types(meta: dict[str, Any], items: list[Any], tasks: tuple[Any, ...]) -> None:
    """The JSON values a table column is built from have the types of their columns."""
    strings = [meta["request_id"], meta["user_id"], meta["scoring"], meta["model"][0],
               *items, *tasks]
    if not all(isinstance(v, str) for v in strings):
        raise LogFormatError("served record: ids, scoring, model name and tasks must be strings")
    if not isinstance(meta["weights"], dict) or not isinstance(meta["context"], dict):
        raise LogFormatError("served record: weights and context must be objects")
    for key in ("experiment", "arm"):
        if not isinstance(meta.get(key), str | None):
            raise LogFormatError(f"served record: {key} must be a string or null")


def encode_feedback(ev: FeedbackEvent) -> dict[bytes, bytes]:
    """Stream fields of one feedback event."""
    return {b"meta": orjson.dumps({"v": FORMAT, "request_id": ev.request_id,
                                    "item_id": ev.item_id, "event": ev.event, "ts": ev.ts})}


def decode_feedback(fields: Mapping[bytes, bytes]) -> FeedbackEvent:
    """The event `encode_feedback` wrote; LogFormatError for anything else, whatever the bytes."""
    try:
        return _decode_feedback(fields)
    except LogFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LogFormatError(f"feedback event: {type(e).__name__}: {e}") from None


def _decode_feedback(fields: Mapping[bytes, bytes]) -> FeedbackEvent:
    meta = _meta(fields, "feedback")
    return FeedbackEvent(str(meta["request_id"]), str(meta["item_id"]), str(meta["event"]),
                         _unix_time(meta["ts"]))


def _unix_time(value: Any) -> float:
    """A record's time: finite unix seconds between 1970 and MAX_TS (it names an hour partition)."""
    ts = float(value)
    if not 0.0 <= ts < MAX_TS:  # also false for NaN
        raise LogFormatError(f"ts {value!r} is not a unix time in [0, {MAX_TS:.0f})")
    return ts


def schema_key(rec: ServedRecord) -> tuple[Any, ...]:
    """What must be equal for records to share an impressions table: tasks, inputs and widths."""
    return (rec.tasks, tuple((n, a.dtype.str, a.shape[1]) for n, a in rec.inputs.items()))


def impressions_table(records: Sequence[tuple[str, ServedRecord]]) -> pa.Table:
    """One row per served item of (stream id, record) pairs; all records of one model schema."""
    if not records:
        return pa.table({c: [] for c in IMPRESSION_COLUMNS})
    tasks = records[0][1].tasks
    names = list(records[0][1].inputs)
    key = schema_key(records[0][1])
    cols: dict[str, list[Any]] = {c: [] for c in IMPRESSION_COLUMNS}
    per_task: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    per_input: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for sid, rec in records:
        if schema_key(rec) != key:
            raise LogFormatError(f"{sid}: tasks/inputs {schema_key(rec)} differ "
                                 f"from the batch's {key}")
        k = len(rec.item_ids)
        cols[STREAM_ID] += [sid] * k
        cols["ts"] += [rec.ts] * k
        cols["request_id"] += [rec.request_id] * k
        cols["user_id"] += [rec.user_id] * k
        cols["item_id"] += list(rec.item_ids)
        cols["position"] += list(range(k))
        cols["model_name"] += [rec.model_name] * k
        cols["model_version"] += [rec.model_version] * k
        cols["scoring"] += [rec.scoring] * k
        cols["weights"] += [orjson.dumps(dict(rec.weights)).decode()] * k
        cols["context"] += [orjson.dumps(dict(rec.context)).decode()] * k
        cols["score"] += rec.final.tolist()
        cols["experiment"] += [rec.experiment] * k
        cols["arm"] += [rec.arm] * k
        cols["forced"] += [rec.forced] * k
        cols["shadow_score"] += [None] * k if rec.shadow is None else rec.shadow.tolist()
        cols["propensity"] += [1.0] * k if rec.propensity is None else rec.propensity.tolist()
        for j, t in enumerate(tasks):
            per_task[t].append(rec.scores[:, j])
        for n in names:
            arr = rec.inputs[n]
            per_input[n].append(np.broadcast_to(arr, (k, arr.shape[1])) if arr.shape[0] == 1
                                else arr)
    table = pa.table({
        **{c: pa.array(v) for c, v in cols.items()},
        "ts": pa.array(cols["ts"], pa.float64()),
        "model_version": pa.array(cols["model_version"], pa.int32()),
        "position": pa.array(cols["position"], pa.int32()),
        "experiment": pa.array(cols["experiment"], pa.string()),
        "arm": pa.array(cols["arm"], pa.string()),
        "forced": pa.array(cols["forced"], pa.bool_()),
        "shadow_score": pa.array(cols["shadow_score"], pa.float64()),
        "propensity": pa.array(cols["propensity"], pa.float64()),
    })
    for t in tasks:
        table = table.append_column(f"{SCORE_PREFIX}{t}",
                                    pa.array(np.concatenate(per_task[t]), pa.float32()))
    for n in names:
        arr = np.ascontiguousarray(np.concatenate(per_input[n]))
        flat = pa.array(arr.reshape(-1))
        table = table.append_column(f"{INPUT_PREFIX}{n}",
                                    pa.FixedSizeListArray.from_arrays(flat, arr.shape[1]))
    return table


def served_inputs(table: pa.Table) -> dict[str, np.ndarray]:
    """The model inputs of every impression row of an impressions table: name -> (rows, width)."""
    out = {}
    for col in table.column_names:
        if col.startswith(INPUT_PREFIX):
            chunked = table[col].combine_chunks()
            width = chunked.type.list_size
            values = chunked.flatten().to_numpy(zero_copy_only=False)
            out[col.removeprefix(INPUT_PREFIX)] = values.reshape(-1, width)
    return out


def feedback_table(events: Sequence[tuple[str, FeedbackEvent]]) -> pa.Table:
    """One row per (stream id, event) pair."""
    return pa.table({
        STREAM_ID: pa.array([sid for sid, _ in events], pa.string()),
        "ts": pa.array([e.ts for _, e in events], pa.float64()),
        "request_id": pa.array([e.request_id for _, e in events], pa.string()),
        "item_id": pa.array([e.item_id for _, e in events], pa.string()),
        "event": pa.array([e.event for _, e in events], pa.string()),
    })
