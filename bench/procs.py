"""Child processes of a benchmark run: started in their own process group, always stopped.

Every process the bench starts goes through `Processes`, which stops them all (SIGTERM to the
child's own group, then SIGKILL) on normal exit, on an exception and on Ctrl-C; children also
get SIGKILL from the kernel if the bench process dies (PR_SET_PDEATHSIG), so nothing outlives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _child_setup() -> None:
    # Before exec in the child: die with the parent (Linux), and lead a new process group so
    # uvicorn's worker processes are stopped with it.
    os.setpgrp()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class Processes:
    """The set of child processes of one run; a context manager that stops them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.started: list[dict[str, object]] = []  # every child ever started: name, pid

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `cmd` with stdout/stderr to `<log_dir>/<name>.log`."""
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the child
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, preexec_fn=_child_setup,
        )
        log.close()  # the child holds its own descriptor
        self.children.append((name, proc))
        self.started.append({"name": name, "pid": proc.pid})
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after `timeout_s`."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout_s)
        # uvicorn workers may linger a moment after their parent: reap the group too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.children = [(n, p) for n, p in self.children if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.children)):
            self.stop(proc)

    def log_tail(self, name: str, n: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()


def cpu_seconds(pids: set[int] | None = None, pgid: int | None = None) -> float:
    """User+system CPU seconds of the live processes with these pids or in this process group."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        pid = int(stat.parent.name)
        if (pids is not None and pid in pids) or (pgid is not None and int(fields[2]) == pgid):
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def uvicorn_cmd(app: str, port: int, workers: int = 1, factory: bool = False) -> list[str]:
    """uvicorn serving `app` on loopback with the same loop/protocol choices as the service."""
    cmd = [sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port),
           "--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    return [*cmd, "--factory"] if factory else cmd


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Poll GET `url` until it answers 200; fail fast if the process exits."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
                last = str(resp.status)
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s}s ({last})")
