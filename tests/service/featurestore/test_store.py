"""Writer and reader against the real redis-server of the test session."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import redis

from launch.local_redis import RedisServer
from ranker.examples import tiny_schema
from ranker.schema import FeatureSchema
from service.featurestore.keys import pointer_key, record_key_prefix
from service.featurestore.reader import FeatureStore, FeatureStoreUnavailable, make_client
from service.featurestore.writer import LoadReport, load_tables
from tests.service.featurestore.tables import items_table, users_table

SCHEMA = tiny_schema()


def roomy_client(url: str, **kw: Any) -> Any:
    """A client with 1 s timeouts: the test machine is shared and busy, and these tests check
    behaviour, not the millisecond defaults (the tests that do check them say so)."""
    return make_client(url, connect_timeout_s=1.0, socket_timeout_s=1.0, **kw)


def _activity(x: float) -> float:
    return (math.log1p(x) - 1.5) / 0.8


def _load(
    url: str, schema: FeatureSchema = SCHEMA, users: pa.Table | None = None, **kw: Any
) -> LoadReport:
    client = redis.Redis.from_url(url)
    try:
        users = users_table() if users is None else users
        return load_tables(client, schema, users, items_table(), **kw)
    finally:
        client.close()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[FeatureStore]:
    fs = FeatureStore(roomy_client(redis_url), SCHEMA)
    yield fs
    await fs.aclose()


async def test_round_trip_every_feature_type(redis_url: str, store: FeatureStore) -> None:
    report = _load(redis_url)
    assert (report.users, report.items) == (10, 30)
    # u3: known id, country "in"; u4: country "fr" (OOV), activity null -> default 0.0
    res = await store.fetch("u3", ["i1", "i3", "i5"])
    inp = res.inputs
    assert set(inp) == {"user_cat", "user_dense", "item_cat", "item_dense"}
    assert inp["user_cat"].dtype == np.int64 and inp["user_cat"].shape == (1, 2)
    assert inp["user_dense"].dtype == np.float32 and inp["user_dense"].shape == (1, 1)
    assert inp["item_cat"].shape == (3, 2) and inp["item_dense"].shape == (3, 2)
    assert all(a.flags.c_contiguous for a in inp.values())
    np.testing.assert_array_equal(inp["user_cat"], [[4, 4]])
    np.testing.assert_allclose(inp["user_dense"], [[_activity(3.0)]], rtol=1e-6)
    # i1: category c1 -> 2; i3: "c99" is OOV -> 0; i5: duration null -> default 60 -> 0.0
    np.testing.assert_array_equal(inp["item_cat"], [[2, 2], [4, 0], [6, 6]])
    np.testing.assert_allclose(
        inp["item_dense"],
        [[(1 - 30) / 20, (10 - 60) / 30], [(3 - 30) / 20, (30 - 60) / 30], [(5 - 30) / 20, 0.0]],
        rtol=1e-6,
    )
    assert not res.user_defaulted and res.items_defaulted == 0 and res.stale == 0
    res4 = await store.fetch("u4", [])
    np.testing.assert_array_equal(res4.inputs["user_cat"], [[5, 0]])
    np.testing.assert_allclose(res4.inputs["user_dense"], [[_activity(0.0)]], rtol=1e-6)
    assert res4.inputs["item_cat"].shape == (0, 2) and res4.items_defaulted == 0


async def test_unknown_user_and_items_get_defaults(redis_url: str, store: FeatureStore) -> None:
    _load(redis_url)
    res = await store.fetch("nobody", ["i2", "zzz", "i7", "i999"])
    assert res.user_defaulted
    np.testing.assert_array_equal(res.inputs["user_cat"], [[0, 0]])
    np.testing.assert_allclose(res.inputs["user_dense"], [[-1.875]])
    assert res.items_defaulted == 2
    np.testing.assert_array_equal(res.item_defaulted_mask, [False, True, False, True])
    np.testing.assert_array_equal(res.inputs["item_cat"][[1, 3]], 0)
    np.testing.assert_array_equal(res.inputs["item_dense"][[1, 3]], 0.0)  # defaults = the means
    np.testing.assert_array_equal(res.inputs["item_cat"][[0, 2]], [[3, 3], [8, 8]])
    assert res.stale == 0


async def test_nothing_loaded_means_all_defaults(redis_url: str, store: FeatureStore) -> None:
    res = await store.fetch("u1", ["i1", "i2"])
    assert res.user_defaulted and res.items_defaulted == 2
    assert store.load_ids == {"user": None, "item": None}


async def test_stale_records_are_treated_as_missing(redis_url: str) -> None:
    _load(redis_url, now=time.time() - 100)
    fresh = FeatureStore(roomy_client(redis_url), SCHEMA, max_age_s=1000)
    strict = FeatureStore(roomy_client(redis_url), SCHEMA, max_age_s=50)
    try:
        r = await fresh.fetch("u1", ["i1", "i2"])
        assert not r.user_defaulted and r.items_defaulted == 0 and r.stale == 0
        r = await strict.fetch("u1", ["i1", "i2", "nope"])
        assert r.user_defaulted and r.items_defaulted == 3 and r.stale == 3  # 1 user + 2 items
        np.testing.assert_array_equal(r.inputs["item_cat"], 0)
        np.testing.assert_allclose(r.inputs["user_dense"], [[-1.875]])
        # one fresh record among stale ones: rewrite i2 with written_at = now
        raw = redis.Redis.from_url(redis_url)
        item_load = strict.load_ids["item"]
        assert item_load is not None
        key = record_key_prefix("rk", SCHEMA.version, item_load, "item") + "i2"
        item_dtype = SCHEMA.group("item").record_dtype()  # type: ignore[union-attr]
        rec: np.ndarray = np.frombuffer(raw.get(key), item_dtype).copy()  # type: ignore[arg-type]
        rec["written_at"] = time.time()
        raw.set(key, rec.tobytes())
        raw.close()
        r = await strict.fetch("u1", ["i1", "i2"])
        np.testing.assert_array_equal(r.item_defaulted_mask, [True, False])
        np.testing.assert_array_equal(r.inputs["item_cat"], [[0, 0], [3, 3]])
    finally:
        await fresh.aclose()
        await strict.aclose()


async def test_corrupt_record_is_defaulted(redis_url: str, store: FeatureStore) -> None:
    _load(redis_url)
    await store.fetch("u1", [])
    item_load = store.load_ids["item"]
    assert item_load is not None
    raw = redis.Redis.from_url(redis_url)
    raw.set(record_key_prefix("rk", SCHEMA.version, item_load, "item") + "i1", b"short")
    raw.close()
    r = await store.fetch("u1", ["i1", "i2"])
    np.testing.assert_array_equal(r.item_defaulted_mask, [True, False])
    assert r.stale == 0


async def test_new_schema_never_decodes_old_records(redis_url: str) -> None:
    old = SCHEMA
    new = tiny_schema(n_users=60)  # a different vocabulary: a different schema version
    assert new.version != old.version
    _load(redis_url, old)
    fs_new = FeatureStore(roomy_client(redis_url), new)
    fs_old = FeatureStore(roomy_client(redis_url), old)
    try:
        r = await fs_new.fetch("u1", ["i1"])
        assert r.user_defaulted and r.items_defaulted == 1
        _load(redis_url, new)  # both schemas' records now live side by side
        r_new, r_old = await fs_new.fetch("u1", ["i1"]), await fs_old.fetch("u1", ["i1"])
        assert not r_new.user_defaulted and not r_old.user_defaulted
        assert fs_new.load_ids != fs_old.load_ids
    finally:
        await fs_new.aclose()
        await fs_old.aclose()


async def test_atomic_switch_to_a_new_load(redis_url: str, store: FeatureStore) -> None:
    first = _load(redis_url)
    r1 = await store.fetch("u3", ["i1"])
    assert store.load_ids == {"user": first.load_id, "item": first.load_id}
    second = _load(redis_url, users=users_table(activity_scale=2.0), old_load_grace_s=30)
    assert second.load_id != first.load_id
    assert second.previous_load_ids == {"user": first.load_id, "item": first.load_id}
    assert second.old_keys_expiring == 40
    raw = redis.Redis.from_url(redis_url)
    old_key = record_key_prefix("rk", SCHEMA.version, first.load_id, "user") + "u3"
    assert 0 < raw.ttl(old_key) <= 30  # still readable by requests in flight
    for entity in ("user", "item"):
        assert raw.get(pointer_key("rk", SCHEMA.version, entity)) == second.load_id.encode()
    raw.close()
    # the request that notices the new pointers reads again, under the new load ...
    r2 = await store.fetch("u3", ["i1"])
    np.testing.assert_allclose(r2.inputs["user_dense"], [[_activity(6.0)]], rtol=1e-6)
    assert store.load_ids == {"user": second.load_id, "item": second.load_id}
    # ... and so does every later one; nobody ever saw a half-written load or defaults
    r3 = await store.fetch("u3", ["i1"])
    np.testing.assert_array_equal(r3.inputs["user_dense"], r2.inputs["user_dense"])
    assert not any(r.user_defaulted or r.items_defaulted for r in (r1, r2, r3))


async def test_reload_is_idempotent(redis_url: str) -> None:
    a = _load(redis_url)
    raw = redis.Redis.from_url(redis_url)
    keys_after_first = raw.dbsize()
    b = _load(redis_url)
    assert b.load_id == a.load_id
    assert b.previous_load_ids == {"user": a.load_id, "item": a.load_id}
    assert b.old_keys_expiring == 0 and raw.dbsize() == keys_after_first == 10 + 30 + 2
    assert raw.ttl(record_key_prefix("rk", SCHEMA.version, a.load_id, "item") + "i1") == -1
    raw.close()


async def test_ttl(redis_url: str) -> None:
    rep = _load(redis_url, ttl_s=100)
    raw = redis.Redis.from_url(redis_url)
    ttls = [raw.ttl(k) for k in raw.scan_iter(match=f"rk:{SCHEMA.version}:{rep.load_id}:*")]
    raw.close()
    assert len(ttls) == 40 and all(0 < t <= 100 for t in ttls)


async def test_null_and_duplicate_ids(redis_url: str, store: FeatureStore) -> None:
    users = pa.table({"user_id": ["u1", None, "u2", "u1"], "country": ["us", "de", "br", "in"],
                      "activity": [1.0, 2.0, 3.0, 4.0]})
    rep = _load(redis_url, users=users)
    assert (rep.users, rep.skipped_null_ids, rep.duplicate_ids) == (2, 1, 1)
    r = await store.fetch("u1", [])
    np.testing.assert_array_equal(r.inputs["user_cat"], [[2, 4]])  # the last u1 row wins


async def test_redis_down_is_a_quick_typed_error(redis_server: RedisServer, redis_url: str) -> None:
    _load(redis_url)
    fs = FeatureStore(roomy_client(redis_url), SCHEMA)
    try:
        assert (await fs.fetch("u1", ["i1"])).items_defaulted == 0
        redis_server.stop()
        t0 = time.perf_counter()
        with pytest.raises(FeatureStoreUnavailable, match="connection"):
            await fs.fetch("u1", ["i1"], timeout_s=0.5)
        assert time.perf_counter() - t0 < 0.5
        assert await fs.ping() is False
    finally:
        redis_server.start()
    _load(redis_url)  # no persistence: the restarted server is empty
    assert await fs.ping() is True
    assert (await fs.fetch("u1", ["i1"])).items_defaulted == 0  # the pool reconnects by itself
    await fs.aclose()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
async def test_slow_redis_hits_the_deadline_without_desync(
    redis_server: RedisServer, redis_url: str
) -> None:
    _load(redis_url)
    # one connection only: a timed-out reply left on it would be read by the next request
    fs = FeatureStore(roomy_client(redis_url, max_connections=1), SCHEMA)
    blocker = sleeper(redis_server)
    try:
        await fs.fetch("u0", ["i0"])
        put_to_sleep(blocker, redis_server.port, 0.3)  # asleep before the fetch is sent
        t0 = time.perf_counter()
        with pytest.raises(FeatureStoreUnavailable, match="deadline"):
            await fs.fetch("u1", ["i1", "i2"], timeout_s=0.05)
        assert time.perf_counter() - t0 < 0.2
        wait(lambda: replied(blocker), "redis-server woke up", timeout_s=10)
        r = await fs.fetch("u2", ["i5", "i6", "i7"], timeout_s=1.0)
        np.testing.assert_array_equal(r.inputs["user_cat"], [[3, 3]])
        np.testing.assert_array_equal(r.inputs["item_cat"][:, 0], [6, 7, 8])
    finally:
        blocker.close()
        await fs.aclose()


async def test_client_is_bounded_and_uses_hiredis(redis_url: str) -> None:
    _load(redis_url)
    client = make_client(redis_url, max_connections=1, connect_timeout_s=1.0, socket_timeout_s=0.1)
    fs = FeatureStore(client, SCHEMA)
    try:
        await fs.fetch("u0", [])
        conn = await client.connection_pool.get_connection()  # type: ignore[union-attr]
        assert type(conn._parser).__name__ == "_AsyncHiredisParser"
        assert conn.socket_timeout == 0.1 and conn.socket_connect_timeout == 1.0
        defaults = make_client(redis_url).connection_pool.connection_kwargs  # type: ignore[union-attr]
        assert (defaults["socket_connect_timeout"], defaults["socket_timeout"]) == (0.05, 0.1)
        # the pool's only connection is taken: the next fetch waits at most the pool timeout
        t0 = time.perf_counter()
        with pytest.raises(FeatureStoreUnavailable, match="No connection available"):
            await fs.fetch("u1", ["i1"], timeout_s=1.0)
        assert time.perf_counter() - t0 < 0.5  # 2 attempts x 0.1 s pool timeout
        await client.connection_pool.release(conn)  # type: ignore[union-attr]
        res = await fs.fetch("u1", ["i1"])  # the released connection serves again
        assert not res.user_defaulted and res.items_defaulted == 0
    finally:
        await fs.aclose()


def server_unread_bytes(server_port: int, client_port: int) -> int | None:
    """Bytes redis-server has not read yet from the connection of `client_port`: the receive
    queue of the server's end of it, from /proc/net/tcp (None if there is no such socket)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (int(local.rsplit(":", 1)[1], 16) == server_port
                and int(remote.rsplit(":", 1)[1], 16) == client_port):
            return int(fields[4].split(":")[1], 16)
    return None


