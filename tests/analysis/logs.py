"""Hand-built served logs with known answers, written in the exporter's Parquet layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ranker.servedlog import (
    FEEDBACK_DIR,
    IMPRESSIONS_DIR,
    FeedbackEvent,
    ServedRecord,
    feedback_table,
    hour_partition,
    impressions_table,
    part_name,
)

TASKS = ("click", "like", "share")
T0 = 1_764_576_000.0  # 2025-12-01T08:00Z
K = 5  # items per request


@dataclass(frozen=True)
class Users:
    """A population in one arm: per-user requests and per-user click propensity."""

    arm: str
    n: int
    click: float | Sequence[float]  # one rate for all, or one per user
    requests: int | Sequence[int] = 4
    prefix: str = ""


def write_log(d: Path, populations: Sequence[Users], *, seed: int = 0,
              experiment: str | None = "exp", like_given_click: float = 0.3,
              share_given_click: float = 0.1) -> dict[str, float]:
    """Impressions of every user's requests (K items each) and their feedback; each item is
    clicked with the user's propensity, liked/shared given a click. Returns the realised click
    rate per arm (what the report must find)."""
    rng = np.random.default_rng(seed)
    records: list[tuple[str, ServedRecord]] = []
    events: list[tuple[str, FeedbackEvent]] = []
    clicks: dict[str, list[int]] = {}
    i = 0
    for pop in populations:
        p_user = np.broadcast_to(np.asarray(pop.click, dtype=float), (pop.n,))
        m_user = np.broadcast_to(np.asarray(pop.requests, dtype=int), (pop.n,))
        c = clicks.setdefault(pop.arm, [0, 0])
        for u in range(pop.n):
            user = f"{pop.prefix or pop.arm}-u{u}"
            for _ in range(int(m_user[u])):
                ts = T0 + i * 0.01
                rid = f"r{i}"
                items = [f"i{j}" for j in range(K)]
                rec = ServedRecord(
                    ts=ts, request_id=rid, user_id=user, model_name="mmoe", model_version=1,
                    scoring="weighted_sum", weights=dict.fromkeys(TASKS, 1.0), context={},
                    tasks=TASKS, item_ids=items, scores=np.full((K, 3), 0.1, np.float32),
                    final=np.linspace(1, 0, K), experiment=experiment, arm=pop.arm)
                records.append((f"{int(ts * 1000)}-{i % 1000}", rec))
                clicked = rng.random(K) < p_user[u]
                c[0] += int(clicked.sum())
                c[1] += K
                for j in np.flatnonzero(clicked):
                    fb = [("click", 1.0)]
                    if rng.random() < like_given_click:
                        fb.append(("like", 2.0))
                    if rng.random() < share_given_click:
                        fb.append(("share", 3.0))
                    for ev, dt in fb:
                        e = FeedbackEvent(rid, items[j], ev, ts + dt)
                        events.append((f"{int((ts + dt) * 1000)}-{len(events) % 1000}", e))
                i += 1
    write_records(d, records, events)
    return {arm: k / n for arm, (k, n) in clicks.items()}


def write_records(d: Path, records: Sequence[tuple[str, ServedRecord]],
                  events: Sequence[tuple[str, FeedbackEvent]]) -> None:
    """(stream id, record) pairs as one impressions file, the events as one feedback file."""
    _write(d / IMPRESSIONS_DIR, impressions_table(records), records[0][0], records[-1][0], T0)
    if events:
        _write(d / FEEDBACK_DIR, feedback_table(events), events[0][0], events[-1][0], T0)


def _write(kind_dir: Path, table: pa.Table, first: str, last: str, ts: float) -> None:
    part = kind_dir / hour_partition(ts)
    part.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, part / part_name(first, last))


def experiments_file(d: Path, shares: Mapping[str, float], name: str = "exp") -> Path:
    """An experiments file declaring `shares` for experiment `name`."""
    lines = [f'[[experiment]]\nname = "{name}"\nsalt = "s"']
    lines += [f'[[experiment.arm]]\nname = "{a}"\nshare = {s!r}' for a, s in shares.items()]
    p = d / "experiments.toml"
    p.write_text("\n".join(lines) + "\n")
    return p
