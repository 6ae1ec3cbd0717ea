"""Overload, deadlines and Redis faults, caused for real: a paused (CLIENT PAUSE) or killed
redis-server under a real uvicorn process with real traffic, every outcome counted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aredis

from launch.local_redis import RedisServer
from tests.reliability.conftest import rank_body
from tests.reliability.oracle import Oracle
from tests.reliability.procs import metric_value, post_json, run_load, wait_for, wait_inflight
from tests.support import ServerProcess, service_env


@contextlib.contextmanager
def stalled(server: RedisServer) -> Iterator[None]:
    """redis-server stopped (SIGSTOP) for the block, then resumed (SIGCONT), however it ends.

    A stall whose end the test chooses: every client's command waits, nothing is refused. (On
    the redis-server 6.2 the tests use, CLIENT UNPAUSE is itself held by CLIENT PAUSE ALL, so a
    pause cannot be ended early; its length would be a fixed sleep.)
    """
    assert server.pid is not None and server.running
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


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
    env = service_env(model_repo, live_redis.url, max_inflight=2, request_timeout_s=8.0,
                      redis_socket_timeout_s=8.0, retry_after_s=2)
    with ServerProcess(env) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as c:
            with stalled(live_redis):  # the two admitted requests wait on Redis till the end
                held = [asyncio.create_task(c.post("/rank", json=rank_body(i))) for i in (0, 1)]
                await wait_inflight(server.url, 2)
                res = await run_load(server.url, post_json("/rank", rank_body), total=10,
                                     concurrency=10, duration_s=20)
                # answered while both admitted ones were still held: refused at once, not queued
                still_held = [not t.done() for t in held]
            done = await asyncio.gather(*held)
    print(res.summary())
    assert res.answered == res.sent == 10
    assert res.by_status == {503: 10}, res.summary()
    assert still_held == [True, True]
    assert [r.status_code for r in done] == [200, 200], [r.text[:100] for r in done]


async def test_overload_body_and_header(model_repo: Path, live_redis: RedisServer) -> None:
    env = service_env(model_repo, live_redis.url, max_inflight=1, request_timeout_s=8.0,
                      redis_socket_timeout_s=8.0, retry_after_s=2)
    with ServerProcess(env) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as c:
            with stalled(live_redis):
                held = asyncio.create_task(c.post("/rank", json=rank_body(0)))
                await wait_inflight(server.url, 1)
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
        with stalled(live_redis):  # stalled for the whole load, however long it takes
            res = await run_load(server.url, post_json("/rank", rank_body), total=16,
                                 concurrency=8, duration_s=20)
            bodies = []
            async with httpx.AsyncClient(base_url=server.url, timeout=5) as c:
                for i in range(3):
                    bodies.append(await c.post("/rank", json=rank_body(100 + i)))
        text = httpx.get(server.url + "/metrics", timeout=5).text
    print(mode, res.summary(), f"max {res.max_s():.3f}s")
    assert res.answered == res.sent == 16
    # by the server's own clock: every answer within the backstop (2 x 0.3 s) and its bucket
    total = metric_value(text, "ranker_request_duration_seconds_count", 'route="/rank"')
    within = metric_value(text, "ranker_request_duration_seconds_bucket",
                          'le="1.0",route="/rank"')
    assert total == within == 16 + 3, f"{total - within} answered later than 1.0 s"
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
            await asyncio.sleep(0.05)  # the sampling interval of a sampler, not a wait
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
        done = asyncio.Event()
        load = asyncio.create_task(run_load(
            server.url, post_json("/rank", body_of), total=50_000, concurrency=8,
            duration_s=60.0, timeout_s=5.0, check=check, stop=done))

        def answers_after(t: float) -> int:
            return sum(1 for seen_at, _, _ in list(seen) if seen_at > t)

        # each phase lasts until it has enough answers in it (bounded), not a fixed time
        await wait_for(lambda: answers_after(0) >= 40, "answers before the kill", 30)
        killed_at = time.monotonic()
        await asyncio.to_thread(live_redis.kill)
        await wait_for(lambda: answers_after(killed_at + 0.1) >= 40, "answers in the outage", 30)
        await asyncio.to_thread(live_redis.start)  # same port and dir: dump.rdb is reloaded
        restarted_at = time.monotonic()
        # past any recovery the test accepts (3 s) plus 0.5 s, enough answers to judge it by
        await wait_for(lambda: answers_after(restarted_at + 3.5) >= 40, "answers after", 30)
        done.set()
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


async def loop_lag(lags: list[float], stop: asyncio.Event, tick_s: float = 0.01) -> None:
    """How late this (the client's) event loop wakes up: time the client lost, not the server."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(tick_s)  # the probe itself: how late does this wake up?
        lags.append(loop.time() - t - tick_s)


@pytest.mark.slow
async def test_redis_chaos_report(
    model_repo: Path, live_redis: RedisServer, oracle: Oracle
) -> None:
    """Chaos: 6 cycles of SIGKILL / 1 s down / restart under 8 clients for ~20 s (fail mode);
    writes runs/reliability/chaos.json with the counts and the worst latency, seen by the
    server (its own histogram) and by the client (with the client's own event-loop lag).

    The 1.56 s once measured here was the client's: with one httpx pool shared by the 8
    workers, a request lost the race for a released connection dozens of times in a row
    (encode/httpcore#822) before it was even sent, while the server's histogram had nothing
    over 0.5 s. `run_load` now gives each worker its own connection."""
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
        lags: list[float] = []
        poller = asyncio.create_task(connected_clients(live_redis.url, samples, stop))
        lagger = asyncio.create_task(loop_lag(lags, stop))
        load = asyncio.create_task(run_load(
            server.url, post_json("/rank", body_of), total=200_000, concurrency=8,
            duration_s=20.0, timeout_s=5.0, check=check))
        for _ in range(6):
            # fixed phases on purpose: the schedule IS the experiment (up 1.5 s, down 1 s);
            # nothing below counts requests per phase, so a slow phase cannot fail it
            await asyncio.sleep(1.5)
            await asyncio.to_thread(live_redis.kill)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(live_redis.start)
        res = await load
        stop.set()
        await asyncio.gather(poller, lagger)
        text = httpx.get(server.url + "/metrics", timeout=5).text
    # server-side truth: /rank requests the service itself took longer than the deadline over
    total = metric_value(text, "ranker_request_duration_seconds_count", 'route="/rank"')
    over = {le: int(total - metric_value(text, "ranker_request_duration_seconds_bucket",
                                         f'le="{le}",route="/rank"')) for le in ("0.5", "1.0")}
    report = {"server_side_over_deadline": over["0.5"], "server_side_over_1s": over["1.0"],
              "sent": res.sent, "by_status": {str(k): v for k, v in res.by_status.items()},
              "unanswered": dict(res.errors), "wrong_scores": len(res.problems),
              "max_latency_s": round(res.max_s(), 3), "median_latency_s": round(res.median_s(), 4),
              "client_loop_lag_max_s": round(max(lags, default=0.0), 3),
              "max_redis_clients": max(samples, default=-1), "cycles": 6, "deadline_s": timeout}
    out = Path(os.environ.get("RANKER_REPORT_DIR", "runs/reliability"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=1))
    print(report)
    assert res.errors == {} and res.problems == [], res.summary()
    # the server answers within its backstop (2 x the deadline), by its own clock
    assert over["1.0"] == 0, report
    # and the client sees it within the deadline plus 0.5 s of slack for 2 shared cores
    assert res.max_s() < timeout + 0.5, report
    assert max(samples) <= 8 + 1
