"""Two in-process instances of the app measured on the same requests, taking turns.

The shared part of the bench scripts that compare one setting against another in one process
(bench.servedlog_cost, bench.shadow_cost, bench.cluster_rank_cost): a POST /rank called at the
ASGI level (no HTTP client in the measured process, so its CPU is the app's), the run's request
bodies, timed calls with an idle gap after each response, and short blocks of the two settings
alternating (A B B A ...) so the machine's drift (other processes) falls on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import orjson


def scope_for(body: bytes) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/rank", "raw_path": b"/rank", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }


async def call(app: Any, body: bytes) -> int:
    """One POST /rank through the app's ASGI interface; returns the status."""
    given = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    await app(scope_for(body), receive, send)
    return status


def request_bodies(rng: np.random.Generator, requests: int, items: int, candidates: int,
                   **extra: Any) -> list[bytes]:
    """`requests` bodies of 1000 users (preset engagement), each with `candidates` distinct
    items of `items`; `extra` fields go before the candidates."""
    return [orjson.dumps({
        "user_id": f"u{i % 1000}", "preset": "engagement", **extra,
        "candidates": [f"i{j}" for j in rng.choice(items, candidates, replace=False)]})
        for i in range(requests)]


async def timed_calls(app: Any, bodies: list[bytes], gap_s: float) -> list[float]:
    """The call time of each body in turn (each must answer 200), idle `gap_s` after each
    response: the client's side of a round trip, the loop idle."""
    times = []
    for body in bodies:
        t0 = time.perf_counter()
        status = await call(app, body)
        times.append(time.perf_counter() - t0)
        assert status == 200, status
        if gap_s:
            await asyncio.sleep(gap_s)
    return times


async def alternating(bodies: list[bytes], size: int,
                      block: Callable[[str, list[bytes]], Awaitable[dict[str, Any]]]
                      ) -> dict[str, list[dict[str, Any]]]:
    """`block(name, part)` on blocks of `size` bodies, "off" and "on" taking turns
    (off on, on off, ...) on the same part; each setting's block results in order."""
    got: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for b, start in enumerate(range(0, len(bodies), size)):
        part = bodies[start:start + size]
        for name in (("off", "on") if b % 2 == 0 else ("on", "off")):
            got[name].append(await block(name, part))
    return got


async def ab_runs(args: argparse.Namespace,
                  block: Callable[[str, list[bytes]], Awaitable[dict[str, Any]]],
                  seed: int = 1, **extra: Any) -> AsyncIterator[dict[str, list[dict[str, Any]]]]:
    """The runs of an `add_ab_arguments` comparison: per run fresh `request_bodies` (`extra`
    fields in each) called `alternating` in `--block`s; the block results of every run after
    the `--warmup-runs`."""
    rng = np.random.default_rng(seed)
    for run in range(args.warmup_runs + args.runs):
        bodies = request_bodies(rng, args.requests, args.items, args.candidates, **extra)
        got = await alternating(bodies, args.block, block)
        if run >= args.warmup_runs:
            yield got


def latency_ms(times: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(times, 50)) * 1e3,
            "p99_ms": float(np.percentile(times, 99)) * 1e3}


def add_ab_arguments(p: argparse.ArgumentParser, requests: int, runs: int) -> None:
    """The options of a two-setting comparison: request shape, runs, blocks, idle gap."""
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--requests", type=int, default=requests, help="per run and setting")
    p.add_argument("--runs", type=int, default=runs, help="measured off/on pairs")
    p.add_argument("--block", type=int, default=20, help="requests per turn of one setting")
    p.add_argument("--gap-ms", type=float, default=0.5,
                   help="idle time between a response and the next request (a client's "
                        "network round trip; 0 = back to back)")
    p.add_argument("--warmup-runs", type=int, default=1)
    p.add_argument("--items", type=int, default=5000)


def run_on_default_model(args: argparse.Namespace,
                         measure: Callable[[argparse.Namespace, Path, str],
                                           Coroutine[Any, Any, dict[str, Any]]],
                         prepare: Callable[[Path, Path], None] | None = None
                         ) -> dict[str, Any]:
    """`measure(args, repo, url)` on bench.measure's default-size MMoE exported to a temporary
    repo (`prepare(repo, version_dir)` runs next) with its features in a fresh redis-server."""
    from bench.measure import export_model, load_features
    from launch.local_redis import RedisServer

    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        vdir = export_model(Path(tmp), args.items)
        if prepare is not None:
            prepare(Path(tmp), vdir)
        load_features(server.url, vdir, args.items)
        return asyncio.run(measure(args, Path(tmp), server.url))
