"""Overload, deadlines and Redis faults, caused for real: a paused (CLIENT PAUSE) or killed
redis-server under a real uvicorn process with real traffic, every outcome counted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aredis

from launch.local_redis import RedisServer
from tests.reliability.conftest import rank_body
from tests.reliability.oracle import Oracle
from tests.reliability.procs import post_json, run_load
from tests.reliability.test_readiness_swap import metric_value
from tests.support import ServerProcess, service_env


def pause_redis(url: str, ms: int) -> None:
    """Make redis-server hold every client's commands for `ms` (a stall, not a crash)."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.client_pause(ms, all=True)
    finally:
        client.close()


async def test_overload_rejected_at_once_with_retry_after(
    model_repo: Path, live_redis: RedisServer
) -> None:
    env = service_env(model_repo, live_redis.url, max_inflight=2, request_timeout_s=3.0,
                      redis_socket_timeout_s=2.0, retry_after_s=2)
    with ServerProcess(env) as server:
        pause_redis(live_redis.url, 1000)  # the two admitted requests wait on Redis
        t0 = time.perf_counter()
        res = await run_load(server.url, post_json("/rank", rank_body), total=12,
                             concurrency=12, duration_s=10)
        wall = time.perf_counter() - t0
        over = [lat for lat in res.latencies_s if lat < 0.5]
    print(res.summary())
    assert res.answered == res.sent == 12
    assert res.by_status[200] == 2 and res.by_status[503] == 10, res.summary()
    assert len(over) >= 10, "the rejected ones were answered at once, not queued"
    assert wall < 3.0


async def test_overload_body_and_header(model_repo: Path, live_redis: RedisServer) -> None:
    env = service_env(model_repo, live_redis.url, max_inflight=1, request_timeout_s=3.0,
                      redis_socket_timeout_s=2.0, retry_after_s=2)
    with ServerProcess(env) as server:
        pause_redis(live_redis.url, 800)
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as c:
            held = asyncio.create_task(c.post("/rank", json=rank_body(0)))
            await asyncio.sleep(0.2)
            extra = await c.post("/rank", json=rank_body(1))
            assert (await held).status_code == 200
    assert extra.status_code == 503
    assert extra.json()["error"] == "overloaded"
    assert int(extra.headers["retry-after"]) >= 1


@pytest.mark.parametrize("mode", ["fail", "degrade"])
async def test_redis_stall_answered_within_deadline(
    mode: str, model_repo: Path, live_redis: RedisServer
) -> None:
    timeout = 0.3
    env = service_env(model_repo, live_redis.url, request_timeout_s=timeout,
                      redis_socket_timeout_s=2.0, redis_failure_mode=mode)
    with ServerProcess(env) as server:
        pause_redis(live_redis.url, 1500)
        res = await run_load(server.url, post_json("/rank", rank_body), total=16,
                             concurrency=8, duration_s=10)
        bodies = []
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as c:
            for i in range(3):
                bodies.append(await c.post("/rank", json=rank_body(100 + i)))
    print(mode, res.summary(), f"max {res.max_s():.3f}s")
    assert res.answered == res.sent == 16
    assert res.max_s() < timeout + 0.4, "a request was served late"
    if mode == "fail":
        assert set(res.by_status) == {503}
        r = bodies[0]
        assert r.status_code == 503 and r.json()["error"] in (
            "deadline_exceeded", "feature_store_unavailable")
        assert "retry-after" in r.headers
    else:
        assert set(res.by_status) == {200}
        assert bodies[0].json()["degraded"] is True


async def connected_clients(url: str, samples: list[int], stop: asyncio.Event) -> None:
    """Poll INFO clients every 50 ms until `stop` (errors while Redis is down are skipped)."""
    client = aredis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2)
    try:
        while not stop.is_set():
            with contextlib.suppress(redis.RedisError, OSError):
                info = await client.info("clients")
                samples.append(int(info["connected_clients"]) - 1)  # minus this poller
            await asyncio.sleep(0.05)
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


