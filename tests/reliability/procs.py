"""Real server processes and a bounded load loop for the reliability tests.

`ServerProcess` runs the service in a real uvicorn process (its own Python, its own event
loop, real sockets on 127.0.0.1) and always stops it: SIGTERM, then SIGKILL after a bound.
`run_load` drives it with httpx from the test process, bounded in count AND time, and counts
every outcome by status (or by exception name when there was no HTTP answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

HOST = "127.0.0.1"
APP_FACTORY = "service.app:create_app"


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident set size of one process, from /proc (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    """Direct child pids (uvicorn's worker processes when --workers > 1)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


class ServerProcess:
    """`python -m uvicorn --factory service.app:create_app` on a free loopback port."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        workers: int = 1,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        app: str = APP_FACTORY,
        cli: bool = False,
        ready_path: str = "/readyz",
        ready_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.port = port or free_port()
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.workers = workers
        self.extra_args = list(extra_args)
        self.app = app
        self.cli = cli  # `ranker serve` (the production entry point) instead of bare uvicorn
        self.ready_path = ready_path
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._log = Path(tempfile.mkstemp(prefix="uvicorn-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def command(self) -> list[str]:
        if self.cli:
            return [sys.executable, "-m", "launch.cli", "serve", "--host", HOST, "--port",
                    str(self.port), "--workers", str(self.workers), "--log-level", "warning",
                    *self.extra_args]
        cmd = [sys.executable, "-m", "uvicorn", "--factory", self.app, "--host", HOST,
               "--port", str(self.port), "--log-level", "warning", "--no-access-log"]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        return cmd + self.extra_args

    def spawn(self) -> ServerProcess:
        """Start the process without waiting for readiness."""
        log = self._log.open("wb")
        self.proc = subprocess.Popen(
            self.command(), env=self.env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, timeout_s: float | None = None, path: str | None = None) -> float:
        """Poll `path` (default: the ready path) until 200 (bounded); returns seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + (timeout_s or self.ready_timeout_s)
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                url = self.url + (path or self.ready_path)
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError(f"not ready after {timeout_s or self.ready_timeout_s}s: "
                           f"{self.log_tail()}")

    def start(self) -> ServerProcess:
        self.spawn()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """Wait for exit (bounded); returns the exit code."""
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout=timeout_s)
        return self.returncode

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL of the whole process group after `stop_timeout_s`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=self.stop_timeout_s)
        # workers left behind by a killed master must not outlive the test
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.returncode = self.proc.returncode
        return self.returncode

    def log_tail(self, n: int = 30) -> str:
        """The last lines of the server's combined stdout/stderr."""
        if not self._log.exists():
            return "(no log)"
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-n:])

    def log_text(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def rss_kib(self, include_children: bool = True) -> int:
        """RSS of the server (plus its worker processes), from /proc."""
        pids = [self.pid, *(children_of(self.pid) if include_children else [])]
        total = 0
        for p in pids:
            with contextlib.suppress(OSError):
                total += rss_kib(p)
        return total

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self._log.unlink()


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
