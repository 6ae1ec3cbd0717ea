"""Drain the served and feedback streams into Parquet partitioned by hour, exactly once.

Layout under the output directory (one file per stream batch, partition and record schema)::

    impressions/hour=YYYY-MM-DDTHH/part-<first id>-<last id>.parquet   impressions_table rows
    feedback/hour=YYYY-MM-DDTHH/part-<first id>-<last id>.parquet      feedback_table rows
    deadletter/<impressions|feedback>/hour=.../part-....parquet        entries that do not decode

The hour is the record's own `ts` in UTC (a dead letter has none: its stream id's time).

**Delivery is at-least-once**: each stream is read through a consumer group (XREADGROUP), this
consumer's pending entries first after a restart, and a batch is XACKed only after all its files
are renamed into place (temp file, fsync, `os.replace`). **The output is exactly-once**: an entry
belongs to exactly one partition, decided by its content, and a committed file's name gives the
id range it holds. On start-up the exporter lists the committed files; an entry that comes back
(written, then the process died before the XACK) falls inside the range of a file of its own
partition, whose `stream_id` column confirms it, and is skipped. A batch whose entries fall into
two hours writes two files: after a crash between the two renames the first file's entries are
skipped and the second's are written, so nothing is lost and nothing is there twice.

Entries that fail to decode are not dropped: they are written, fields and error, as Parquet under
`deadletter/` (exactly once, like the rest) and counted; the exporter never stops on one. Pending
entries that the stream's length cap trimmed before they were exported come back empty; they are
counted (`trimmed`) and acknowledged.

A stream is one Redis key, and every command here names one stream, so the same code runs on a
Redis Cluster (the two streams may live on different nodes).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import redis
from redis.cluster import RedisCluster

from ranker.servedlog import (
    FEEDBACK_DIR,
    IMPRESSIONS_DIR,
    STREAM_ID,
    LogFormatError,
    StreamId,
    decode_feedback,
    decode_served,
    feedback_stream,
    feedback_table,
    hour_partition,
    impressions_table,
    parse_stream_id,
    part_name,
    part_range,
    schema_key,
    served_stream,
)
from service.featurestore.writer import make_sync_client

log = logging.getLogger(__name__)

SyncClient = redis.Redis | RedisCluster
IMPRESSIONS, FEEDBACK, DEADLETTER = IMPRESSIONS_DIR, FEEDBACK_DIR, "deadletter"
DEFAULT_GROUP = "exporter"
DEFAULT_CONSUMER = "exporter-1"
DEFAULT_BATCH = 1000
DEFAULT_BLOCK_MS = 1000


@dataclass
class _File:
    """A committed file: its id range from the name, its ids read only when needed."""

    first: StreamId
    last: StreamId
    path: Path
    ids: frozenset[str] | None = None

    def holds(self, sid: str) -> bool:
        if self.ids is None:
            col = pq.read_table(self.path, columns=[STREAM_ID])[STREAM_ID]
            self.ids = frozenset(col.to_pylist())
        return sid in self.ids


@dataclass
class Committed:
    """The files already written for one stream: per partition, their id ranges."""

    parts: dict[str, list[_File]] = field(default_factory=lambda: defaultdict(list))
    high: dict[str, StreamId] = field(default_factory=dict)  # per partition, the highest last id

    @classmethod
    def scan(cls, out: Path, kinds: Sequence[str], consumer: str) -> Committed:
        """List the committed files under `out/<kind>/hour=*/`; remove this consumer's temp
        files (a crash before their rename: their entries are still pending)."""
        c = cls()
        for kind in kinds:
            for hour in sorted((out / kind).glob("hour=*")):
                for f in hour.iterdir():
                    if f.name.startswith(_tmp_prefix(consumer)):
                        f.unlink()
                        continue
                    rng = part_range(f.name)
                    if rng is not None:
                        c.add(f"{kind}/{hour.name}", _File(*rng, f))
        return c

    def add(self, partition: str, f: _File) -> None:
        self.parts[partition].append(f)
        self.high[partition] = max(self.high.get(partition, (-1, -1)), f.last)

    def written(self, partition: str, sid: str) -> bool:
        """Whether entry `sid` of `partition` is already in a committed file."""
        key = parse_stream_id(sid)
        if key > self.high.get(partition, (-1, -1)):  # the common case: a new entry
            return False
        return any(f.first <= key <= f.last and f.holds(sid) for f in self.parts[partition])


@dataclass
class StreamStats:
    """What one stream's consumer did."""

    entries: int = 0  # entries read, redeliveries included
    rows: int = 0  # Parquet rows written (an impression entry is one row per served item)
    files: int = 0
    already_written: int = 0  # redelivered entries found in a committed file, skipped
    dead_letter: int = 0  # entries that did not decode, written under deadletter/
    trimmed: int = 0  # pending entries the stream's length cap removed before export
    empty: int = 0  # served records with no items: nothing to write

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class DeadLetter:
    """An entry that is not a record of the format: its raw fields and why."""

    error: str
    fields: dict[bytes, bytes]


