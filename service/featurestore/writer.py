"""The offline writer: encode the user and item tables and materialise them into Redis.

Encoding is `GroupSchema.encode_columns`, the trainer's own code, so there is no skew. A load is
written under its own load id beside the live one, then goes live with one SET of the pointer
key; the previous load's records are then given a short expiry (readers may still be finishing
requests against it). Each entity has its own pointer: a load of one table moves only that
entity's pointer, and only that entity's previous records expire. The load id is a hash of the
schema version and the encoded content, so loading the same tables twice rewrites the same keys
and flips the pointers to the values they already have: idempotent (`load_files`, which streams
Parquet files, hashes the files instead). A table that lacks a feature column the schema needs
is refused (naming the column) unless the caller allows it explicitly. The batches go through
`service.featurestore.bulk` with a progress marker each, so a killed load resumes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis
from redis.cluster import RedisCluster

from ranker.schema import (
    FeatureSchema,
    GroupSchema,
    ListColumnError,
    ListTooLongError,
    fixed_width,
)
from service.featurestore.bulk import BatchWriter
from service.featurestore.keys import (
    DEFAULT_PREFIX,
    ENTITY_CODES,
    load_pattern,
    pointer_key,
    record_key_prefix,
    replica_load_pattern,
    replica_pointer_key,
    replica_record_prefix,
    replica_tags,
)

SyncClient = redis.Redis | RedisCluster
T = TypeVar("T")
DEFAULT_BATCH = 2000
DEFAULT_OLD_LOAD_GRACE_S = 60
# The switch: set every pointer of the load and return what each held before, in one atomic
# step (one script on one slot: the pointers share a hash tag), so the clean-up expires exactly
# the loads this switch made unreachable, even when two loads race.
_SWITCH = """
local previous = {}
for i, key in ipairs(KEYS) do
  previous[i] = redis.call('GET', key)
  redis.call('SET', key, ARGV[1])
