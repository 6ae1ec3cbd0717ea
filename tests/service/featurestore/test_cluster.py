"""The same writer and reader against a real 3-master Redis Cluster started on loopback ports."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from launch.local_redis import RedisClusterServer
from ranker.examples import tiny_schema
from service.featurestore.keys import record_key_prefix
from service.featurestore.reader import (
    FeatureStore,
    FeatureStoreUnavailable,
    close_client,
    make_client,
)
from service.featurestore.writer import load_tables, make_sync_client
from tests.service.featurestore.tables import items_table, users_table

SCHEMA = tiny_schema()
ITEMS = [f"i{i}" for i in range(30)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServer]:
    with RedisClusterServer(masters=3) as c:
        yield c


@pytest.fixture
def cluster_client(cluster: RedisClusterServer) -> Iterator[RedisCluster]:
    client = make_sync_client(cluster.url)  # detects cluster mode by itself
    assert isinstance(client, RedisCluster)
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    client.close()


def _expected_item_cat() -> np.ndarray:
    cat = np.array([[i + 1, i % 8 + 1] for i in range(30)], dtype=np.int64)
    cat[3, 1] = 0  # "c99" is out of vocabulary
    return cat


async def test_load_and_fetch_across_slots(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    rep = load_tables(cluster_client, SCHEMA, users_table(), items_table())
    assert (rep.users, rep.items) == (10, 30)
    prefix = record_key_prefix("rk", SCHEMA.version, rep.load_id, "item")
    nodes = {cluster_client.get_node_from_key(prefix + i).port for i in ITEMS}
    assert len(nodes) == 3  # the request's keys really span the three masters
    fs = FeatureStore(
        make_client(cluster.url, cluster=True, connect_timeout_s=1.0, socket_timeout_s=1.0), SCHEMA
    )
    try:
        res = await fs.fetch("u3", [*ITEMS, "unknown"], timeout_s=1.0)
        np.testing.assert_array_equal(res.inputs["user_cat"], [[4, 4]])
        np.testing.assert_array_equal(res.inputs["item_cat"][:30], _expected_item_cat())
        np.testing.assert_allclose(
            res.inputs["item_dense"][:30, 0], (np.arange(30) - 30) / 20, rtol=1e-6
        )
        assert res.items_defaulted == 1 and bool(res.item_defaulted_mask[30])
        assert not res.user_defaulted
    finally:
        await fs.aclose()


async def test_switch_and_idempotent_reload_on_cluster(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    first = load_tables(cluster_client, SCHEMA, users_table(), items_table())
    again = load_tables(cluster_client, SCHEMA, users_table(), items_table())
    assert again.load_id == first.load_id and again.old_keys_expiring == 0
    second = load_tables(
        cluster_client, SCHEMA, users_table(activity_scale=3.0), items_table(), old_load_grace_s=30
    )
    # SCAN found the old load on every master: 40 records + 30 items copied to 3 masters
    assert second.old_keys_expiring == 40 + 3 * 30
    fs = FeatureStore(
        make_client(cluster.url, cluster=True, connect_timeout_s=1.0, socket_timeout_s=1.0), SCHEMA
    )
    try:
        await fs.fetch("u1", ["i1"])
        assert fs.load_ids == {"user": second.load_id, "item": second.load_id}
        res = await fs.fetch("u1", ["i1"])
        np.testing.assert_allclose(
            res.inputs["user_dense"], [[(np.log1p(3.0) - 1.5) / 0.8]], rtol=1e-6
        )
    finally:
        await fs.aclose()


def _cluster_clients(cluster: RedisClusterServer) -> set[tuple[int, str]]:
    """(node port, client id) of the clients connected to the cluster's nodes, not counting the
    counting connections. Ids, not counts: other tests' connections closing late do not matter."""
    found: set[tuple[int, str]] = set()
    for node in cluster.nodes:
        raw = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)
        try:
            me = str(raw.client_id())
            found |= {(node.port, str(c["id"])) for c in raw.client_list() if str(c["id"]) != me}
        finally:
            raw.close()
    return found