def dead_letter_table(entries: Sequence[tuple[str, DeadLetter]]) -> pa.Table:
    return pa.table({
        STREAM_ID: pa.array([sid for sid, _ in entries], pa.string()),
        "error": pa.array([d.error for _, d in entries], pa.string()),
        "fields": pa.array([list(d.fields.items()) for _, d in entries],
                           pa.map_(pa.binary(), pa.binary())),
    })


def _tmp_prefix(consumer: str) -> str:
    return f".tmp-{consumer}-"


def _publish(tmp: Path, final: Path) -> None:
    """The commit point of a file (a test kills the process right after it)."""
    os.replace(tmp, final)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Codec:
    """How one stream's entries become rows: decode, time, table of one group."""

    kind: str
    decode: Callable[[dict[bytes, bytes]], Any]
    ts: Callable[[Any], float]
    group: Callable[[Any], Any]  # records with equal keys share a file
    table: Callable[[list[tuple[str, Any]]], pa.Table]


SERVED_CODEC = _Codec(IMPRESSIONS, decode_served, lambda r: r.ts, schema_key, impressions_table)
FEEDBACK_CODEC = _Codec(FEEDBACK, decode_feedback, lambda e: e.ts, lambda e: None, feedback_table)


class StreamConsumer:
    """One stream read through the group: pending entries first, then new ones."""

    def __init__(self, client: SyncClient, key: str, codec: _Codec, out: Path, group: str,
                 consumer: str) -> None:
        self.client, self.key, self.codec, self.out = client, key, codec, out
        self.group, self.consumer = group, consumer
        self.stats = StreamStats()
        self.pending = True  # our own unacknowledged entries come first, after a restart
        self.committed = Committed.scan(out, [codec.kind, f"{DEADLETTER}/{codec.kind}"],
                                        consumer)

    def ensure_group(self) -> None:
        """Create the group at the stream's start (and the stream if absent); keep an old one."""
        try:
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read(self, count: int, block_ms: int | None) -> list[tuple[str, dict[bytes, bytes]]]:
        """Up to `count` entries: this consumer's pending ones until none are left, then new."""
        while True:
            start = "0" if self.pending else ">"
            resp: Any = self.client.xreadgroup(  # [[key, [(id, fields), ...]]], or [] if none
                self.group, self.consumer, {self.key: start}, count=count,
                block=None if self.pending else block_ms)
            entries = resp[0][1] if resp else []
            if entries or not self.pending:
                return [(sid.decode(), fields) for sid, fields in entries]
            self.pending = False

    def step(self, count: int, block_ms: int | None = None) -> int:
        """Read one batch, write it, acknowledge it; the number of entries read."""
        entries = self.read(count, block_ms)
        if entries:
            self.write(entries)
            self.client.xack(self.key, self.group, *[sid for sid, _ in entries])
        return len(entries)

    def write(self, entries: Sequence[tuple[str, dict[bytes, bytes]]]) -> None:
        """Commit the batch's entries not yet written, one file per partition and schema."""
        codec, stats = self.codec, self.stats
        stats.entries += len(entries)
        groups: dict[tuple[str, Any], list[tuple[str, Any]]] = defaultdict(list)
        for sid, fields in entries:
            if not fields:
                stats.trimmed += 1
                continue
            try:
                rec = codec.decode(fields)
                part = f"{codec.kind}/{hour_partition(codec.ts(rec))}"
                gkey = (False, codec.group(rec))
            except LogFormatError as e:
                rec = DeadLetter(str(e), dict(fields))
                hour = hour_partition(parse_stream_id(sid)[0] / 1000)
                part, gkey = f"{DEADLETTER}/{codec.kind}/{hour}", (True, None)
            if self.committed.written(part, sid):
                stats.already_written += 1
                continue
            groups[(part, gkey)].append((sid, rec))
        for (part, (dead, _)), items in groups.items():
            if dead:
                stats.dead_letter += len(items)
                log.warning("%s: %d entries do not decode (first %s: %s); see %s", self.key,
                            len(items), items[0][0], items[0][1].error, part)
            table = dead_letter_table(items) if dead else codec.table(items)
            if table.num_rows == 0:
                stats.empty += len(items)
                continue
            self.commit(part, items[0][0], items[-1][0], table)
            stats.rows += table.num_rows
            stats.files += 1

    def commit(self, part: str, first: str, last: str, table: pa.Table) -> None:
        """Write the file aside, make it durable, rename it into place, remember it."""
        d = self.out / part
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{_tmp_prefix(self.consumer)}{first}-{last}.parquet"
        pq.write_table(table, tmp)
        _fsync(tmp)
        final = d / part_name(first, last)
        _publish(tmp, final)
        _fsync(d)
        ids = frozenset(table[STREAM_ID].to_pylist())
        self.committed.add(part, _File(parse_stream_id(first), parse_stream_id(last), final, ids))