end
return previous
"""


class MissingColumnsError(ValueError):
    """A feature table lacks columns the schema needs; the message names them."""


class BadListError(ValueError):
    """A list feature's column the load refuses: longer than the cap, not a list of ids, or
    mostly ids the model does not know (the wrong id spelling, most likely)."""


# a list column whose present ids are more than this share unknown to the vocabulary is refused
DEFAULT_MAX_UNKNOWN_LIST_SHARE = 0.5


@dataclass
class LoadReport:
    """What a load wrote."""

    schema_version: str
    load_id: str
    previous_load_ids: dict[str, str | None]  # per entity loaded: the load its pointer left
    users: int = 0
    items: int = 0
    skipped_null_ids: int = 0
    duplicate_ids: int = 0
    list_ids: int = 0  # ids in the loaded list features (histories)
    list_unknown_ids: int = 0  # of them, ids the vocabulary lacks (dropped like padding)
    bytes_written: int = 0
    seconds: float = 0.0
    resumed_rows: int = 0  # rows a killed run of this load had written: skipped, not rewritten
    records_written: int = 0  # by this run
    records_per_s: float = 0.0  # records_written over the seconds spent writing them
    redis_bytes_per_record: dict[str, float] = field(default_factory=dict)  # MEMORY USAGE sample
    ttl_s: int | None = None
    old_keys_expiring: int = 0
    defaulted_columns: dict[str, list[str]] = field(default_factory=dict)  # allowed, per entity
    counts: dict[str, int] = field(default_factory=dict)
    replica_tags: dict[str, str] = field(default_factory=dict)  # cluster: master -> its copy's tag

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EncodedGroup:
    """One entity table, encoded: ids as strings and the packed records, row for row."""

    entity: str
    id_array: pa.Array  # string ids, null-free and distinct
    records: np.ndarray  # structured array of group.record_dtype()
    id_hashes: np.ndarray  # (n,) uint64 `id_hashes` of the ids
    skipped_null_ids: int
    duplicate_ids: int
    defaulted_columns: tuple[str, ...] = ()  # absent from the table, written as their default
    list_ids: int = 0
    list_unknown_ids: int = 0
    source_rows: np.ndarray | None = None  # each record's row in the encoded table (None: all)

    @functools.cached_property
    def ids(self) -> list[str]:
        """The ids as Python strings (the batch writer packs `id_array` without them)."""
        return self.id_array.to_pylist()

    def __len__(self) -> int:
        return len(self.id_array)


def ids_as_strings(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Id column -> strings, spelled as the request will send them (float 7.0 -> "7")."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_floating(arr.type):
        arr = pc.cast(arr, pa.int64(), safe=False)
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        arr = pc.cast(arr, pa.string())
    return arr


def encode_table(
    group: GroupSchema, table: pa.Table, written_at: float, *, allow_missing_columns: bool = False,
    max_unknown_list_share: float = DEFAULT_MAX_UNKNOWN_LIST_SHARE,
) -> EncodedGroup:
    """Encode a raw entity table (key column + raw feature columns) into packed records.

    A feature column absent from the table raises `MissingColumnsError`: it would be written as
    the feature's default for every entity. `allow_missing_columns=True` writes the defaults and
    names the columns in `EncodedGroup.defaulted_columns`. A list feature's column with a list
    longer than its cap, of something other than ids, or whose present ids are more than
    `max_unknown_list_share` unknown to the vocabulary raises `BadListError`.
    """
    if group.key is None or group.key not in table.column_names:
        raise ValueError(f"{group.entity} table needs its key column {group.key!r}")
    absent = tuple(name for name in group.feature_names if name not in table.column_names)
    if absent and not allow_missing_columns:
        raise MissingColumnsError(
            f"{group.entity} table lacks the feature column(s) {', '.join(absent)} of the schema "
            f"(every {group.entity} would get their default); add them, or allow the defaults "
            "explicitly"
        )
    ids_arr = ids_as_strings(table.column(group.key))
    valid = pc.is_valid(ids_arr)
    n_null = len(ids_arr) - int(pc.sum(valid).as_py() or 0)
    source = np.arange(table.num_rows)  # (n,) the input row of each record kept
    if n_null:
        table, ids_arr = table.filter(valid), ids_arr.filter(valid)
        source = source[np.asarray(valid.to_numpy(zero_copy_only=False), dtype=bool)]
    # Duplicate ids: the last row wins, as it would with repeated SETs; count them (exactly,
    # when the ids' hashes say there may be any).
    hashes = id_hashes(ids_arr)
    ordered = np.sort(hashes)
    n_dup = (len(ids_arr) - pc.count_distinct(ids_arr).as_py()
             if np.any(ordered[1:] == ordered[:-1]) else 0)
    if n_dup:
        ids = ids_arr.to_pylist()
        last = {entity_id: row for row, entity_id in enumerate(ids)}
        keep = np.fromiter(last.values(), dtype=np.int64, count=len(last))
        keep.sort()
        table = table.take(pa.array(keep))
        ids_arr = ids_arr.take(pa.array(keep))
        source = source[keep]
        hashes = id_hashes(ids_arr)
    present = set(table.column_names)
    columns = {name: table.column(name) for name in group.feature_names if name in present}
    cat, dense = group.encode_columns(columns, table.num_rows)
    records = np.empty(table.num_rows, dtype=group.record_dtype())
    records["written_at"] = written_at
    records["cat"] = cat
    records["dense"] = dense
    n_list = n_unknown = 0
    if group.lists:
        try:
            records["list"], n_unknown = group.encode_lists(columns, table.num_rows)
        except (ListTooLongError, ListColumnError) as e:
            raise BadListError(f"{group.entity} table: {e}") from e
        n_list = sum(_list_ids(columns[f.name]) for f in group.lists if f.name in columns)
        if n_list and n_unknown > max_unknown_list_share * n_list:
            raise BadListError(
                f"{group.entity} table: {n_unknown} of the {n_list} ids in its list features "
                f"are unknown to the model's vocabulary (more than {max_unknown_list_share:.0%}"
                "): are they spelled as the ids the model was trained on?")
    return EncodedGroup(group.entity, ids_arr, records, hashes, n_null, n_dup, absent, n_list,
                        n_unknown, source if (n_null or n_dup) else None)


def _list_ids(column: pa.Array | pa.ChunkedArray) -> int:
    """Present (non-null) ids in a list column."""
    flat = pc.list_flatten(column)
    return len(flat) - flat.null_count


def content_load_id(schema: FeatureSchema, groups: list[EncodedGroup]) -> str:
    """Deterministic load id: same schema and same encoded content -> same id."""
    h = hashlib.sha256(schema.version.encode())
    for g in groups:
        h.update(g.entity.encode())
        h.update("\0".join(g.ids).encode())
        # hash the features, not the write time, so a re-load keeps its id
        h.update(np.ascontiguousarray(g.records["cat"]).tobytes())
        h.update(np.ascontiguousarray(g.records["dense"]).tobytes())
        if "list" in (g.records.dtype.names or ()):
            h.update(np.ascontiguousarray(g.records["list"]).tobytes())
    return h.hexdigest()[:12]


def progress_key(prefix: str, schema_version: str, load_id: str, entity: str) -> str:
    """Rows of one entity's source a load has written so far (the resume marker): beside the
    load's records, never matched by their SCAN pattern, deleted when the load goes live."""
    return f"{prefix}:{schema_version}:{load_id}:progress:{ENTITY_CODES[entity]}"