async def test_close_client_disconnects_every_node(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    from service.featurestore.reader import close_client

    load_tables(cluster_client, SCHEMA, users_table(), items_table())
    before = _cluster_clients(cluster)
    client = make_client(cluster.url, cluster=True, connect_timeout_s=1.0, socket_timeout_s=1.0)
    fs = FeatureStore(client, SCHEMA)
    for user in range(10):  # a request reads one master (its user's): the users span all three
        await fs.fetch(f"u{user}", ITEMS)
    ours = _cluster_clients(cluster) - before  # connections of earlier tests may close meanwhile
    assert len({port for port, _ in ours}) == len(cluster.nodes)  # one or more per master
    await close_client(client)
    end = time.monotonic() + 5
    while left := ours & _cluster_clients(cluster):
        assert time.monotonic() < end, f"the cluster client left connections open: {left}"
        time.sleep(0.02)


async def test_cluster_node_down_is_a_typed_error(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    load_tables(cluster_client, SCHEMA, users_table(), items_table())
    fs = FeatureStore(
        make_client(cluster.url, cluster=True, connect_timeout_s=1.0, socket_timeout_s=1.0), SCHEMA
    )
    victim = cluster.nodes[2]
    try:
        await fs.fetch("u1", ITEMS)
        victim.kill()
        t0 = time.perf_counter()
        with pytest.raises(FeatureStoreUnavailable, match="connection"):
            await fs.fetch("u1", ITEMS, timeout_s=0.5)
        assert time.perf_counter() - t0 < 0.6
    finally:
        victim.start()  # same port and dir (nodes.conf): it rejoins with its slots
        await fs.aclose()
    cluster.wait_ok()


def _reads_per_node(cluster: RedisClusterServer) -> dict[int, int]:
    """MGET + GET calls each master has executed so far (INFO commandstats)."""
    out = {}
    for node in cluster.nodes:
        raw = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)
        try:
            stats = raw.info("commandstats")
        finally:
            raw.close()
        out[node.port] = sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
                             for c in ("mget", "get"))
    return out


