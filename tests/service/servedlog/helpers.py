"""Served records and feedback events to XADD, and the exporter's output read back."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ranker import servedlog as sl
from service.servedlog.exporter import SyncClient

REPO_ROOT = Path(__file__).resolve().parents[3]
PREFIX = "rk"
TASKS = ("click", "like", "share")
HOUR0 = 1_796_112_000.0  # 2026-12-01T08:00:00Z, an hour boundary


def served(i: int, ts: float, k: int | None = None) -> sl.ServedRecord:
    """Request r<i>: 1-3 items with their (made-up) inputs, user and context once."""
    k = 1 + i % 3 if k is None else k
    rng = np.random.default_rng(i)
    return sl.ServedRecord(
        ts=ts, request_id=f"r{i}", user_id=f"u{i % 5}", model_name="mmoe", model_version=1,
        scoring="weighted_sum", weights={"click": 1.0, "like": 2.0, "share": 4.0},
        context={"hour": 9, "surface": "home"}, tasks=TASKS,
        item_ids=[f"i{i}-{j}" for j in range(k)],
        scores=rng.random((k, 3)).astype(np.float32), final=rng.random(k),
        inputs={"user_cat": np.array([[i % 5 + 1, 1]], np.int64),
                "item_cat": rng.integers(0, 9, (k, 2)).astype(np.int64),
                "item_dense": rng.normal(size=(k, 2)).astype(np.float32),
                "context_cat": np.array([[10, 1]], np.int64)},
    )


def xadd(client: SyncClient, key: str, fields: dict[bytes, bytes]) -> str:
    """XADD, the new entry's id as a string."""
    sid: Any = client.xadd(key, fields)  # type: ignore[arg-type]  # the stub wants str keys
    return sid.decode() if isinstance(sid, bytes) else str(sid)


def xadd_served(client: SyncClient, rec: sl.ServedRecord) -> str:
    return xadd(client, sl.served_stream(PREFIX), sl.encode_served(rec))


def xadd_feedback(client: SyncClient, ev: sl.FeedbackEvent) -> str:
    return xadd(client, sl.feedback_stream(PREFIX), sl.encode_feedback(ev))


def parts(out: Path, kind: str) -> list[Path]:
    """The committed files of one kind ("impressions", "feedback", "deadletter/feedback")."""
    return sorted((out / kind).glob("hour=*/part-*.parquet"))


def read_kind(out: Path, kind: str) -> pa.Table | None:
    files = parts(out, kind)
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def stream_id_counts(out: Path, kind: str) -> Counter[str]:
    """How many times each stream id's entry is in the output (an impression: once per item,
    so per (id, position) for impressions)."""
    t = read_kind(out, kind)
    if t is None:
        return Counter()
    if "position" in t.column_names:
        keys = [f"{s}#{p}" for s, p in zip(t[sl.STREAM_ID].to_pylist(), t["position"].to_pylist(),
                                            strict=True)]
        return Counter(keys)
    return Counter(t[sl.STREAM_ID].to_pylist())


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env