def written_rows(client: SyncClient, key: str) -> int:
    """The progress marker's value: rows already written by an earlier run of this load."""
    raw = client.get(key)
    return int(raw) if raw is not None else 0


def write_group(
    client: SyncClient,
    key_prefix: str,
    enc: EncodedGroup,
    *,
    ttl_s: int | None,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    progress_key: str | None = None,
    start: int = 0,
) -> int:
    """One group's records from row `start` on, in batches (`service.featurestore.bulk`), each
    batch with its progress marker when `progress_key` is given; returns the bytes written."""
    size = enc.records.dtype.itemsize
    blob = enc.records.tobytes()
    writer = BatchWriter(client, ttl_s)
    try:
        for lo in range(start, len(enc), batch_size):
            hi = min(len(enc), lo + batch_size)
            writer.write(key_prefix, enc.id_array[lo:hi], blob[lo * size : hi * size], size,
                         None if progress_key is None else (progress_key, hi))
            if progress is not None:
                progress(hi - lo)
    finally:
        writer.close()
    return max(0, len(enc) - start) * size


# EXPIRE every key of a SCAN page in one call (one node: the page's keys need not share a slot)
_EXPIRE_ALL = """
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ARGV[1]) end
return #KEYS
"""
EXPIRE_SCAN_COUNT = 10_000  # keys a SCAN call looks at on one node