async def test_a_request_reads_one_master_and_matches_the_sharded_layout(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    rep = load_tables(cluster_client, SCHEMA, users_table(), items_table())
    assert len(set(rep.replica_tags.values())) == 3  # a tag per master
    client = make_client(cluster.url, cluster=True, connect_timeout_s=1.0, socket_timeout_s=1.0)
    # the check of the copies against the global pointers: once per master here (warm-up)
    replicated = FeatureStore(client, SCHEMA, copy_check_interval_s=3600)
    sharded = FeatureStore(client, SCHEMA, cluster_layout="sharded")
    try:
        for user in range(10):  # learn the loads; every master's copies checked once
            await replicated.fetch(f"u{user}", ["i0"])
        for user in [f"u{u}" for u in range(10)] + ["nobody"]:
            before = _reads_per_node(cluster)
            got = await replicated.fetch(user, [*ITEMS, "unknown"], timeout_s=1.0)
            after = _reads_per_node(cluster)
            moved = {port: after[port] - before[port] for port in after}
            # one MGET (+ one GET of the user) on one master, nothing anywhere else
            assert sorted(moved.values()) == [0, 0, 2], moved
            want = await sharded.fetch(user, [*ITEMS, "unknown"], timeout_s=1.0)
            for name, arr in want.inputs.items():
                np.testing.assert_array_equal(got.inputs[name], arr, err_msg=f"{user} {name}")
            assert got.user_defaulted == want.user_defaulted == (user == "nobody")
            np.testing.assert_array_equal(got.item_defaulted_mask, want.item_defaulted_mask)
    finally:
        await close_client(client)


async def test_a_missing_copy_falls_back_to_the_sharded_layout_and_is_counted(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    from tests.service.helpers import metric

    rep = load_tables(cluster_client, SCHEMA, users_table(), items_table(), replicate_items=False)
    assert rep.replica_tags == {}
    fs = FeatureStore(
        make_client(cluster.url, cluster=True, connect_timeout_s=1.0, socket_timeout_s=1.0), SCHEMA
    )
    label = {"reason": "copy_missing"}
    try:
        before = metric("ranker_featurestore_cluster_fallbacks_total", label)
        res = await fs.fetch("u3", [*ITEMS, "unknown"], timeout_s=1.0)
        res = await fs.fetch("u3", [*ITEMS, "unknown"], timeout_s=1.0)
        # never a silent default: the sharded records are read, and the fallback is counted
        np.testing.assert_array_equal(res.inputs["item_cat"][:30], _expected_item_cat())
        assert not res.user_defaulted and res.items_defaulted == 1
        assert metric("ranker_featurestore_cluster_fallbacks_total", label) >= before + 1
        # a load with copies heals it: the next requests read one master again
        load_tables(cluster_client, SCHEMA, users_table(), items_table())
        await fs.fetch("u3", ITEMS)
        after = metric("ranker_featurestore_cluster_fallbacks_total", label)
        res = await fs.fetch("u3", [*ITEMS, "unknown"], timeout_s=1.0)
        np.testing.assert_array_equal(res.inputs["item_cat"][:30], _expected_item_cat())
        assert metric("ranker_featurestore_cluster_fallbacks_total", label) == after
    finally:
        await fs.aclose()


async def test_nothing_loaded_on_a_cluster_defaults_everything(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    fs = FeatureStore(
        make_client(cluster.url, cluster=True, connect_timeout_s=1.0, socket_timeout_s=1.0), SCHEMA
    )
    try:
        for _ in range(2):  # the second read trusts the verified (empty) copy
            res = await fs.fetch("u3", ITEMS[:5], timeout_s=1.0)
            assert res.user_defaulted and res.items_defaulted == 5
    finally:
        await fs.aclose()


def _migrate_slot(cluster: RedisClusterServer, slot: int, source: int, target: int) -> None:
    """Move one slot and its keys from master port `source` to master port `target`
    (CLUSTER SETSLOT IMPORTING / MIGRATING, MIGRATE, SETSLOT NODE on every master)."""
    def conn(port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)

    src, dst = conn(source), conn(target)
    try:
        src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for node in cluster.nodes:
            c = conn(node.port)
            try:
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
            finally:
                c.close()
    finally:
        src.close()
        dst.close()


async def test_a_moved_copy_is_followed_and_never_defaults(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    """Reshard the slot of one master's replica tag to another master under a live reader: the
    request hit by MOVED refreshes the slot map and reads the sharded layout, later ones read
    the sharded layout where the copy is missing (counted), and a re-load heals it."""
    from service.featurestore.keys import key_slot
    from tests.service.helpers import metric

    rep = load_tables(cluster_client, SCHEMA, users_table(), items_table())
    client = make_client(cluster.url, cluster=True, connect_timeout_s=1.0, socket_timeout_s=1.0)
    fs = FeatureStore(client, SCHEMA)
    users = [f"u{u}" for u in range(10)]
    try:
        want = {u: (await fs.fetch(u, ITEMS, timeout_s=1.0)).inputs for u in users}
        owner, tag = next(iter(rep.replica_tags.items()))
        source = int(owner.rsplit(":", 1)[1])
        target = next(n.port for n in cluster.nodes if n.port != source)
        refreshes = metric("ranker_featurestore_topology_refreshes_total", {"reason": "moved"})
        _migrate_slot(cluster, key_slot(tag.encode()), source, target)
        for _ in range(2):
            for u in users:
                got = await fs.fetch(u, ITEMS, timeout_s=1.0)
                assert not got.user_defaulted and got.items_defaulted == 0, u
                for name, arr in want[u].items():
                    np.testing.assert_array_equal(got.inputs[name], arr, err_msg=f"{u} {name}")
        assert metric("ranker_featurestore_topology_refreshes_total",
                      {"reason": "moved"}) >= refreshes + 1
        again = load_tables(cluster_client, SCHEMA, users_table(), items_table())
        assert again.load_id == rep.load_id and len(set(again.replica_tags.values())) == 3
        # the pointer copies under the tag that lost its master are gone, the others current
        copies = {k.decode().split(":")[1] for k in cluster_client.scan_iter(
            match=f"rk:{{r*}}:{SCHEMA.version}:current:*", target_nodes=RedisCluster.PRIMARIES)}
        assert copies == {f"{{{t}}}" for t in again.replica_tags.values()}
        fallbacks = metric("ranker_featurestore_cluster_fallbacks_total",
                           {"reason": "copy_missing"})
        for u in users:
            got = await fs.fetch(u, ITEMS, timeout_s=1.0)
            np.testing.assert_array_equal(got.inputs["item_cat"], want[u]["item_cat"])
        assert metric("ranker_featurestore_cluster_fallbacks_total",
                      {"reason": "copy_missing"}) == fallbacks
    finally:
        await close_client(client)


async def test_copies_naming_another_load_than_the_pointers_are_not_trusted(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    """A load without copies after one with (an old writer; likewise a manual roll-back of the
    global pointers): the copies still name the first load; the periodic check of the global
    pointers sees it and those masters are read through the sharded layout (the new load)."""
    from tests.service.helpers import metric

    load_tables(cluster_client, SCHEMA, users_table(), items_table())
    client = make_client(cluster.url, cluster=True, connect_timeout_s=1.0, socket_timeout_s=1.0)
    fs = FeatureStore(client, SCHEMA, copy_check_interval_s=0.0)
    label = {"reason": "copy_stale"}
    scaled = (np.log1p(3.0) - 1.5) / 0.8  # u1's activity x3, encoded (as in the switch test)
    try:
        await fs.fetch("u1", ["i1"])
        second = load_tables(cluster_client, SCHEMA, users_table(activity_scale=3.0),
                             items_table(), replicate_items=False)
        before = metric("ranker_featurestore_cluster_fallbacks_total", label)
        for _ in range(3):
            res = await fs.fetch("u1", ["i1"], timeout_s=1.0)
            np.testing.assert_allclose(res.inputs["user_dense"], [[scaled]], rtol=1e-6)
        assert fs.load_ids == {"user": second.load_id, "item": second.load_id}
        assert metric("ranker_featurestore_cluster_fallbacks_total", label) >= before + 1
        # a load with copies: the check finds them current again, no more fallbacks
        load_tables(cluster_client, SCHEMA, users_table(activity_scale=3.0), items_table())
        await fs.fetch("u1", ["i1"])
        after = metric("ranker_featurestore_cluster_fallbacks_total", label)
        res = await fs.fetch("u1", ["i1"], timeout_s=1.0)
        np.testing.assert_allclose(res.inputs["user_dense"], [[scaled]], rtol=1e-6)
        assert metric("ranker_featurestore_cluster_fallbacks_total", label) == after
    finally:
        await close_client(client)


async def test_a_load_without_copies_after_nothing_loaded_is_still_read(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    """The reader remembered "nothing loaded" for a master; a load without copies arrives:
    the check of the global pointers forgets it, and the load is read (never defaults)."""
    fs = FeatureStore(
        make_client(cluster.url, cluster=True, connect_timeout_s=1.0, socket_timeout_s=1.0),
        SCHEMA, copy_check_interval_s=0.0)
    try:
        for _ in range(2):
            assert (await fs.fetch("u3", ITEMS[:5], timeout_s=1.0)).user_defaulted
        load_tables(cluster_client, SCHEMA, users_table(), items_table(), replicate_items=False)
        res = await fs.fetch("u3", ITEMS, timeout_s=1.0)
        np.testing.assert_array_equal(res.inputs["user_cat"], [[4, 4]])
        np.testing.assert_array_equal(res.inputs["item_cat"], _expected_item_cat())
    finally:
        await fs.aclose()


async def test_no_node_reachable_is_a_typed_error(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    """A client that cannot reach any node for the slot map (redis-py raises
    RedisClusterException, which is not a RedisError) gets FeatureStoreUnavailable, not an
    untyped error (the service would answer 500)."""
    load_tables(cluster_client, SCHEMA, users_table(), items_table())
    for node in cluster.nodes:
        node.kill()
    fs = FeatureStore(
        make_client(cluster.url, cluster=True, connect_timeout_s=0.2, socket_timeout_s=0.2), SCHEMA
    )
    try:
        with pytest.raises(FeatureStoreUnavailable, match="connection"):
            await fs.fetch("u1", ITEMS, timeout_s=2.0)
        assert await fs.ping() is False
    finally:
        for node in cluster.nodes:
            node.start()  # same ports and nodes.conf: the cluster comes back as it was
        await fs.aclose()
    cluster.wait_ok()


def test_a_batch_on_a_stale_slot_map_follows_moved_and_loses_nothing(
    cluster: RedisClusterServer, cluster_client: RedisCluster
) -> None:
    """The loader's writer sends each master its records as packed SETs on the slot map it
    holds; a slot moved behind its back (MOVED replies) makes it refresh the map and rewrite
    the batch through the pipeline: every record lands, on the master that now owns it."""
    from service.featurestore.bulk import BatchWriter
    from service.featurestore.keys import key_slot

    ids = [f"e{i}" for i in range(200)]
    blob = b"".join(i.encode().ljust(8, b".") for i in ids)
    moved = (b"stale:" + ids[0].encode())
    source = cluster_client.get_node_from_key(moved).port
    target = next(n.port for n in cluster.nodes if n.port != source)
    writer = BatchWriter(cluster_client, None)
    writer.write("stale:", ids[:100], blob[:800], 8, progress=("stale:progress", 100))
    _migrate_slot(cluster, key_slot(moved), source, target)  # cluster_client does not know
    writer.write("stale:", ids, blob, 8, progress=("stale:progress", 200))
    writer.close()
    owner = redis.Redis(host="127.0.0.1", port=target, socket_timeout=5)
    try:
        assert owner.get(moved) == b"e0......"  # written where the slot lives now
    finally:
        owner.close()
    fresh = make_sync_client(cluster.url)
    try:
        assert [fresh.get("stale:" + i) for i in ids] == [
            i.encode().ljust(8, b".") for i in ids]
        assert fresh.get("stale:progress") == b"200"
    finally:
        fresh.close()


def test_a_load_with_a_ttl_sets_it_on_every_master(cluster_client: RedisCluster) -> None:
    rep = load_tables(cluster_client, SCHEMA, users_table(), items_table(), ttl_s=600)
    prefix = record_key_prefix("rk", SCHEMA.version, rep.load_id, "item")
    owners = {cluster_client.get_node_from_key(prefix + i).port for i in ITEMS}
    assert len(owners) == 3
    ttls = [cluster_client.ttl(prefix + i) for i in ITEMS]
    assert all(0 < t <= 600 for t in ttls), ttls
