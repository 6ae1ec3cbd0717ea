"""Issue 14, feature store: no ranking on defaults because of the store's own bookkeeping.

A load of one entity never orphans the other (item 1), a reader idle past the old load's grace
reads the current load (item 2), a table missing a schema column is refused (item 3), and
closing the store closes its pool (item 12). All against real redis-servers; the expiries are
real ones (a grace of 1 s), waited for by polling, not by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import redis

from launch.local_redis import RedisServer
from ranker.examples import tiny_schema
from ranker.manifest import load_manifest, load_schema
from service.featurestore.reader import FeatureStore, make_client
from service.featurestore.writer import load_tables
from tests.service.featurestore.tables import items_table, users_table
from tests.service.helpers import feature_tables, load_features, metric, running_app
from tests.support import settings_for

SCHEMA = tiny_schema()
CLI = [sys.executable, "-m", "launch.cli", "features", "load"]


def roomy_client(url: str, **kw: Any) -> Any:
    """1 s timeouts: the machine is shared and busy; these tests check behaviour, not timing."""
    return make_client(url, connect_timeout_s=1.0, socket_timeout_s=1.0, **kw)


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Poll `cond` until it holds; fail naming `what` after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.02)


def load_keys(raw: redis.Redis, load_id: str, code: str) -> list[bytes]:
    """The record keys of one entity ("u" / "i") of one load that still exist."""
    return list(raw.scan_iter(match=f"rk:{SCHEMA.version}:{load_id}:{code}:*", count=1000))


def items_v2() -> pa.Table:
    """The item table with other durations: another load id."""
    t = items_table()
    return t.set_column(t.column_names.index("duration"), "duration",
                        pc.add(t.column("duration"), 5.0))


def mget_calls(raw: redis.Redis) -> int:
    return int(raw.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))


# -- 1. a load of one entity never makes the other unreachable ------------------------------


async def test_items_only_load_keeps_the_users_reachable(
    tiny_model_dir: Path, redis_url: str, raw: redis.Redis, tmp_path: Path
) -> None:
    full = load_tables(raw, SCHEMA, users_table(), items_table(), old_load_grace_s=1)
    store = FeatureStore(roomy_client(redis_url), SCHEMA)
    try:
        before = await store.fetch("u3", ["i1", "i2"])
        assert not before.user_defaulted and before.items_defaulted == 0
        # `ranker features load --items new.parquet`, no --users, as an operator runs it
        pq.write_table(items_v2(), tmp_path / "items.parquet")
        out = subprocess.run(
            [*CLI, "--model-dir", str(tiny_model_dir), "--items", str(tmp_path / "items.parquet"),
             "--redis-url", redis_url, "--old-load-grace", "1", "--no-progress"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert (report["users"], report["items"]) == (0, 30)
        # past the grace period: the first load's item records are really gone ...
        wait_until(lambda: not load_keys(raw, full.load_id, "i"), "the old items to expire")
        # ... but its user records are still the live users: they never got an expiry
        user_keys = load_keys(raw, full.load_id, "u")
        assert len(user_keys) == 10 and all(raw.ttl(k) == -1 for k in user_keys), (
            "the items-only load expired (orphaned) the users' records"
        )
        fresh = FeatureStore(roomy_client(redis_url), SCHEMA)
        try:
            for reader in (store, fresh):  # the reader that saw the first load, and a new one
                res = await reader.fetch("u3", ["i1", "i2"], timeout_s=1.0)
                assert not res.user_defaulted, "every user is defaulted after an items-only load"
                np.testing.assert_array_equal(res.inputs["user_cat"], [[4, 4]])
                assert res.items_defaulted == 0
                # the items are the new load's: duration + 5 -> encoded + 5/30
                np.testing.assert_allclose(
                    res.inputs["item_dense"][:, 1],
                    before.inputs["item_dense"][:, 1] + 5 / 30, rtol=1e-5,
                )
        finally:
            await fresh.aclose()
    finally:
        await store.aclose()


# -- 2. an idle reader reads the current load, not the expired one it last saw --------------


async def test_idle_reader_reads_the_current_load_after_the_old_one_expired(
    redis_url: str, raw: redis.Redis
) -> None:
    first = load_tables(raw, SCHEMA, users_table(), items_table())
    store = FeatureStore(roomy_client(redis_url), SCHEMA)
    try:
        assert (await store.fetch("u3", ["i1", "i2"])).items_defaulted == 0  # saw load A
        second = load_tables(raw, SCHEMA, users_table(activity_scale=2.0), items_table(),
                             old_load_grace_s=1)
        assert second.load_id != first.load_id
        # the reader stays idle until load A has expired
        wait_until(lambda: not load_keys(raw, first.load_id, "u")
                   and not load_keys(raw, first.load_id, "i"), "load A to expire")
        calls = mget_calls(raw)
        res = await store.fetch("u3", ["i1", "i2"], timeout_s=0.5)
        assert not res.user_defaulted and res.items_defaulted == 0, (
            "the first request after the switch read the expired load: all defaulted"
        )
        np.testing.assert_allclose(res.inputs["user_dense"], [[(np.log1p(6.0) - 1.5) / 0.8]],
                                   rtol=1e-6)  # load B's value
        assert mget_calls(raw) - calls == 2  # the switch costs one more round trip, once
        calls = mget_calls(raw)
        again = await store.fetch("u3", ["i1", "i2"], timeout_s=0.5)
        assert mget_calls(raw) - calls == 1  # and every later request takes one
        np.testing.assert_array_equal(again.inputs["user_dense"], res.inputs["user_dense"])
    finally:
        await store.aclose()


async def test_a_switch_between_the_two_reads_serves_the_load_just_replaced(
    redis_url: str, raw: redis.Redis
) -> None:
    """Load C lands between the re-read's two MGETs: that request gets load B's values (still
    in their grace period, never defaults), and the next request reads C."""
    load_tables(raw, SCHEMA, users_table(), items_table())
    store = FeatureStore(roomy_client(redis_url), SCHEMA)
    try:
        await store.fetch("u3", ["i1"])  # saw load A
        b = load_tables(raw, SCHEMA, users_table(activity_scale=2.0), items_table())
        reads = 0
        real_mget = store._mget

        async def mget_then_load(*args: Any) -> list[Any]:
            nonlocal reads
            reads += 1
            if reads == 2:  # the re-read under B is about to go out: C switches first
                load_tables(raw, SCHEMA, users_table(activity_scale=3.0), items_table())
            return await real_mget(*args)

        store._mget = mget_then_load  # type: ignore[method-assign,assignment]
        res = await store.fetch("u3", ["i1"], timeout_s=1.0)
        assert reads == 2 and not res.user_defaulted and res.items_defaulted == 0
        np.testing.assert_allclose(res.inputs["user_dense"], [[(np.log1p(6.0) - 1.5) / 0.8]],
                                   rtol=1e-6)  # load B's value
        assert store.load_ids["user"] not in (None, b.load_id)  # adopted C for the next one
        res = await store.fetch("u3", ["i1"], timeout_s=1.0)
        np.testing.assert_allclose(res.inputs["user_dense"], [[(np.log1p(9.0) - 1.5) / 0.8]],
                                   rtol=1e-6)  # load C's value
        assert reads == 3  # one round trip
    finally:
        await store.aclose()


async def test_service_after_a_partial_load_ranks_on_loaded_features(
    model_repo: Path, redis_url: str, raw: redis.Redis
) -> None:
    """Items 1, 2 and 4 through the real app: the response's and the metric's counts are the
    truth, and neither the items-only load nor the idle worker makes anything default."""
    vdir = model_repo / "mmoe" / "1"
    load_features(redis_url, vdir)
    schema = load_schema(vdir, load_manifest(vdir))
    body = {"user_id": "u1", "candidates": ["i1", "i2", "i3", "nope"]}
    async with running_app(settings_for(model_repo, redis_url)) as client:
        r = await client.post("/rank", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["defaulted"] == {"user": 0, "items": 1, "stale": 0}  # "nope" only
        first_ids = {k.split(b":")[2] for k in raw.scan_iter(match=f"rk:{schema.version}:*:i:*")}
        _, items = feature_tables(seed=1)
        load_tables(raw, schema, None, items, old_load_grace_s=1)  # the items alone, new values
        wait_until(lambda: not any(raw.exists(f"rk:{schema.version}:{lid.decode()}:i:i1")
                                   for lid in first_ids), "the old items to expire")
        users_before = metric("ranker_defaulted_entities_total", {"entity": "user"})
        items_before = metric("ranker_defaulted_entities_total", {"entity": "item"})
        r = await client.post("/rank", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["defaulted"] == {"user": 0, "items": 1, "stale": 0}, r.text
        assert metric("ranker_defaulted_entities_total", {"entity": "user"}) == users_before
        assert metric("ranker_defaulted_entities_total", {"entity": "item"}) == items_before + 1


# -- 3. a table missing a column the schema needs is refused ---------------------------------


def test_table_missing_a_schema_column_is_refused(raw: redis.Redis) -> None:
    users = users_table().drop_columns(["activity"])
    with pytest.raises(ValueError, match="activity"):
        load_tables(raw, SCHEMA, users, items_table())
    assert raw.dbsize() == 0  # refused before anything was written: no pointer moved


def test_cli_refuses_a_missing_column_unless_allowed(
    tiny_model_dir: Path, redis_url: str, raw: redis.Redis, tmp_path: Path
) -> None:
    items = tmp_path / "items.parquet"
    pq.write_table(items_table().drop_columns(["category"]), items)
    argv = [*CLI, "--model-dir", str(tiny_model_dir), "--items", str(items),
            "--redis-url", redis_url, "--no-progress"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "category" in out.stderr and "--allow-missing-columns" in out.stderr, out.stderr
    assert raw.dbsize() == 0
    out = subprocess.run([*argv, "--allow-missing-columns"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "item columns defaulted: category" in out.stdout
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["defaulted_columns"] == {"item": ["category"]}
    assert report["counts"] == {"users": 0, "items": 30, "defaulted_columns": 1}


# -- 12. closing the store closes its connection pool ----------------------------------------


def server_clients(raw: redis.Redis) -> int:
    """Clients connected to the server, not counting `raw` itself."""
    return len(raw.client_list()) - 1


async def test_closing_the_store_disconnects_its_pool() -> None:
    with RedisServer() as server:  # private: no other test's connections in CLIENT LIST
        raw = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            load_tables(raw, SCHEMA, users_table(), items_table())
            before = server_clients(raw)
            store = FeatureStore(roomy_client(server.url, max_connections=4), SCHEMA)
            await asyncio.gather(*(store.fetch(f"u{i}", ["i1", "i2"]) for i in range(8)))
            assert server_clients(raw) - before >= 2  # the pool opened several connections
            await store.aclose()
            wait_until(lambda: server_clients(raw) == before,
                       "the store's connections to close (the pool was left open)")
            assert server.running and raw.ping()  # the server kept running all along
            del store
        finally:
            raw.close()


async def test_app_shutdown_disconnects_the_pool(model_repo: Path) -> None:
    with RedisServer() as server:
        raw = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            load_features(server.url, model_repo / "mmoe" / "1")
            before = server_clients(raw)
            async with running_app(settings_for(model_repo, server.url)) as client:
                rs = await asyncio.gather(*(client.post("/rank", json={
                    "user_id": "u1", "candidates": ["i1", "i2"]}) for _ in range(6)))
                assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
                assert server_clients(raw) > before
            wait_until(lambda: server_clients(raw) == before,
                       "the lifespan to close the Redis pool")
        finally:
            raw.close()