def expire_load(client: SyncClient, pattern: str, grace_s: int, batch_size: int) -> int:
    """Give every key matching `pattern` an expiry of `grace_s`: on one node SCAN pages of
    `EXPIRE_SCAN_COUNT` and one script call per page (a redis-py pipeline of one EXPIRE per key
    cost ~13 us of Python per key: 15 s for the previous load of the production world); on a
    cluster SCAN + pipelined EXPIRE per key (the keys span slots)."""
    if isinstance(client, redis.Redis):
        count, cursor = 0, 0
        expire_all = client.register_script(_EXPIRE_ALL)
        while True:
            cursor, keys = client.scan(cursor, match=pattern, count=EXPIRE_SCAN_COUNT)
            if keys:
                count += int(expire_all(keys=keys, args=[grace_s]))
            if cursor == 0:
                return count
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
    allow_missing_columns: bool = False,
    replicate_items: bool | None = None,
    max_unknown_list_share: float = DEFAULT_MAX_UNKNOWN_LIST_SHARE,
) -> LoadReport:
    """Encode and write the tables as a new load, then switch the pointers of its entities to it.

    Only the entities given move: a load of the items alone leaves the users' pointer (and
    their records) as they were. Every table is encoded before anything is written, so a refused
    table (`MissingColumnsError`, `BadListError`) writes nothing. `old_load_grace_s=None`
    leaves the previous load untouched (e.g. to roll back by hand); `now` overrides the
    records' write time (tests of staleness). On a cluster (`replicate_items=None` or True) the
    item records and the pointers are also copied to every master (`write_copies`,
    `switch_copies`).
    """
    started = time.perf_counter()
    written_at = time.time() if now is None else now
    encoded: list[EncodedGroup] = []
    for entity, table in (("user", users_table), ("item", items_table)):
        group = schema.group(entity)
        if group is None or table is None:
            continue
        encoded.append(
            encode_table(group, table, written_at, allow_missing_columns=allow_missing_columns,
                         max_unknown_list_share=max_unknown_list_share)
        )
    if not encoded:
        raise ValueError("nothing to load: no table for an entity of this schema")
    lid = load_id or content_load_id(schema, encoded)
    report = LoadReport(schema.version, lid, {}, ttl_s=ttl_s)
    report.replica_tags = copy_tags(client, replicate_items)  # {}: a single node, or not asked
    keys = {e.entity: progress_key(prefix, schema.version, lid, e.entity) for e in encoded}
    done = {e.entity: min(written_rows(client, keys[e.entity]), len(e.ids)) for e in encoded}
    total = sum(len(e.ids) for e in encoded)
    bar = _progress_bar(total, f"load {lid}", sum(done.values())) if progress else None
    writing = time.perf_counter()
    try:
        for enc in encoded:
            key_prefix = record_key_prefix(prefix, schema.version, lid, enc.entity)
            report.bytes_written += write_group(
                client, key_prefix, enc, ttl_s=ttl_s, batch_size=batch_size,
                progress=bar.update if bar is not None else None,
                progress_key=keys[enc.entity], start=done[enc.entity],
            )  # fmt: skip
            write_copies(client, prefix, schema.version, lid, enc, report.replica_tags,
                         ttl_s=ttl_s, batch_size=batch_size)
            setattr(report, f"{enc.entity}s", len(enc.ids))
            report.skipped_null_ids += enc.skipped_null_ids
            report.duplicate_ids += enc.duplicate_ids
            report.list_ids += enc.list_ids
            report.list_unknown_ids += enc.list_unknown_ids
            report.resumed_rows += done[enc.entity]
            report.records_written += len(enc.ids) - done[enc.entity]
            if enc.defaulted_columns:
                report.defaulted_columns[enc.entity] = list(enc.defaulted_columns)
            report.redis_bytes_per_record[enc.entity] = sample_memory_usage(
                client, key_prefix, enc.ids)
    finally:
        if bar is not None:
            bar.close()
    _rate(report, time.perf_counter() - writing)
    return _go_live(client, schema, report, list(keys), keys, prefix, old_load_grace_s,
                    batch_size, started)


def _rate(report: LoadReport, seconds: float) -> None:
    report.records_per_s = report.records_written / seconds if seconds > 0 else 0.0


def _go_live(client: SyncClient, schema: FeatureSchema, report: LoadReport, entities: list[str],
             progress_keys: dict[str, str], prefix: str, old_load_grace_s: int | None,
             batch_size: int, started: float) -> LoadReport:
    """The atomic switch (readers see the new load from their next request), then the resume
    markers go and the loads the switch left expire."""
    lid = report.load_id
    pointers = [pointer_key(prefix, schema.version, entity) for entity in entities]
    previous = client.eval(_SWITCH, len(pointers), *pointers, lid)
    for key in progress_keys.values():
        client.delete(key)
    for entity, prev in zip(entities, previous, strict=True):
        prev_id = prev.decode() if isinstance(prev, bytes) else prev
        report.previous_load_ids[entity] = prev_id
        if prev_id is not None and prev_id != lid and old_load_grace_s is not None:
            report.old_keys_expiring += expire_load(
                client, load_pattern(prefix, schema.version, prev_id, entity), old_load_grace_s,
                batch_size,
            )  # fmt: skip
    if report.replica_tags:
        for prev_id in switch_copies(client, prefix, schema.version, lid, entities,
                                     report.replica_tags):
            if old_load_grace_s is not None:
                report.old_keys_expiring += expire_load(
                    client, replica_load_pattern(prefix, schema.version, prev_id),
                    old_load_grace_s, batch_size)
    report.seconds = time.perf_counter() - started
    report.counts = {
        "users": report.users,
        "items": report.items,
        "defaulted_columns": sum(len(c) for c in report.defaulted_columns.values()),
    }
    return report


MEMORY_SAMPLE = 64  # records whose MEMORY USAGE a load reports the mean of