@dataclass
class ExportReport:
    impressions: StreamStats
    feedback: StreamStats
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {IMPRESSIONS: self.impressions.as_dict(), FEEDBACK: self.feedback.as_dict(),
                "seconds": round(self.seconds, 3)}


class Exporter:
    """The served and feedback streams of one key prefix into one output directory."""

    def __init__(
        self,
        client: SyncClient,
        out: Path,
        *,
        prefix: str,
        group: str = DEFAULT_GROUP,
        consumer: str = DEFAULT_CONSUMER,
        batch: int = DEFAULT_BATCH,
        block_ms: int = DEFAULT_BLOCK_MS,
    ) -> None:
        if batch < 1 or block_ms < 1:
            raise ValueError(f"batch {batch} and block_ms {block_ms} must be >= 1")
        out = Path(out)
        self.served = StreamConsumer(client, served_stream(prefix), SERVED_CODEC, out, group,
                                     consumer)
        self.feedback = StreamConsumer(client, feedback_stream(prefix), FEEDBACK_CODEC, out,
                                       group, consumer)
        self.batch, self.block_ms = batch, block_ms

    def run(
        self,
        *,
        until_empty: bool = False,
        max_seconds: float | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> ExportReport:
        """Export until both streams are drained (`until_empty`), `max_seconds` pass or `stop()`.

        Without `until_empty`, an idle exporter blocks on one stream at a time for `block_ms`
        (on a cluster the two streams cannot share one XREADGROUP), so a quiet stream's entries
        wait at most that long.
        """
        t0 = time.monotonic()
        streams = (self.served, self.feedback)
        for s in streams:
            s.ensure_group()
        turn = 0
        while not stop():
            left = None if max_seconds is None else max_seconds - (time.monotonic() - t0)
            if left is not None and left <= 0:
                break
            moved = sum(s.step(self.batch) for s in streams)
            if moved:
                continue
            if until_empty:
                break
            block = self.block_ms if left is None else max(1, min(self.block_ms, int(left * 1e3)))
            streams[turn % 2].step(self.batch, block_ms=block)
            turn += 1
        return ExportReport(self.served.stats, self.feedback.stats, time.monotonic() - t0)


def make_exporter_client(
    url: str, *, cluster: bool | None = None, password: str | None = None, block_ms: int
) -> SyncClient:
    """The offline writer's blocking client (detects a cluster), its socket timeout above the
    blocking read's."""
    return make_sync_client(url, cluster=cluster, password=password,
                            timeout_s=max(10.0, block_ms / 1e3 + 5.0))
