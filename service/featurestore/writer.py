"""The offline writer: encode the user and item tables and materialise them into Redis.

Encoding is `GroupSchema.encode_columns`, the trainer's own code, so there is no skew. A load is
written under its own load id beside the live one, then goes live with one SET of the pointer
key; the previous load's records are then given a short expiry (readers may still be finishing
requests against it). The load id is a hash of the schema version and the encoded content, so
loading the same tables twice rewrites the same keys and flips the pointer to the same value:
idempotent.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import redis
from redis.cluster import RedisCluster

from ranker.schema import FeatureSchema, GroupSchema
from service.featurestore.keys import (
    DEFAULT_PREFIX,
    load_pattern,
    pointer_key,
    record_key_prefix,
)

SyncClient = redis.Redis | RedisCluster
DEFAULT_BATCH = 2000
DEFAULT_OLD_LOAD_GRACE_S = 60


@dataclass
class LoadReport:
    """What a load wrote."""

    schema_version: str
    load_id: str
    previous_load_id: str | None
    users: int = 0
    items: int = 0
    skipped_null_ids: int = 0
    duplicate_ids: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    ttl_s: int | None = None
    old_keys_expiring: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EncodedGroup:
    """One entity table, encoded: ids as strings and the packed records, row for row."""

    entity: str
    ids: list[str]
    records: np.ndarray  # structured array of group.record_dtype()
    skipped_null_ids: int
    duplicate_ids: int


def ids_as_strings(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Id column -> strings, spelled as the request will send them (float 7.0 -> "7")."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_floating(arr.type):
        arr = pc.cast(arr, pa.int64(), safe=False)
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        arr = pc.cast(arr, pa.string())
    return arr


def encode_table(group: GroupSchema, table: pa.Table, written_at: float) -> EncodedGroup:
    """Encode a raw entity table (key column + raw feature columns) into packed records."""
    if group.key is None or group.key not in table.column_names:
        raise ValueError(f"{group.entity} table needs its key column {group.key!r}")
    ids_arr = ids_as_strings(table.column(group.key))
    valid = pc.is_valid(ids_arr)
    n_null = len(ids_arr) - int(pc.sum(valid).as_py() or 0)
    if n_null:
        table, ids_arr = table.filter(valid), ids_arr.filter(valid)
    # Duplicate ids: the last row wins, as it would with repeated SETs; count them.
    ids = ids_arr.to_pylist()
    last = {entity_id: row for row, entity_id in enumerate(ids)}
    n_dup = len(ids) - len(last)
    if n_dup:
        keep = np.fromiter(last.values(), dtype=np.int64, count=len(last))
        keep.sort()
        table = table.take(pa.array(keep))
        ids = [ids[i] for i in keep]
    present = set(table.column_names)
    columns = {name: table.column(name) for name in group.feature_names if name in present}
    cat, dense = group.encode_columns(columns, table.num_rows)
    records = np.empty(table.num_rows, dtype=group.record_dtype())
    records["written_at"] = written_at
    records["cat"] = cat
    records["dense"] = dense
    return EncodedGroup(group.entity, ids, records, n_null, n_dup)


def content_load_id(schema: FeatureSchema, groups: list[EncodedGroup]) -> str:
    """Deterministic load id: same schema and same encoded content -> same id."""
    h = hashlib.sha256(schema.version.encode())
    for g in groups:
        h.update(g.entity.encode())
        h.update("\0".join(g.ids).encode())
        # hash the features, not the write time, so a re-load keeps its id
        h.update(np.ascontiguousarray(g.records["cat"]).tobytes())
        h.update(np.ascontiguousarray(g.records["dense"]).tobytes())
    return h.hexdigest()[:12]


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def write_group(
    client: SyncClient,
    key_prefix: str,
    enc: EncodedGroup,
    *,
    ttl_s: int | None,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Pipelined SETs of one group's records in batches; returns the bytes written."""
    size = enc.records.dtype.itemsize
    blob = enc.records.tobytes()
    for start, stop in _batches(len(enc.ids), batch_size):
        pipe = client.pipeline(transaction=False)
        for row in range(start, stop):
            pipe.set(key_prefix + enc.ids[row], blob[row * size : (row + 1) * size], ex=ttl_s)
        pipe.execute()
        if progress is not None:
            progress(stop - start)
    return len(blob)


