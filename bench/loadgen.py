"""HTTP/1.1 load generator over loopback, run in its own process: closed loop or open loop.

Raw asyncio streams (on uvloop when installed) with keep-alive connections, because a general
client library (httpx) spends more CPU per request than the servers under test on this small a
machine, and the client then measures itself. Its own CPU use is reported with every run, so a
reader can see when the client, not the server, was the bottleneck.

- closed loop: `concurrency` connections, each sends its next request when the last answered;
- open loop: requests are *scheduled* at a fixed offered rate and latency is measured from the
  scheduled time, so a stalled server is charged for the queue it causes (no coordinated
  omission). Requests that would exceed `max_outstanding` are counted as `client_dropped`.

The request mix is a file of JSON bodies (one per line), sent in file order, cycling. Every
run is bounded by a duration and a request count. Output: one JSON object on stdout.

    python -m bench.loadgen --url http://127.0.0.1:8000/rank --bodies b.jsonl --mode closed \
        --concurrency 4 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Target:
    """Where requests go: a loopback host, port and path."""

    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK:
            raise ValueError(f"only http:// on loopback is allowed, got {url!r}")
        return cls(parts.hostname, parts.port or 80, parts.path or "/")


@dataclass
class Recorder:
    """Latencies of completed requests and counts of outcomes."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    completed_total: int = 0  # every response, measured or not (for CPU per request)

    def record(self, status: str, latency_s: float) -> None:
        self.statuses[status] += 1
        if status == "200":
            self.latencies_s.append(latency_s)


