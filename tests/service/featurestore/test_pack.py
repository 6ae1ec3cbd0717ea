"""The reader's own MGET packing: the bytes redis-py would send, and right on a real server."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.connection import PythonRespSerializer

from service.featurestore.reader import make_client, mget_packed, pack_mget

ODD_IDS = ["i1", "ünï", "日本", "with space", "nul\x00inside", "", "a" * 300, "i1x"]


def redis_py_packing(*args: str) -> bytes:
    """redis-py's own (pure Python) RESP encoding of a command."""
    serializer = PythonRespSerializer(6000, lambda v: v.encode() if isinstance(v, str) else v)
    return b"".join(serializer.pack(*args))


@pytest.mark.parametrize("ids", [[], ["i1"], [f"item{i}" for i in range(500)], ODD_IDS[:4],
                                 ODD_IDS])
@pytest.mark.parametrize("head", [["rk:v:current"], ["rk:v:current", "rk:v:L:u:ü1"]])
def test_same_bytes_as_redis_py(head: list[str], ids: list[str]) -> None:
    prefix = "rk:v:L:i:"
    want = redis_py_packing("MGET", *head, *[prefix + i for i in ids])
    assert pack_mget(head, prefix, ids) == want


async def test_real_server_returns_each_value_in_order(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    prefix = "packtest:i:"
    try:
        sync.delete("packtest:head", *[prefix + i for i in ODD_IDS])
        sync.set("packtest:head", b"H")
        for n, i in enumerate(ODD_IDS[:-1]):  # the last one stays missing
            sync.set(prefix + i, f"v{n}".encode())
    finally:
        sync.close()
    client = make_client(redis_url, socket_timeout_s=1.0, connect_timeout_s=1.0)
    try:
        got = await mget_packed(client, pack_mget(["packtest:head"], prefix, ODD_IDS))
        want = [b"H", *[f"v{n}".encode() for n in range(len(ODD_IDS) - 1)], None]
        assert got == want
        # the connection went back to the pool healthy: a plain command works on it
        assert await client.get("packtest:head") == b"H"
    finally:
        await client.aclose()


async def test_cancelled_mid_command_does_not_poison_the_pool(redis_url: str) -> None:
    """A cancellation can leave a half-read reply; the next MGET must not read it."""
    client = make_client(redis_url, socket_timeout_s=1.0, connect_timeout_s=1.0,
                         max_connections=1)
    sync = redis.Redis.from_url(redis_url)
    try:
        sync.set("packtest:a", b"A")
        sync.set("packtest:b", b"B")
        big = pack_mget(["packtest:a"], "packtest:none:", [str(i) for i in range(200_000)])
        task = asyncio.ensure_future(mget_packed(client, big))
        await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = await mget_packed(client, pack_mget(["packtest:b"]))
        assert got == [b"B"]
    finally:
        sync.close()
        await client.aclose()
