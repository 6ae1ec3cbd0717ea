"""Limits before work: 413 (with and without Content-Length) and 422 for too many candidates,
answered before any Redis call, with flat memory under a stream of them (real uvicorn)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson

from launch.local_redis import RedisServer
from tests.reliability.procs import run_load
from tests.support import ServerProcess, redis_command_calls, service_env

MAX_BODY = 4096
MAX_CANDIDATES = 50


def redis_calls(url: str) -> int:
    """Commands that touch features (MGET, GET) executed by the server so far."""
    return redis_command_calls(url, "mget", "get")


def big_body(n_bytes: int) -> bytes:
    ids = [f"i{j % 60}-{j}" for j in range(n_bytes // 8)]
    return orjson.dumps({"user_id": "u1", "candidates": ids})


async def chunks(data: bytes, size: int = 1024) -> AsyncIterator[bytes]:
    for k in range(0, len(data), size):
        yield data[k : k + size]


async def send_hostile(client: httpx.AsyncClient, i: int) -> httpx.Response:
    """Three kinds in turn: sized oversize body, chunked oversize body, too many candidates."""
    kind = i % 3
    if kind == 0:
        return await client.post("/rank", content=big_body(20_000),
                                 headers={"content-type": "application/json"})
    if kind == 1:  # no Content-Length: Transfer-Encoding: chunked
        return await client.post("/rank", content=chunks(big_body(20_000)),
                                 headers={"content-type": "application/json"})
    ids = [f"i{j}" for j in range(MAX_CANDIDATES + 1)]
    return await client.post("/rank", json={"user_id": "u1", "candidates": ids})


async def test_413_and_422_before_any_redis_call_with_flat_memory(
    model_repo: Path, live_redis: RedisServer
) -> None:
    env = service_env(model_repo, live_redis.url, max_body_bytes=MAX_BODY,
                      max_candidates=MAX_CANDIDATES)
    with ServerProcess(env) as server:
        calls_before = redis_calls(live_redis.url)
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as c:
            sized = await send_hostile(c, 0)
            chunked = await send_hostile(c, 1)
            many = await send_hostile(c, 2)
        assert sized.status_code == 413, sized.text
        assert chunked.status_code == 413, chunked.text
        for r in (sized, chunked):
            assert r.json()["error"] == "payload_too_large"
            assert f"at most {MAX_BODY} bytes" in r.text
        assert many.status_code == 422
        assert many.json()["detail"][0]["field"] == "candidates"
        assert f"at most {MAX_CANDIDATES}" in many.json()["detail"][0]["message"]

        warm = await run_load(server.url, send_hostile, total=150, concurrency=4, duration_s=30)
        rss_warm = server.rss_kib()
        stream = await run_load(server.url, send_hostile, total=600, concurrency=4, duration_s=60)
        rss_after = server.rss_kib()
        calls_after = redis_calls(live_redis.url)
    print(f"{stream.summary()} RSS {rss_warm} -> {rss_after} KiB")
    assert warm.answered == warm.sent and stream.answered == stream.sent == 600
    assert set(stream.by_status) == {413, 422}, stream.summary()
    assert calls_after == calls_before, "a rejected request reached Redis"
    assert rss_after - rss_warm < 8 * 1024, f"RSS grew {rss_after - rss_warm} KiB"


async def test_slow_client_body_gets_deadline_exceeded(
    model_repo: Path, live_redis: RedisServer
) -> None:
    """A client dribbling its body is answered at the whole-request deadline, not waited for.

    A raw socket, because an HTTP client would only read the answer after sending all of it.
    """
    env = service_env(model_repo, live_redis.url, request_timeout_s=0.5,
                      request_hard_timeout_s=0.6)
    with ServerProcess(env) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        first = b'{"user_id": "u1", "candidates": ['
        writer.write(b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        t0 = time.perf_counter()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)  # never finishes body
        took = time.perf_counter() - t0
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        body = orjson.loads(await asyncio.wait_for(reader.readexactly(length), 2.0))
        writer.close()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
            ok = await c.post("/rank", json={"user_id": "u1", "candidates": ["i1"]})
            text = (await c.get("/metrics")).text
    assert head.startswith(b"HTTP/1.1 503"), head
    assert body["error"] == "deadline_exceeded", body
    assert 0.5 < took < 0.6 + 0.4, f"answered after {took:.2f}s"
    assert ok.status_code == 200
    assert 'ranker_rejected_requests_total{reason="deadline"}' in text
