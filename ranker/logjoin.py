"""The join of feedback to impressions: one rule for the trainer and the experiment report.

An event (request_id, item_id, event, ts) is a label for task `event` of the impression
(request_id, item_id) when `0 <= event.ts - impression.ts <= window_s` (both edges included),
once per impression and task. Every other event is counted, in this order: `unknown_task` (not a
task of the model), `orphan` (no such impression in the log), `early` (before the impression),
`late` (after the window), `duplicate` (the impression already has that label: a transport
retry or a second click). `labels + unknown_task + orphan + early + late + duplicate = events`.

Pure pyarrow and numpy (no torch): `training.from_logs` trains on the labels and
`analysis.report` measures the rates of an experiment's arms with them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ranker.servedlog import STREAM_ID

DEFAULT_WINDOW_S = 3600.0


class LogError(ValueError):
    """A served log that cannot be read, joined or trained on; the message says why."""


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


def read_impressions(files: Sequence[Path], columns: Sequence[str] | None = None) -> pa.Table:
    """All impression files, one table sorted by time (ts, stream id, position); `columns`
    (which must include stream_id, ts and position) reads only those."""
    cols = None if columns is None else list(columns)
    try:
        table = pa.concat_tables([pq.read_table(f, columns=cols) for f in files])
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
