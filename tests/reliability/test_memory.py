"""Memory under a stream of requests whose candidate counts vary across the allowed range:
the server's resident set (from /proc) must level off, not grow (real uvicorn process)."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from launch.local_redis import RedisServer
from tests.reliability.procs import post_json, run_load
from tests.support import ServerProcess, service_env

MAX_CANDIDATES = 1000


def varying_body(i: int) -> dict[str, Any]:
    """Request i: 1..MAX_CANDIDATES candidates (a new batch shape nearly every time)."""
    rng = np.random.default_rng(10_000 + i)
    n = int(rng.integers(1, MAX_CANDIDATES + 1))
    ids = rng.choice(5 * MAX_CANDIDATES, size=n, replace=False)  # mostly unknown ids: defaults
    return {"user_id": f"u{i % 10}", "candidates": [f"i{j}" for j in ids]}


def shifted_body(offset: int, i: int) -> dict[str, Any]:
    return varying_body(offset + i)


async def soak(server: ServerProcess, rounds: int, per_round: int) -> list[tuple[int, int]]:
    """(requests sent so far, RSS KiB) after each round; every answer must be a 200."""
    points = [(0, server.rss_kib())]
    sent = 0
    for r in range(rounds):
        res = await run_load(server.url, post_json("/rank", functools.partial(
            shifted_body, r * per_round)), total=per_round, concurrency=4, duration_s=120,
            timeout_s=10)
        assert res.by_status == {200: per_round}, res.summary()
        sent += per_round
        points.append((sent, server.rss_kib()))
    return points


def env_for(model_repo: Path, redis_url: str) -> dict[str, str]:
    # warm-up at the largest allowed batch: the arena reaches its size before traffic
    return service_env(model_repo, redis_url, max_candidates=MAX_CANDIDATES,
                       warmup_batch_sizes=[1, 100, MAX_CANDIDATES], request_timeout_s=5.0,
                       redis_socket_timeout_s=2.0)


async def test_rss_levels_off_under_varying_batch_sizes(
    model_repo: Path, live_redis: RedisServer
) -> None:
    with ServerProcess(env_for(model_repo, live_redis.url)) as server:
        points = await soak(server, rounds=5, per_round=120)
    print("requests, RSS KiB:", points)
    warm = points[1][1]  # after the first round: allocator pools and caches exist
    growth_kib = points[-1][1] - warm
    assert growth_kib < 10 * 1024, f"RSS grew {growth_kib} KiB after warm-up: {points}"


@pytest.mark.slow
async def test_soak_report(model_repo: Path, live_redis: RedisServer) -> None:
    """Long soak: 40 rounds x 250 requests; writes runs/reliability/soak.json."""
    t0 = time.time()
    with ServerProcess(env_for(model_repo, live_redis.url)) as server:
        points = await soak(server, rounds=40, per_round=250)
    out = Path(os.environ.get("RANKER_REPORT_DIR", "runs/reliability"))
    out.mkdir(parents=True, exist_ok=True)
    report = {"requests_rss_kib": points, "seconds": round(time.time() - t0, 1),
              "max_candidates": MAX_CANDIDATES}
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    print(report)
    tail = [rss for _, rss in points[len(points) // 2 :]]
    assert max(tail) - min(tail) < 10 * 1024, f"second half not flat: {tail}"
