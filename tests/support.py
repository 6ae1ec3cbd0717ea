"""What the test packages share: test settings, free ports, and real server processes.

`settings_for` builds the Settings of an in-process app, `service_env` the RANKER_* variables of
a server process (the same quick test configuration); `ServerProcess` runs the service in a
real uvicorn (or `ranker serve`) process on a free loopback port, on top of `launch.procs`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launch import procs
from launch.procs import HOST, free_port, port_open
from service.settings import Settings
from tests.tiny import MODEL_NAME

__all__ = ["HOST", "ServerProcess", "children_of", "free_port", "port_open", "redis_client_ids",
           "redis_command_calls",
           "rss_kib", "service_env", "settings_env", "settings_for"]
APP_FACTORY = "service.app:create_app"


# --- settings ----------------------------------------------------------------------------------


def settings_for(model_repo: Path, redis_url: str | None, **kw: Any) -> Settings:
    """Test settings: the tiny model, quick warm-up, the test Redis."""
    base: dict[str, Any] = {
        "model_repo": model_repo,
        "model_name": MODEL_NAME,
        "redis_url": redis_url,
        "warmup_batch_sizes": [1, 8],
        "request_timeout_s": 1.0,
        "redis_connect_timeout_s": 0.2,
        "redis_socket_timeout_s": 0.2,
    }
    base.update(kw)
    return Settings(**base)


def settings_env(**fields: object) -> dict[str, str]:
    """RANKER_* variables for Settings fields, as a server process reads them (JSON if not str)."""
    return {f"RANKER_{key.upper()}": value if isinstance(value, str)
            else str(value) if isinstance(value, Path) else json.dumps(value)
            for key, value in fields.items()}


def service_env(repo: Path, redis_url: str | None, **settings: object) -> dict[str, str]:
    """RANKER_* environment for a server process: quick warm-up, the test Redis.

    Also drops PROMETHEUS_MULTIPROC_DIR from this process's environment: prometheus_client
    switches to multiprocess mode when the variable merely exists.
    """
    fields: dict[str, object] = {
        "model_repo": repo,
        "model_name": MODEL_NAME,
        "warmup_batch_sizes": "[1, 64]",
        "request_timeout_s": "1.0",
        "redis_connect_timeout_s": "0.2",
        "redis_socket_timeout_s": "0.2",
    }
    if redis_url:
        fields["redis_url"] = redis_url
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return settings_env(**{**fields, **settings})


# --- processes ---------------------------------------------------------------------------------


def redis_client_ids(url: str) -> set[str]:
    """Ids of the clients connected to a redis-server, not counting the one asking. Ids, not a
    count: another test's connection closing late must not pass for (or hide) one of ours."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        me = str(client.client_id())
        return {str(c["id"]) for c in client.client_list()} - {me}
    finally:
        client.close()


def redis_command_calls(url: str, *commands: str) -> int:
    """How many of these commands (e.g. "mget", "get") the server has executed so far, from
    INFO commandstats: what a test reads to prove a request did, or did not, touch Redis."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands)


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


class ServerProcess(procs.Supervised):
    """`python -m uvicorn --factory service.app:create_app` (or `ranker serve`) on a free port.

    Started in its own process group and always stopped: SIGTERM, then SIGKILL of the group.
    """

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
        self.proc = procs.spawn(self.command(), env=self.env, log=self._log, new_group=True)
        return self

    def wait_ready(self, timeout_s: float | None = None, path: str | None = None) -> float:
        """Poll `path` (default: the ready path) until 200 (bounded); returns seconds waited."""
        return procs.wait_http(self.url + (path or self.ready_path), self.proc,
                               timeout_s or self.ready_timeout_s, what="the server",
                               interval_s=0.05, detail=self.log_tail)

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
        self.returncode = procs.stop(self.proc, self.stop_timeout_s, group=True)
        return self.returncode

    def log_tail(self, n: int = 30) -> str:
        """The last lines of the server's combined stdout/stderr."""
        return procs.tail(self._log, n)

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

    def close(self) -> None:
        """Stop and remove the log."""
        self.stop()
        with contextlib.suppress(OSError):
            self._log.unlink()


def load_world(url: str, vdir: Path, world_dir: Path) -> None:
    """Load a synthetic world's users and items into Redis with the schema of model `vdir`."""
    import pyarrow.parquet as pq
    import redis

    from ranker.manifest import load_manifest, load_schema
    from service.featurestore.writer import load_tables

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        load_tables(client, load_schema(vdir, load_manifest(vdir)),
                    pq.read_table(world_dir / "users.parquet"),
                    pq.read_table(world_dir / "items.parquet"))
    finally:
        client.close()