def expire_load(client: SyncClient, pattern: str, grace_s: int, batch_size: int) -> int:
    """Give every key matching `pattern` an expiry of `grace_s` (SCAN + pipelined EXPIRE)."""
    count = 0
    batch: list[bytes] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.expire(key, grace_s)
        pipe.execute()
        batch.clear()

    # RedisCluster.scan_iter walks every primary, so this works on both kinds of client.
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        count += 1
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return count


def load_tables(
    client: SyncClient,
    schema: FeatureSchema,
    users_table: pa.Table | None,
    items_table: pa.Table | None,
    *,
    prefix: str = DEFAULT_PREFIX,
    ttl_s: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    load_id: str | None = None,
    old_load_grace_s: int | None = DEFAULT_OLD_LOAD_GRACE_S,
    progress: bool = False,
    now: float | None = None,
) -> LoadReport:
    """Encode and write the tables as a new load, then switch the schema's pointer to it.

    `old_load_grace_s=None` leaves the previous load untouched (e.g. to roll back by hand);
    `now` overrides the records' write time (tests of staleness).
    """
    started = time.perf_counter()
    written_at = time.time() if now is None else now
    encoded: list[EncodedGroup] = []
    for entity, table in (("user", users_table), ("item", items_table)):
        group = schema.group(entity)
        if group is None or table is None:
            continue
        encoded.append(encode_table(group, table, written_at))
    lid = load_id or content_load_id(schema, encoded)
    ptr = pointer_key(prefix, schema.version)
    previous = client.get(ptr)
    previous_id = previous.decode() if isinstance(previous, bytes) else previous
    report = LoadReport(schema.version, lid, previous_id, ttl_s=ttl_s)
    total = sum(len(e.ids) for e in encoded)
    bar = _progress_bar(total, f"load {lid}") if progress else None
    try:
        for enc in encoded:
            key_prefix = record_key_prefix(prefix, schema.version, lid, enc.entity)
            report.bytes_written += write_group(
                client, key_prefix, enc, ttl_s=ttl_s, batch_size=batch_size,
                progress=bar.update if bar is not None else None,
            )  # fmt: skip
            setattr(report, f"{enc.entity}s", len(enc.ids))
            report.skipped_null_ids += enc.skipped_null_ids
            report.duplicate_ids += enc.duplicate_ids
    finally:
        if bar is not None:
            bar.close()
    client.set(ptr, lid)  # the atomic switch: readers see the new load from their next request
    if previous_id is not None and previous_id != lid and old_load_grace_s is not None:
        report.old_keys_expiring = expire_load(
            client, load_pattern(prefix, schema.version, previous_id), old_load_grace_s, batch_size
        )
    report.seconds = time.perf_counter() - started
    report.counts = {"users": report.users, "items": report.items}
    return report


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rec", unit_scale=True)


def make_sync_client(
    url: str, *, cluster: bool | None = None, password: str | None = None, timeout_s: float = 10.0
) -> SyncClient:
    """A blocking client for the offline writer; `cluster=None` asks the server which it is."""
    extra: dict[str, Any] = {} if password is None else {"password": password}
    if cluster is None:
        probe = redis.Redis.from_url(url, socket_timeout=timeout_s, **extra)
        try:
            cluster = probe.info("cluster").get("cluster_enabled") == 1
        finally:
            probe.close()
    if cluster:
        return RedisCluster.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **extra
        )
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **extra
    )
