"""Readiness and model swap, on a real uvicorn process with real traffic on loopback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from launch.local_redis import RedisServer
from tests.reliability.conftest import rank_body
from tests.reliability.oracle import Oracle
from tests.reliability.procs import LoadResult, post_json, run_load
from tests.support import ServerProcess, service_env
from tests.tiny import install_version


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of the exposition samples `name{...labels...}` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_not_ready_without_model_then_ready_after_install(
    tmp_path: Path, pristine_models: Path, live_redis: RedisServer
) -> None:
    repo = tmp_path / "models"
    (repo / "mmoe").mkdir(parents=True)  # empty repository: nothing to serve yet
    # generous Redis timeouts: this test is about readiness, not about a busy machine
    env = service_env(repo, live_redis.url, model_watch_interval_s=0.2, request_timeout_s=3.0,
                      redis_connect_timeout_s=1.0, redis_socket_timeout_s=1.0)
    with ServerProcess(env, ready_path="/healthz") as server:
        ready = httpx.get(server.url + "/readyz", timeout=2)
        assert ready.status_code == 503 and ready.json()["reason"] == "no model loaded"
        early = httpx.post(server.url + "/rank", json=rank_body(0), timeout=2)
        assert early.status_code == 503 and early.json()["error"] == "model_unavailable"
        install_version(pristine_models, repo, 1, source=1)
        waited = server.wait_ready(timeout_s=10, path="/readyz")  # the watcher loads it
        assert waited < 10
        first = httpx.post(server.url + "/rank", json=rank_body(1), timeout=2)
        assert first.status_code == 200, first.text
        assert first.json()["model"]["version"] == 1


async def test_first_requests_after_ready_are_not_much_slower(
    model_repo: Path, live_redis: RedisServer, oracle: Oracle
) -> None:
    env = service_env(model_repo, live_redis.url, warmup_batch_sizes=[1, 20])
    with ServerProcess(env) as server:
        # sequential, so the latencies are the service's and not the queue's
        first = await run_load(server.url, post_json("/rank", rank_body), total=20,
                               concurrency=1, duration_s=20)
        await run_load(server.url, post_json("/rank", rank_body), total=200, concurrency=1,
                       duration_s=20)
        steady = await run_load(server.url, post_json("/rank", rank_body), total=100,
                                concurrency=1, duration_s=20)
    assert first.by_status == {200: 20} and steady.by_status == {200: 100}, first.summary()
    print(f"first 20 median {first.median_s()*1e3:.2f} ms, steady median "
          f"{steady.median_s()*1e3:.2f} ms")
    # generous: a cold (un-warmed) session is many times slower on its first calls
    assert first.median_s() <= 3 * steady.median_s() + 0.002


async def test_swap_under_load_zero_failures_one_version_each(
    model_repo: Path, pristine_models: Path, live_redis: RedisServer, oracle: Oracle
) -> None:
    env = service_env(model_repo, live_redis.url, model_watch_interval_s=0.1)
    with ServerProcess(env) as server:
        bodies: dict[int, dict[str, Any]] = {}
        versions: list[tuple[float, int]] = []

        def body_of(i: int) -> dict[str, Any]:
            bodies[i] = rank_body(i)
            return bodies[i]

        def check(i: int, resp: httpx.Response) -> None:
            assert resp.status_code == 200, resp.text[:200]
            body = resp.json()
            versions.append((time.monotonic(), int(body["model"]["version"])))
            req = bodies[i]
            oracle.check(body, req["user_id"], req["candidates"])

        async def installer() -> None:
            await asyncio.sleep(0.5)
            install_version(pristine_models, model_repo, 2, source=2)
            await asyncio.sleep(1.0)
            # refused versions: the old one keeps serving
            install_version(pristine_models, model_repo, 3, source=2, corrupt="byte")
            await asyncio.sleep(0.6)
            install_version(pristine_models, model_repo, 4, source=2, corrupt="schema")

        load = asyncio.create_task(run_load(
            server.url, post_json("/rank", body_of), total=20_000, concurrency=4,
            duration_s=3.0, check=check))
        await installer()
        result: LoadResult = await load
        info = httpx.get(server.url + "/model", timeout=2).json()
        metrics_text = httpx.get(server.url + "/metrics", timeout=2).text
        reload_bad = httpx.post(server.url + "/admin/reload", params={"version": 3}, timeout=10)
    print(result.summary())
    assert result.failed == 0 and result.problems == [], result.summary()
    assert result.answered == result.sent and result.sent > 100
    seen = [v for _, v in versions]
    assert set(seen) == {1, 2}, "both versions served, nothing else"
    first_two = seen.index(2)
    assert all(v == 2 for v in seen[first_two + 4 * 2:]), "no flapping back after the swap"
    assert info["version"] == 2  # corrupt v3 and mismatched v4 refused, v2 still serving
    assert metric_value(metrics_text, "ranker_model_reloads_total", 'result="failure"') >= 2
    assert reload_bad.status_code == 409 and reload_bad.json()["serving_version"] == 2
