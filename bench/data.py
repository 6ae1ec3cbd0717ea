"""The benchmark's data: raw user/item tables, the seeded request mix, and the naive hash layout.

The service and the naive app serve the same users and items from the same redis-server: the
service from the feature store's packed records, the naive app from one Redis hash of raw
values per entity (`naive:<entity>:<id>`), which is how a first implementation usually stores
features. Both layouts are written from the same raw tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from ranker.schema import FeatureSchema, GroupSchema

NAIVE_PREFIX = "naive"


def naive_key(entity: str, entity_id: str) -> str:
    return f"{NAIVE_PREFIX}:{entity}:{entity_id}"


def tables_from_dir(data_dir: Path) -> dict[str, pa.Table] | None:
    """The trainer's users.parquet and items.parquet, if the directory has them."""
    paths = {e: Path(data_dir) / f"{e}s.parquet" for e in ("user", "item")}
    if not all(p.is_file() for p in paths.values()):
        return None
    return {e: pq.read_table(p) for e, p in paths.items()}


def tables_from_schema(schema: FeatureSchema, n_users: int, n_items: int,
                       seed: int = 0) -> dict[str, pa.Table]:
    """Raw tables drawn from the schema's vocabularies and dense statistics (for tiny models)."""
    rng = np.random.default_rng(seed)
    out: dict[str, pa.Table] = {}
    for entity, n in (("user", n_users), ("item", n_items)):
        g = _group(schema, entity)
        cols: dict[str, Any] = {}
        key_feature = next((f for f in g.categorical if f.name == g.key), None)
        if key_feature is not None and len(key_feature.vocab.values) >= n:
            cols[str(g.key)] = list(key_feature.vocab.values[:n])
        else:
            cols[str(g.key)] = [f"{entity[0]}{i}" for i in range(n)]
        for f in g.categorical:
            if f.name != g.key:
                cols[f.name] = [f.vocab.values[i] for i in rng.integers(0, len(f.vocab.values), n)]
        for d in g.dense:
            x = rng.normal(d.mean, d.std, n)
            cols[d.name] = np.expm1(np.maximum(x, 0.0)) if d.log1p else x
        out[entity] = pa.table(cols)
    return out


def pad_entities(schema: FeatureSchema, table: pa.Table, entity: str, n_min: int,
                 seed: int = 0) -> pa.Table:
    """`table` (schema columns only) plus generated rows `bench-<entity>-<i>` up to n_min rows.

    The largest candidate count needs that many distinct items with real records; a small
    dataset is topped up with rows drawn like `tables_from_schema`'s rather than with ids that
    are missing from Redis (which would exercise the default path instead of the normal one).
    """
    g = _group(schema, entity)
    cols = [str(g.key), *[n for n in g.feature_names if n != g.key and n in table.column_names]]
    table = table.select(cols)
    if table.num_rows >= n_min:
        return table
    rng = np.random.default_rng(seed)
    k = n_min - table.num_rows
    new: dict[str, Any] = {str(g.key): [f"bench-{entity}-{i}" for i in range(k)]}
    for f in g.categorical:
        if f.name in cols and f.name != g.key:
            new[f.name] = [f.vocab.values[i] for i in rng.integers(0, len(f.vocab.values), k)]
    for d in g.dense:
        if d.name in cols:
            x = rng.normal(d.mean, d.std, k)
            new[d.name] = np.expm1(np.maximum(x, 0.0)) if d.log1p else x
    padded = pa.table({c: pa.array(new[c]).cast(table.schema.field(c).type) for c in cols})
    return pa.concat_tables([table, padded])


def _group(schema: FeatureSchema, entity: str) -> GroupSchema:
    g = schema.group(entity)
    if g is None or g.key is None:
        raise ValueError(f"the model has no keyed {entity} group")
    return g


def ids(table: pa.Table, schema: FeatureSchema, entity: str) -> list[str]:
    return [str(v) for v in table[str(_group(schema, entity).key)].to_pylist()]


def write_naive_hashes(client: redis.Redis, schema: FeatureSchema,
                       tables: dict[str, pa.Table], batch: int = 1000) -> int:
    """HSET one hash of raw feature values per user and item; returns the number of hashes."""
    written = 0
    for entity, table in tables.items():
        g = _group(schema, entity)
        names = [n for n in g.feature_names if n in table.column_names]
        rows = table.select([str(g.key), *[n for n in names if n != g.key]]).to_pylist()
        pipe = client.pipeline(transaction=False)
        for i, row in enumerate(rows, 1):
            fields = {k: str(v) for k, v in row.items() if v is not None}
            pipe.hset(naive_key(entity, str(row[g.key])), mapping=fields)
            if i % batch == 0:
                pipe.execute()
        pipe.execute()
        written += len(rows)
    return written


def request_bodies(user_ids: list[str], item_ids: list[str], n_candidates: int, count: int,
                   seed: int, extra: dict[str, Any] | None = None) -> list[bytes]:
    """`count` seeded /rank bodies: a random user and `n_candidates` distinct random items."""
    if n_candidates > len(item_ids):
        raise ValueError(f"{n_candidates} candidates requested but only {len(item_ids)} items")
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        user = user_ids[int(rng.integers(len(user_ids)))]
        items = [item_ids[i] for i in rng.choice(len(item_ids), n_candidates, replace=False)]
        bodies.append(json.dumps({"user_id": user, "candidates": items, **(extra or {})}).encode())
    return bodies


def write_bodies(path: Path, bodies: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(bodies) + b"\n")
    return path