@pytest.mark.parametrize("mode", ["fail", "degrade"])
async def test_redis_killed_mid_load_then_restarted(
    mode: str, model_repo: Path, live_redis: RedisServer, oracle: Oracle
) -> None:
    timeout, max_conns = 0.5, 8
    env = service_env(model_repo, live_redis.url, request_timeout_s=timeout,
                      redis_connect_timeout_s=0.05, redis_socket_timeout_s=0.1,
                      redis_failure_mode=mode, redis_max_connections=max_conns)
    sent: dict[int, dict[str, Any]] = {}
    seen: list[tuple[float, int, dict[str, Any]]] = []

    def body_of(i: int) -> dict[str, Any]:
        sent[i] = rank_body(i)
        return sent[i]

    def check(i: int, resp: httpx.Response) -> None:
        body = resp.json()
        seen.append((time.monotonic(), resp.status_code, body))
        if resp.status_code == 200:  # the ranking of THIS request's user and items
            oracle.check(body, sent[i]["user_id"], sent[i]["candidates"])
        else:
            assert resp.status_code == 503, resp.text[:200]
            assert body["error"] in ("feature_store_unavailable", "deadline_exceeded"), body
            assert "retry-after" in resp.headers

    with ServerProcess(env) as server:
        stop = asyncio.Event()
        samples: list[int] = []
        poller = asyncio.create_task(connected_clients(live_redis.url, samples, stop))
        load = asyncio.create_task(run_load(
            server.url, post_json("/rank", body_of), total=50_000, concurrency=8,
            duration_s=4.0, timeout_s=5.0, check=check))
        await asyncio.sleep(1.0)
        killed_at = time.monotonic()
        await asyncio.to_thread(live_redis.kill)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(live_redis.start)  # same port and dir: dump.rdb is reloaded
        restarted_at = time.monotonic()
        res = await load
        stop.set()
        await poller
        text = httpx.get(server.url + "/metrics", timeout=5).text
    print(mode, res.summary(), f"max latency {res.max_s():.3f}s, redis clients max "
          f"{max(samples, default=-1)}")
    assert res.errors == {} and res.answered == res.sent, "every request got an answer"
    assert res.problems == [], res.problems[:5]
    # server side (its own histogram): none past the next bucket after the deadline (1.0 s);
    # client side (shares 2 cores with the server and redis-server): nothing hangs
    total = metric_value(text, "ranker_request_duration_seconds_count", 'route="/rank"')
    over = {le: total - metric_value(text, "ranker_request_duration_seconds_bucket",
                                     f'le="{le}",route="/rank"') for le in ("0.5", "1.0")}
    print(f"server side: requests over 0.5 s: {over['0.5']:.0f}, over 1.0 s: {over['1.0']:.0f}")
    assert over["1.0"] == 0, f"{over['1.0']} requests took the server more than 1.0 s"
    assert res.max_s() < timeout + 1.5, "a request hung"
    during = [s for t, s, _ in seen if killed_at + 0.1 < t < restarted_at]
    after = [(t, s, b) for t, s, b in seen if t > restarted_at]
    assert during, "the outage was hit"
    if mode == "fail":
        assert 503 in during
    else:
        assert set(during) == {200}
        assert any(b.get("degraded") for t, s, b in seen if killed_at + 0.1 < t < restarted_at)
    healthy = [t for t, s, b in after if s == 200 and not b.get("degraded")]
    assert healthy, "never recovered"
    recovery = healthy[0] - restarted_at
    print(f"recovered {recovery:.3f}s after restart")
    assert recovery < 3.0
    late = [(s, b.get("degraded")) for t, s, b in after if t > restarted_at + recovery + 0.5]
    good = sum(1 for s, d in late if s == 200 and not d)
    # >= 90%: with a 0.1 s socket timeout on 2 shared cores a stray timeout can still happen
    assert late and good >= 0.9 * len(late), f"recovery did not stick: {good}/{len(late)}"
    assert samples and max(samples) <= max_conns + 1, f"Redis connections {max(samples)}"


@pytest.mark.slow
async def test_redis_chaos_report(
    model_repo: Path, live_redis: RedisServer, oracle: Oracle
) -> None:
    """Chaos: 6 cycles of SIGKILL / 1 s down / restart under 8 clients for ~20 s (fail mode);
    writes runs/reliability/chaos.json with the counts and the worst latency."""
    import json
    import os

    timeout = 0.5
    env = service_env(model_repo, live_redis.url, request_timeout_s=timeout,
                      redis_connect_timeout_s=0.05, redis_socket_timeout_s=0.1,
                      redis_max_connections=8)
    sent: dict[int, dict[str, Any]] = {}

    def body_of(i: int) -> dict[str, Any]:
        sent[i] = rank_body(i)
        return sent[i]

    def check(i: int, resp: httpx.Response) -> None:
        if resp.status_code == 200:
            oracle.check(resp.json(), sent[i]["user_id"], sent[i]["candidates"])
        else:
            assert resp.status_code == 503, resp.text[:200]

    with ServerProcess(env) as server:
        stop = asyncio.Event()
        samples: list[int] = []
        poller = asyncio.create_task(connected_clients(live_redis.url, samples, stop))
        load = asyncio.create_task(run_load(
            server.url, post_json("/rank", body_of), total=200_000, concurrency=8,
            duration_s=20.0, timeout_s=5.0, check=check))
        for _ in range(6):
            await asyncio.sleep(1.5)
            await asyncio.to_thread(live_redis.kill)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(live_redis.start)
        res = await load
        stop.set()
        await poller
        text = httpx.get(server.url + "/metrics", timeout=5).text
    # server-side truth: /rank requests the service itself took longer than the deadline over
    over = metric_value(text, "ranker_request_duration_seconds_count", 'route="/rank"') - \
        metric_value(text, "ranker_request_duration_seconds_bucket", 'le="0.5",route="/rank"')
    report = {"server_side_over_deadline": int(over), "sent": res.sent,
              "by_status": {str(k): v for k, v in res.by_status.items()},
              "unanswered": dict(res.errors), "wrong_scores": len(res.problems),
              "max_latency_s": round(res.max_s(), 3), "median_latency_s": round(res.median_s(), 4),
              "max_redis_clients": max(samples, default=-1), "cycles": 6, "deadline_s": timeout}
    out = Path(os.environ.get("RANKER_REPORT_DIR", "runs/reliability"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=1))
    print(report)
    assert res.errors == {} and res.problems == [], res.summary()
    assert res.max_s() < timeout + 0.5
    assert max(samples) <= 8 + 1