class Connection:
    """One keep-alive HTTP/1.1 connection that sends a POST and reads the whole response."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.head = (
            f"POST {target.path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            "Content-Type: application/json\r\nConnection: keep-alive\r\n"
        ).encode()

    async def request(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.target.host, self.target.port
            )
        assert self.reader is not None
        self.writer.write(self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        pairs = (ln.partition(":") for ln in lines[1:])
        headers = {k.strip().lower(): v.strip() for k, _, v in pairs}
        if "content-length" in headers:
            payload = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            payload = await self._read_chunked()
        else:  # no length: the body runs to the end of the connection
            payload = await self.reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, payload

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _one(conn: Connection, body: bytes, rec: Recorder, t_start: float,
               timeout_s: float, measure: bool | tuple[float, float]) -> None:
    """Send one request; record its outcome (latency from `t_start`) if `measure` says so.

    `measure` is a flag, or a window (t0, t1): record only if the response arrives inside it.
    """
    try:
        status, _ = await asyncio.wait_for(conn.request(body), timeout_s)
        outcome = str(status)
    except TimeoutError:
        outcome = "timeout"
        conn.close()  # the late response would be read as the next request's
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        outcome = type(e).__name__
        conn.close()
    done = time.perf_counter()
    rec.completed_total += 1
    if measure is True or (isinstance(measure, tuple) and measure[0] <= done <= measure[1]):
        rec.record(outcome, done - t_start)


async def closed_loop(
    target: Target, bodies: list[bytes], concurrency: int, duration_s: float, warmup_s: float,
    max_requests: int, timeout_s: float,
) -> tuple[Recorder, float]:
    """`concurrency` workers, each one request at a time; returns (recorder, measured seconds).

    A response counts if it arrives inside the measured window, whenever it was sent, so a
    server slower than the window still gets a throughput; in-flight requests at the end of the
    window are drained but not counted.
    """
    rec = Recorder()
    t0 = time.perf_counter()
    t_measure = t0 + warmup_s
    t_end = t_measure + duration_s
    counter = iter(range(10**12))

    async def worker() -> None:
        conn = Connection(target)
        try:
            while (now := time.perf_counter()) < t_end and rec.sent < max_requests:
                i = next(counter)
                rec.sent += now >= t_measure
                await _one(conn, bodies[i % len(bodies)], rec, now, timeout_s, (t_measure, t_end))
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return rec, duration_s


async def open_loop(target: Target, bodies: list[bytes], rate: float, duration_s: float,
                    warmup_s: float, max_requests: int, timeout_s: float,
                    max_outstanding: int) -> tuple[Recorder, float]:
    """Requests scheduled every 1/rate s; latency counts from the schedule, not the send."""
    rec = Recorder()
    idle: list[Connection] = []
    outstanding = 0
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    n_warm = int(rate * warmup_s)
    n_total = min(n_warm + int(rate * duration_s), n_warm + max_requests)

    async def send(i: int, scheduled: float) -> None:
        nonlocal outstanding
        conn = idle.pop() if idle else Connection(target)
        try:
            await _one(conn, bodies[i % len(bodies)], rec, scheduled, timeout_s, i >= n_warm)
        finally:
            outstanding -= 1
            if conn.writer is not None:
                idle.append(conn)

    for i in range(n_total):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if i >= n_warm:
            rec.sent += 1
        if outstanding >= max_outstanding:
            if i >= n_warm:
                rec.statuses["client_dropped"] += 1
            continue
        outstanding += 1
        task = loop.create_task(send(i, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s + 1.0)
    for conn in idle:
        conn.close()
    return rec, max(time.perf_counter() - (t0 + warmup_s), 1e-9)


def summarise(rec: Recorder, seconds: float, candidates: int, cpu_s: float) -> dict[str, Any]:
    """Throughput, latency percentiles (ms) and outcome counts of one run."""
    lat = np.asarray(rec.latencies_s) * 1e3
    ok = int(lat.size)
    pct = (
        {f"p{q}_ms": float(np.percentile(lat, q)) for q in (50, 90, 95, 99)}
        | {"mean_ms": float(lat.mean()), "max_ms": float(lat.max())}
        if ok
        else {}
    )
    errors = {k: v for k, v in rec.statuses.items() if k != "200"}
    return {
        "sent": rec.sent,
        "completed_total": rec.completed_total,
        "ok": ok,
        "errors": errors,
        "seconds": seconds,
        "rps": ok / seconds,
        "candidates_per_s": ok * candidates / seconds,
        "client_cpu_s": cpu_s,
        "client_cpu_util": cpu_s / seconds,  # 1.0 = the client kept one core busy
        **pct,
    }


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement as configured by the parsed command line."""
    target = Target.parse(args.url)
    with open(args.bodies, "rb") as f:
        bodies = [line.rstrip(b"\n") for line in f if line.strip()]
    if not bodies:
        raise ValueError(f"{args.bodies}: no request bodies")
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    cpu0 = _cpu_seconds()
    if args.mode == "closed":
        coro = closed_loop(target, bodies, args.concurrency, args.duration, args.warmup,
                           args.max_requests, args.timeout)
    else:
        coro = open_loop(target, bodies, args.rate, args.duration, args.warmup, args.max_requests,
                         args.timeout, args.max_outstanding)
    rec, seconds = asyncio.run(coro)
    out = summarise(rec, seconds, args.candidates, _cpu_seconds() - cpu0)
    out.update(mode=args.mode, concurrency=args.concurrency, offered_rps=args.rate,
               url=args.url, candidates=args.candidates, loadavg_1m=os.getloadavg()[0])
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="http://127.0.0.1:<port>/<path> (loopback only)")
    p.add_argument("--bodies", required=True, help="file of JSON request bodies, one per line")
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--concurrency", type=int, default=1, help="closed loop: connections")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: offered requests/s")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds (after warm-up)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="measured requests cap")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    p.add_argument("--max-outstanding", type=int, default=256, help="open loop: in-flight cap")
    p.add_argument("--candidates", type=int, default=0, help="candidates per request (for /s)")
    args = p.parse_args(argv)
    if args.mode == "open" and args.rate <= 0:
        p.error("--mode open needs --rate > 0")
    if not 1 <= args.concurrency <= 1024:
        p.error("--concurrency must be between 1 and 1024")
    if not 0 < args.duration <= 600:
        p.error("--duration must be in (0, 600] seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    out = run(parse_args(sys.argv[1:] if argv is None else argv))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
