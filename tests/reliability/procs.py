"""A bounded load loop for the reliability tests (the server processes: `tests.support`).

`run_load` drives a `tests.support.ServerProcess` with httpx from the test process, bounded in
count AND time, and counts every outcome by status (or by exception name when there was no HTTP
answer).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

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
) -> LoadResult:
    """Send at most `total` requests from `concurrency` workers, stopping after `duration_s`.

    `request(client, i)` sends request number i; `check(i, response)` may raise AssertionError,
    which is recorded in `problems` (the run goes on, the test asserts on the list).
    """
    result = LoadResult()
    counter = iter(range(total))
    stop_at = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
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
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits,
                                 headers=dict(headers or {})) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - t_start
    return result


def post_json(path: str, body_of: Callable[[int], Any]) -> RequestFn:
    """A RequestFn posting `body_of(i)` as JSON to `path`."""

    async def send(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post(path, json=body_of(i))

    return send