def replied(sock: socket.socket) -> bool:
    """Whether anything came back on a raw socket yet (without waiting)."""
    try:
        return sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return False


def wait(condition: Any, what: str, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.001)  # poll interval of a bounded wait


def sleeper(server: RedisServer) -> socket.socket:
    """A raw connection to `server` for DEBUG SLEEP (blocking mode, for `replied`)."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.settimeout(None)  # a timeout would make the MSG_DONTWAIT peek wait for readability
    return sock


def put_to_sleep(sock: socket.socket, server_port: int, seconds: float) -> None:
    """DEBUG SLEEP on `sock`; returns once redis-server is asleep in it (it has read the
    command and not answered it yet)."""
    arg = str(seconds).encode()
    sock.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$%d\r\n%s\r\n" % (len(arg), arg))
    port = sock.getsockname()[1]
    wait(lambda: server_unread_bytes(server_port, port) == 0 and not replied(sock),
         "redis-server asleep in DEBUG SLEEP")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
async def test_cancelled_fetch_does_not_desync_the_connection(
    redis_server: RedisServer, redis_url: str
) -> None:
    """The cancel lands, deterministically, after the MGET reached the server and before its
    reply: the server is asleep in DEBUG SLEEP (seen: it has read that command and not yet
    answered it), and the MGET's bytes sit unread in the server's receive queue. The reply
    then arrives on a connection whose reader was cancelled; the next fetch on the one
    pooled connection must not read it."""
    _load(redis_url)
    fs = FeatureStore(roomy_client(redis_url, max_connections=1), SCHEMA)
    admin = redis.Redis.from_url(redis_url, socket_timeout=5)
    blocker = sleeper(redis_server)
    try:
        before = {c["addr"] for c in admin.client_list()}
        await fs.fetch("u0", ["i0"])  # opens the pool's only connection
        (ours,) = {c["addr"] for c in admin.client_list()} - before
        our_port = int(ours.rsplit(":", 1)[1])

        put_to_sleep(blocker, redis_server.port, 1.5)
        task = asyncio.create_task(fs.fetch("u9", ["i9", "i8"]))
        end = time.monotonic() + 1.0
        while not server_unread_bytes(redis_server.port, our_port):  # the MGET is at the server
            assert time.monotonic() < end, "the MGET never reached the server"
            await asyncio.sleep(0.001)  # poll interval; lets the task send
        assert not replied(blocker), "the server woke before the cancel: not mid-reply"
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        wait(lambda: replied(blocker), "redis-server woke up", timeout_s=10)
        # by now the MGET's reply has been sent on the cancelled connection
        r = await fs.fetch("u1", ["i3"], timeout_s=1.0)  # same single connection slot
        np.testing.assert_array_equal(r.inputs["user_cat"], [[2, 2]])
        np.testing.assert_array_equal(r.inputs["item_cat"], [[4, 0]])
    finally:
        blocker.close()
        admin.close()
        await fs.aclose()
