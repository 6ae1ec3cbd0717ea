"""The redis+sentinel:// URL of `make_client` (the failover itself: tests/reliability)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from launch.local_redis import RedisSentinelServer
from ranker.examples import tiny_schema
from service.featurestore.reader import FeatureStore, make_client, parse_sentinel_url
from service.featurestore.writer import load_tables
from tests.service.featurestore.tables import items_table, users_table


def test_sentinel_url_parsing() -> None:
    assert parse_sentinel_url("redis+sentinel://127.0.0.1:26379,10.0.0.2:26380/ranker") == (
        [("127.0.0.1", 26379), ("10.0.0.2", 26380)], "ranker", 0)
    assert parse_sentinel_url("redis+sentinel://:pw@s1/feats/2") == ([("s1", 26379)], "feats", 2)
    with pytest.raises(ValueError, match="service"):
        parse_sentinel_url("redis+sentinel://127.0.0.1:26379")


async def test_fetch_through_sentinel_and_close_every_connection() -> None:
    schema = tiny_schema()
    with RedisSentinelServer(replicas=0, sentinels=1) as setup:
        client = redis.Redis.from_url(setup.primary.url, socket_timeout=5)
        load_tables(client, schema, users_table(), items_table())
        fs = FeatureStore(make_client(setup.url, connect_timeout_s=1.0, socket_timeout_s=1.0),
                          schema)
        res = await fs.fetch("u3", ["i0", "i1", "nope"], timeout_s=1.0)
        np.testing.assert_array_equal(res.inputs["user_cat"], [[4, 4]])
        assert res.items_defaulted == 1 and not res.user_defaulted
        sentinel = redis.Redis(host="127.0.0.1", port=setup.sentinels[0].port, socket_timeout=5)
        me = str(sentinel.client_id())

        def others() -> set[str]:  # clients of the Sentinel but this one (the store's, now)
            return {str(c["id"]) for c in sentinel.client_list()} - {me}

        ours = others()
        assert ours, "the store asked the Sentinel for the primary"
        await fs.aclose()  # closes the data connections and those to the sentinels
        end = time.monotonic() + 5
        while left := ours & others():
            assert time.monotonic() < end, f"connections to the Sentinel left open: {left}"
            time.sleep(0.02)
        sentinel.close()
        client.close()