def sample_memory_usage(client: SyncClient, key_prefix: str, ids: list[str],
                        n: int = MEMORY_SAMPLE) -> float:
    """Mean `MEMORY USAGE` (bytes Redis holds per key, key and overhead included) of up to n
    of these records, spread evenly over them; 0.0 with no ids."""
    if not ids:
        return 0.0
    picks = sorted({ids[int(i)] for i in np.linspace(0, len(ids) - 1, min(n, len(ids)))})
    sizes = [client.memory_usage(key_prefix + i, samples=0) for i in picks]
    got = [int(x) for x in sizes if x is not None]
    return float(np.mean(got)) if got else 0.0


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """`items`, produced on a thread up to `depth` ahead; its exception re-raised here. The
    consumer stopping early (an error) stops the producer at its next item."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as e:  # handed to the consumer
            q.put(("error", e))

    thread = threading.Thread(target=produce, name="load-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        thread.join(timeout=5)


_HASH_MULT = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: (h ^ x) * it is a bijection in x


def id_hashes(ids: pa.Array) -> np.ndarray:
    """(n,) uint64 hashes of string ids (to count an id repeated in two batches without keeping
    the ids; equal ids, equal hashes): the ids as fixed-width bytes, folded 8 bytes at a time,
    vectorised, whatever the batch's longest id (ids of at most 8 bytes cannot collide). Ids
    holding a NUL byte: Python's hash."""
    fixed = fixed_width(ids, None)
    if fixed is None:
        return np.fromiter(map(hash, ids.to_pylist()), np.int64, len(ids)).view(np.uint64)
    keys = fixed[0]
    width = keys.dtype.itemsize
    words = np.zeros((len(keys), -(-width // 8) * 8), np.uint8)
    words[:, :width] = keys.view(np.uint8).reshape(len(keys), width)
    h = np.full(len(keys), 0xCBF29CE484222325, np.uint64)
    for column in words.view(np.uint64).T:  # the padding's words (all zero: no NUL in an id)
        h = np.where(column != 0, (h ^ column) * _HASH_MULT, h)  # leave h as it is: any width
    return h


def file_load_id(schema: FeatureSchema, sources: dict[str, Path]) -> str:
    """Deterministic load id of a streamed load: the schema version and the files' sha256, so
    the same files give the same id (a killed load's rerun finds its progress)."""
    from ranker.manifest import sha256_file

    h = hashlib.sha256(schema.version.encode())
    for entity in sorted(sources):
        h.update(entity.encode())
        h.update(sha256_file(Path(sources[entity])).encode())
    return "f" + h.hexdigest()[:11]


DEFAULT_STREAM_ROWS = 5_000  # records per command (MSET): Redis blocks other clients for one
DEFAULT_READ_ROWS = 50_000  # rows of Parquet read and encoded per step (several commands):
# encoding a vocabulary lookup costs per call, so larger steps amortise it


def load_files(
    client: SyncClient,
    schema: FeatureSchema,
    users_path: Path | None,
    items_path: Path | None,
    *,
    prefix: str = DEFAULT_PREFIX,
    ttl_s: int | None = None,
    batch_size: int = DEFAULT_STREAM_ROWS,
    load_id: str | None = None,
    old_load_grace_s: int | None = DEFAULT_OLD_LOAD_GRACE_S,
    progress: bool = False,
    now: float | None = None,
    allow_missing_columns: bool = False,
    max_unknown_list_share: float = DEFAULT_MAX_UNKNOWN_LIST_SHARE,
    read_rows: int = DEFAULT_READ_ROWS,
) -> LoadReport:
    """`load_tables` for Parquet files too large to hold: each file is read `read_rows` rows
    at a time (`iter_batches`, only the columns the schema needs), encoded, and written in
    commands of `batch_size` records, so memory stays bounded by a step whatever the file's
    size.

    The load id comes from the files' bytes (`file_load_id`). Every batch is written with its
    progress marker in one atomic command, so a killed load, run again on the same files,
    resumes after its last applied batch (`resumed_rows`). A missing column is refused before
    anything is written; a bad list (`BadListError`) met midway stops the load before the
    switch (nothing goes live) and expires what it wrote. Duplicate ids: the last row wins, as
    with `load_tables`.
    """
    started = time.perf_counter()
    written_at = time.time() if now is None else now
    sources: dict[str, Path] = {}
    for entity, path in (("user", users_path), ("item", items_path)):
        group = schema.group(entity)
        if group is None or path is None:
            continue
        names = pq.read_schema(path).names
        if group.key not in names:
            raise ValueError(f"{entity} table needs its key column {group.key!r}")
        absent = [n for n in group.feature_names if n not in names]
        if absent and not allow_missing_columns:
            raise MissingColumnsError(
                f"{entity} table lacks the feature column(s) {', '.join(absent)} of the schema "
                f"(every {entity} would get their default); add them, or allow the defaults "
                "explicitly")
        sources[entity] = Path(path)
    if not sources:
        raise ValueError("nothing to load: no table for an entity of this schema")
    lid = load_id or file_load_id(schema, sources)
    report = LoadReport(schema.version, lid, {}, ttl_s=ttl_s)
    keys = {e: progress_key(prefix, schema.version, lid, e) for e in sources}
    files = {e: pq.ParquetFile(p, read_dictionary=dictionary_columns(p, schema.group(e)))
             for e, p in sources.items()}
    done = {e: min(written_rows(client, keys[e]), files[e].metadata.num_rows) for e in sources}
    total = sum(f.metadata.num_rows for f in files.values())
    bar = _progress_bar(total, f"load {lid}", sum(done.values())) if progress else None
    writing = time.perf_counter()
    try:
        for entity, pf in files.items():
            group = schema.group(entity)
            assert group is not None and group.key is not None
            key_prefix = record_key_prefix(prefix, schema.version, lid, entity)
            columns = [group.key, *[n for n in group.feature_names if n in pf.schema_arrow.names]]
            seen: list[np.ndarray] = []
            sample: list[str] = []
            size = group.record_dtype().itemsize
            writer = BatchWriter(client, ttl_s)
            rows = 0
            try:
                def encoded(pf: pq.ParquetFile = pf, group: GroupSchema = group,
                            skip: int = done[entity], columns: list[str] = columns,
                            ) -> Iterator[tuple[EncodedGroup, int, int]]:
                    """(step encoded, the file row of its first row, its rows) from row
                    `skip` on."""
                    consumed = 0
                    for batch in pf.iter_batches(batch_size=max(read_rows, batch_size),
                                                 columns=columns):
                        start, consumed = consumed, consumed + batch.num_rows
                        if consumed <= skip:
                            continue  # written by the killed run
                        table = pa.Table.from_batches([batch])
                        if start < skip:
                            table = table.slice(skip - start)
                        yield (encode_table(group, table, written_at,
                                            allow_missing_columns=allow_missing_columns,
                                            max_unknown_list_share=max_unknown_list_share),
                               consumed - table.num_rows, table.num_rows)

                # the next batch is read and encoded (pyarrow and numpy, mostly without the
                # GIL) on a thread while this one packs and sends the current one
                for enc, first, n_read in prefetched(encoded()):
                    blob = enc.records.tobytes()
                    for lo in range(0, len(enc), batch_size):
                        hi = min(len(enc), lo + batch_size)
                        # the marker: rows of the file up to this command's last record (the
                        # rest of the step if it is the last command: skipped rows included)
                        src = enc.source_rows
                        done_to = (first + n_read if hi == len(enc) else
                                   first + (hi if src is None else int(src[hi - 1]) + 1))
                        writer.write(key_prefix, enc.id_array[lo:hi],
                                     blob[lo * size : hi * size], size, (keys[entity], done_to))
                    if not len(enc):  # a step of null ids only: its rows are done too (the
                        # marker alone, in order after the commands in flight)
                        writer.write(key_prefix, [], b"", size, (keys[entity], first + n_read))
                    rows += len(enc)
                    report.skipped_null_ids += enc.skipped_null_ids
                    report.duplicate_ids += enc.duplicate_ids
                    report.list_ids += enc.list_ids
                    report.list_unknown_ids += enc.list_unknown_ids
                    report.bytes_written += len(enc) * size
                    if enc.defaulted_columns:
                        report.defaulted_columns[entity] = list(enc.defaulted_columns)
                    seen.append(enc.id_hashes)
                    sample.extend(enc.id_array[:: max(1, len(enc) // 8)][:8].to_pylist())
                    if bar is not None:
                        bar.update(n_read)
            finally:
                writer.close()
            ids_hashed = np.concatenate(seen) if seen else np.zeros(0, np.int64)
            ids_hashed.sort()  # the same id in two batches: equal neighbours (np.unique: slower)
            across = int(np.count_nonzero(ids_hashed[1:] == ids_hashed[:-1]))
            report.duplicate_ids += across
            # entities loaded: this run's, and (resumed) one a row the killed run wrote
            setattr(report, f"{entity}s", rows - across + done[entity])
            report.resumed_rows += done[entity]
            report.records_written += rows
            report.redis_bytes_per_record[entity] = sample_memory_usage(client, key_prefix,
                                                                        sample)
    except BadListError:
        for entity in sources:  # nothing went live; what this load wrote goes
            expire_load(client, load_pattern(prefix, schema.version, lid, entity),
                        DEFAULT_OLD_LOAD_GRACE_S if old_load_grace_s is None else
                        old_load_grace_s, 2000)
            client.delete(keys[entity])
        raise
    finally:
        if bar is not None:
            bar.close()
    _rate(report, time.perf_counter() - writing)
    return _go_live(client, schema, report, list(sources), keys, prefix, old_load_grace_s,
                    2000, started)


def dictionary_columns(path: Path, group: GroupSchema | None) -> list[str]:
    """The string columns of a file's categorical and list features (not its key), to be read
    as dictionaries: the reader keeps Parquet's own dictionary instead of a string per value,
    and the vocabulary looks up each distinct value once per step (`Vocabulary.encode`)."""
    if group is None:
        return []
    names = {f.name for f in group.categorical} | {f.name for f in group.lists}
    names.discard(group.key)
    leaves = pq.ParquetFile(path).schema
    return [leaves.column(i).path for i in range(len(leaves))
            if leaves.column(i).path.split(".")[0] in names
            and leaves.column(i).physical_type == "BYTE_ARRAY"]


def _progress_bar(total: int, desc: str, initial: int = 0) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rec", unit_scale=True, initial=initial)


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


# --- Replicated item records on a cluster (keys.py: replica tags; docs/featurestore.md) ---


def copy_tags(client: SyncClient, replicate_items: bool | None) -> dict[str, str]:
    """master name -> the replica tag its copy is written under; {} on a single node or when
    `replicate_items` is False. The slot map is read afresh (CLUSTER SLOTS) at every load."""
    if not isinstance(client, RedisCluster) or replicate_items is False:
        return {}
    client.nodes_manager.initialize()
    slots = client.nodes_manager.slots_cache

    def owner(slot: int) -> str | None:
        nodes = slots.get(slot)
        return nodes[0].name if nodes else None

    return replica_tags(owner, [n.name for n in client.get_primaries()])


def write_copies(client: SyncClient, prefix: str, schema_version: str, load_id: str,
                 enc: EncodedGroup, tags: dict[str, str], *, ttl_s: int | None,
                 batch_size: int) -> None:
    """The item records once more under each master's replica tag (users are not copied)."""
    if enc.entity != "item":
        return
    for tag in tags.values():
        write_group(client, replica_record_prefix(prefix, schema_version, load_id, tag), enc,
                    ttl_s=ttl_s, batch_size=batch_size)


def switch_copies(client: SyncClient, prefix: str, schema_version: str, load_id: str,
                  entities: list[str], tags: dict[str, str]) -> set[str]:
    """Set the pointer copies of `entities` on every master (the same script as the switch,
    atomic per master: a request reads one master, so it sees one load); returns the item
    loads the copies left, whose copies the caller expires. Runs after the global switch."""
    left: set[str] = set()
    for tag in tags.values():
        keys = [replica_pointer_key(prefix, schema_version, tag, e) for e in entities]
        previous = client.eval(_SWITCH, len(keys), *keys, load_id)
        for entity, prev in zip(entities, previous, strict=True):
            prev_id = prev.decode() if isinstance(prev, bytes) else prev
            if entity == "item" and prev_id is not None and prev_id != load_id:
                left.add(prev_id)
    # Pointer copies under a tag no master uses any more (the slots moved since an earlier
    # load) are deleted: this load's clean-up may expire the records they name, and a master
    # that gets such a tag back later must find no copy (a counted fallback), not a dangling one.
    current = {f"{{{t}}}" for t in tags.values()}
    for key in client.scan_iter(match=f"{prefix}:{{r*}}:{schema_version}:current:*", count=1000):
        name = key.decode() if isinstance(key, bytes) else str(key)
        if name[len(prefix) + 1:].split(":", 1)[0] not in current:
            client.delete(name)
    return left
