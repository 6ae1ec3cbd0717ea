"""Child processes: start with env and log capture, wait until ready (bounded), stop for sure.

The one process helper of the project: the main job, the embedded Redis, the benchmark and the
tests start, wait for and stop their children through these functions. Standard library only
(the service image has no httpx), so it is importable everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Self

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


class NotReady(TimeoutError, RuntimeError):
    """A child was not ready within its bound (or exited first); the message says why."""


class Supervised:
    """A child process owned by a `with` block: `start()` on entry, `close()` on exit."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def free_port(host: str = HOST) -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = HOST, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        return s.connect_ex((host, port)) == 0


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the thread that forked it dies (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _lead_group_and_die_with_parent() -> None:
    # a new process group, so that stop(..., group=True) also reaches uvicorn's workers
    os.setpgrp()
    die_with_parent()


def spawn(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log: Path | IO[bytes] | int | None = None,
    cwd: str | Path | None = None,
    new_group: bool = False,
    tied: bool = True,
) -> subprocess.Popen[bytes]:
    """Start `cmd` with `os.environ` updated by `env`; stdout+stderr to `log` when given
    (a path, an open file or `subprocess.DEVNULL`).

    `new_group`: the child leads its own process group (stop it with `group=True`).
    `tied`: the kernel kills the child if the starting thread dies (PR_SET_PDEATHSIG fires when
    the *thread* that forked exits, so this applies only when started from the main thread).
    Without `log` the child shares this process's terminal (and gets its Ctrl-C).
    """
    main_thread = threading.current_thread() is threading.main_thread()
    tied = tied and sys.platform == "linux" and main_thread
    preexec: Callable[[], None] | None = None
    if new_group:
        preexec = _lead_group_and_die_with_parent if tied else os.setpgrp
    elif tied:
        preexec = die_with_parent
    full_env = {**os.environ, **(env or {})}
    owned = isinstance(log, Path)
    out: IO[bytes] | int | None = log.open("wb") if isinstance(log, Path) else log
    try:
        return subprocess.Popen(
            list(cmd), env=full_env, cwd=cwd, preexec_fn=preexec,
            stdin=subprocess.DEVNULL if out is not None else None,
            stdout=out, stderr=subprocess.STDOUT if out is not None else None,
        )
    finally:
        if owned and not isinstance(out, int) and out is not None:
            out.close()  # the child holds its own descriptor


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout_s: float,
    proc: subprocess.Popen[bytes] | None = None,
    what: str = "the process",
    interval_s: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> float:
    """Call `ready()` until it returns True; seconds waited. Raises NotReady after `timeout_s`
    or as soon as `proc` exits; an OSError from `ready()` counts as not ready yet.

    `detail()` is appended to the error (a log tail, the last answer).
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    last = ""
    while True:
        if proc is not None and proc.poll() is not None:
            raise NotReady(f"{what} exited with code {proc.returncode} before it was ready"
                           + (f": {detail()}" if detail else ""))
        try:
            if ready():
                return time.monotonic() - t0
        except OSError as exc:
            last = f" ({type(exc).__name__}: {exc})"
        if time.monotonic() >= deadline:
            raise NotReady(f"{what} not ready after {timeout_s:g}s{last}"
                           + (f": {detail()}" if detail else ""))
        time.sleep(interval_s)


def http_status(url: str, timeout_s: float = 1.0) -> int:
    """The status of GET `url` (4xx/5xx included); OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def wait_http(
    url: str,
    proc: subprocess.Popen[bytes] | None = None,
    timeout_s: float = 60.0,
    *,
    what: str | None = None,
    interval_s: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> float:
    """Poll GET `url` until it answers 200 (bounded); fails fast if `proc` exits."""
    return wait_until(lambda: http_status(url) == 200, timeout_s=timeout_s, proc=proc,
                      what=what or url, interval_s=interval_s, detail=detail)


def stop(
    proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0, *, group: bool = False
) -> int | None:
    """SIGTERM, then SIGKILL after `timeout_s`; its exit code (None if never started).

    SIGTERM goes to the child alone (uvicorn's master stops its own workers gracefully).
    `group`: the child leads a process group (`spawn(new_group=True)`); the SIGKILL goes to the
    whole group, and what is left of it is killed afterwards, so workers never linger.
    """
    if proc is None:
        return None
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM, group=False)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL, group)
            proc.wait(timeout=timeout_s)
    if group:
        _signal(proc, signal.SIGKILL, group=True)
    return proc.returncode


def kill(proc: subprocess.Popen[bytes] | None, timeout_s: float = 5.0) -> None:
    """SIGKILL at once (a crash, for chaos tests) and reap."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=timeout_s)


def _signal(proc: subprocess.Popen[bytes], sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def tail(path: Path | None, n: int = 20, sep: str = "\n") -> str:
    """The last `n` lines of a log file ("(no log)" when there is none)."""
    if path is None or not path.exists():
        return "(no log)"
    return sep.join(path.read_text(errors="replace").splitlines()[-n:])
