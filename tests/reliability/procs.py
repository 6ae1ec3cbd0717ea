"""A bounded load loop for the reliability tests (the server processes: `tests.support`).

`run_load` drives a `tests.support.ServerProcess` with httpx from the test process, bounded in
count AND time, and counts every outcome by status (or by exception name when there was no HTTP
answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

# --- waiting on a condition -----------------------------------------------------------------


async def wait_for(condition: Callable[[], bool], what: str | Callable[[], str],
                   timeout_s: float = 20.0) -> None:
    """Poll `condition` (off the event loop) until true; fail after `timeout_s` saying `what`."""
    end = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        if time.monotonic() > end:
            pytest.fail(f"not reached within {timeout_s:g}s: {what() if callable(what) else what}")
        await asyncio.sleep(0.05)  # poll interval


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of the exposition samples `name{...labels...}` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scraped(url: str, name: str, labels: str = "") -> float:
    """Sum of the samples `name{...labels...}` on the server's /metrics (0 if none)."""
    return metric_value(httpx.get(url + "/metrics", timeout=5).text, name, labels)


async def wait_inflight(url: str, n: int, timeout_s: float = 20.0) -> None:
    """Wait until the server has `n` requests in flight besides the /metrics scrape itself."""
    await wait_for(lambda: scraped(url, "ranker_inflight_requests") == n + 1,
                   lambda: f"{n} in flight (now {scraped(url, 'ranker_inflight_requests') - 1:g})",
                   timeout_s)


# --- load loop ---------------------------------------------------------------------------------

RequestFn = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]
CheckFn = Callable[[int, httpx.Response], None]


@dataclass
class LoadResult:
    """Outcome counts of one load run: by HTTP status, or by exception name."""

    sent: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what `check` complained about
    elapsed_s: float = 0.0

    @property
    def answered(self) -> int:
        return sum(self.by_status.values())

    @property
    def failed(self) -> int:
        """No answer at all, or a 5xx."""
        return sum(self.errors.values()) + sum(
            n for s, n in self.by_status.items() if s >= 500)

    def summary(self) -> str:
        return (f"sent={self.sent} answered={self.answered} by_status={dict(self.by_status)} "
                f"errors={dict(self.errors)} problems={self.problems[:3]} "
                f"elapsed={self.elapsed_s:.2f}s")

    def median_s(self) -> float:
        lat = sorted(self.latencies_s)
        return lat[len(lat) // 2] if lat else float("nan")

    def max_s(self) -> float:
        return max(self.latencies_s) if self.latencies_s else float("nan")


async def run_load(
    base_url: str,
    request: RequestFn,
    *,
    total: int,
    concurrency: int = 4,
    duration_s: float = 10.0,
    timeout_s: float = 5.0,
    check: CheckFn | None = None,
    headers: Mapping[str, str] | None = None,
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """Send at most `total` requests from `concurrency` workers, stopping after `duration_s`
    (or earlier, once `stop` is set), each worker on its own connection.

    `request(client, i)` sends request number i; `check(i, response)` may raise AssertionError,
    which is recorded in `problems` (the run goes on, the test asserts on the list).
    """
    result = LoadResult()
    counter = iter(range(total))
    stop_at = time.monotonic() + duration_s
    # one client, so one connection, per worker: with one pool shared by all workers a request
    # can lose the race for a freed connection over and over (httpcore's pool hands a released
    # connection to every queued request and the losers retry; encode/httpcore#822), which the
    # chaos run measured as a client-side wait of 1-2 s before the request was even sent
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    # one TLS context for all: each new client would otherwise load the CA bundle on the event
    # loop (hundreds of ms each on a busy runner, stalling every request of the run)
    tls = ssl.create_default_context()
    clients = [httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits,
                                 headers=dict(headers or {}), verify=tls)
               for _ in range(concurrency)]

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at and not (stop is not None and stop.is_set()):
            i = next(counter, None)
            if i is None:
                return
            result.sent += 1
            t0 = time.perf_counter()
            try:
                resp = await request(client, i)
            except httpx.HTTPError as e:
                result.errors[type(e).__name__] += 1
                continue
            result.latencies_s.append(time.perf_counter() - t0)
            result.by_status[resp.status_code] += 1
            if check is not None:
                try:
                    check(i, resp)
                except AssertionError as e:
                    result.problems.append(f"#{i}: {e}")

    t_start = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        await asyncio.gather(*(worker(client) for client in clients))
    result.elapsed_s = time.perf_counter() - t_start
    return result


def post_json(path: str, body_of: Callable[[int], Any]) -> RequestFn:
    """A RequestFn posting `body_of(i)` as JSON to `path`."""

    async def send(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post(path, json=body_of(i))

    return send
