"""Child processes of a benchmark run: started in their own process group, always stopped.

Every process the bench starts goes through `Processes`, which stops them all (SIGTERM, then
SIGKILL of the child's own group) on normal exit, on an exception and on Ctrl-C; children also
get SIGKILL from the kernel if the bench process dies (PR_SET_PDEATHSIG), so nothing outlives it.
Starting, waiting and stopping are `launch.procs`; this module adds the run's bookkeeping.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from launch import procs
from launch.procs import HOST


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
        """Start `cmd` with stdout/stderr to `<log_dir>/<name>.log`, leading its own group."""
        proc = procs.spawn(cmd, env=env, log=self.log_dir / f"{name}.log", new_group=True)
        self.children.append((name, proc))
        self.started.append({"name": name, "pid": proc.pid})
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
        """SIGTERM the child, SIGKILL its process group after `timeout_s` (and reap the group:
        uvicorn workers may linger a moment after their parent)."""
        procs.stop(proc, timeout_s, group=True)
        self.children = [(n, p) for n, p in self.children if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.children)):
            self.stop(proc)

    def log_tail(self, name: str, n: int = 20) -> str:
        return procs.tail(self.log_dir / f"{name}.log", n)

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
