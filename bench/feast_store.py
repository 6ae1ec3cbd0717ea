"""The feature-store bench's users and items in Feast's Redis online store (bench only).

Imports `feast` at the top: only `bench.feast_compare` imports this module, and only after it
has checked that feast is importable (the `feast` extra, installed in a venv of its own; see
docs/benchmarks.md). Nothing in `service`, `ranker`, `launch` or `training` may import feast
(import-linter's `service-no-feast`).

A Feast repository is generated in a temporary directory: `feature_store.yaml` (local provider,
file registry, file offline store, the Redis online store at the bench's redis-server), one
entity and one feature view per group, each over a Parquet `FileSource` of the group's
*encoded* values (the categorical indices and normalised dense values our records hold, so
Feast's answer needs no further encoding: the comparison is generous to Feast), then
`apply` and `materialize`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.types import Float32, Int64

from bench.feast_compare import VIEW_NAMES, encoded_columns, feature_refs
from ranker.schema import FeatureSchema

PROJECT = "mmoe_bench"


def repo_yaml(repo: Path, redis_host: str, redis_port: int) -> str:
    return (
        f"project: {PROJECT}\n"
        f"registry: {repo / 'registry.db'}\n"
        "provider: local\n"
        "online_store:\n"
        "  type: redis\n"
        f'  connection_string: "{redis_host}:{redis_port}"\n'
        "offline_store:\n"
        "  type: file\n"
        "entity_key_serialization_version: 3\n"
    )


def build_store(repo: Path, redis_host: str, redis_port: int, schema: FeatureSchema,
                users: pa.Table, items: pa.Table) -> tuple[FeatureStore, dict[str, float]]:
    """Write the repo, apply it and materialise both views; (store, seconds per step)."""
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text(repo_yaml(repo, redis_host, redis_port))
    stamp = datetime.now(UTC) - timedelta(minutes=1)
    objects: list[Any] = []
    for entity, table in (("user", users), ("item", items)):
        g = schema.group(entity)
        assert g is not None and g.key is not None
        cols = encoded_columns(g, table)
        cols["event_timestamp"] = pa.array([stamp] * table.num_rows, pa.timestamp("us", "UTC"))
        path = repo / f"{entity}.parquet"
        pq.write_table(pa.table(cols), path)
        ent = Entity(name=entity, join_keys=[g.key], value_type=ValueType.STRING)
        fields = [Field(name=f.name, dtype=Int64) for f in g.categorical]
        fields += [Field(name=d.name, dtype=Float32) for d in g.dense]
        view = FeatureView(
            name=VIEW_NAMES[entity], entities=[ent], ttl=timedelta(days=7), schema=fields,
            source=FileSource(name=f"{entity}_source", path=str(path),
                              timestamp_field="event_timestamp"),
            online=True,
        )
        objects += [ent, view]
    store = FeatureStore(repo_path=str(repo))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    store.apply(objects)
    seconds["apply"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.materialize(start_date=stamp - timedelta(days=1), end_date=datetime.now(UTC))
    seconds["materialize"] = time.perf_counter() - t0
    return store, seconds


class FeastReader:
    """`get_online_features` for 1 user + N items, as a ranker would call it: one call, one
    entity row per candidate (the user's key repeated; Feast reads each unique entity once)."""

    def __init__(self, store: FeatureStore, schema: FeatureSchema,
                 item_features: int | None = None) -> None:
        self.store = store
        self.refs = feature_refs(schema, item_features)
        self.user_key = schema.group("user").key  # type: ignore[union-attr]
        self.item_key = schema.group("item").key  # type: ignore[union-attr]

    def get(self, user_id: str, item_ids: list[str]) -> Any:
        rows = {self.user_key: [user_id] * len(item_ids), self.item_key: item_ids}
        return self.store.get_online_features(features=self.refs, entity_rows=rows)

    def get_arrays(self, user_id: str, item_ids: list[str]) -> dict[str, np.ndarray]:
        """The call plus what a ranker needs next: the columns as numpy arrays."""
        out = self.get(user_id, item_ids).to_dict()
        return {k: np.asarray(v) for k, v in out.items()}
