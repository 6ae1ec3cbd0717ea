"""`ranker simulate` arguments: loopback only, bounded, clear errors (exit 2)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sim.cli import loopback_error, main


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.3.2.1", "http://[::1]:9",
                                 "http://localhost:8000", "https://127.0.0.1/"])
def test_loopback_urls_are_accepted(url: str) -> None:
    assert loopback_error(url) is None


@pytest.mark.parametrize(("url", "why"), [
    ("http://10.0.0.1:8000", "resolves to 10.0.0.1"),
    ("http://192.168.1.5", "loopback only|only runs against loopback"),
    ("http://[2001:db8::1]:80", "2001:db8::1"),
    ("http://0.0.0.0:8000", "0.0.0.0"),
    ("http://no-such-host.invalid", "does not resolve"),
    ("ftp://127.0.0.1", "http"),
    ("127.0.0.1:8000", "http"),
    ("http://127.0.0.1:notaport", "not a URL"),
])
def test_other_hosts_are_refused(url: str, why: str) -> None:
    error = loopback_error(url)
    assert error is not None
    assert re.search(why, error), error


def test_refusal_exits_2_before_any_request(small_data: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--base-url", "http://10.1.2.3:8000", "--requests", "1",
               "--data-dir", str(small_data)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "loopback" in err and "10.1.2.3" in err


@pytest.mark.parametrize(("args", "why"), [
    (["--requests", "0"], "--requests must be >= 1"),
    (["--requests", "5", "--top-k", "0"], "--top-k"),
    (["--requests", "5", "--max-seconds", "0"], "--max-seconds"),
    (["--requests", "5", "--candidates", "151"], "151 > the world's 150 items"),
])
def test_bad_arguments_exit_2(small_data: Path, capsys: pytest.CaptureFixture[str],
                              args: list[str], why: str) -> None:
    rc = main(["--base-url", "http://127.0.0.1:1", "--data-dir", str(small_data), *args])
    assert rc == 2
    assert why in capsys.readouterr().err


def test_missing_world_exits_2_and_says_how_to_make_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--base-url", "http://127.0.0.1:1", "--requests", "1", "--data-dir",
               str(tmp_path)])
    assert rc == 2
    assert "ranker data" in capsys.readouterr().err


def test_weights_must_be_a_json_object_of_numbers(small_data: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--base-url", "http://127.0.0.1:1", "--requests", "1", "--weights", "[1]"])
    assert exc.value.code == 2


def test_nothing_listening_is_counted_not_a_crash(small_data: Path, tmp_path: Path) -> None:
    """A loopback port with no server: every request is counted by its exception name."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "s.json"
    rc = main(["--base-url", f"http://127.0.0.1:{port}", "--requests", "3", "--concurrency", "2",
               "--data-dir", str(small_data), "--json", str(out), "--timeout", "2"])
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["requests"] == 3 and s["rank_status"] == {"ConnectError": 3}
    assert s["impressions"] == 0 and s["run"]["stopped_by"] == "requests"
    assert s["rates"]["click"] is None  # no impressions: no rate (valid JSON, not NaN)


def test_runs_as_a_module(small_data: Path) -> None:
    """`python -m sim.cli` until the `ranker` dispatcher lists it."""
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "--base-url", "http://10.9.9.9",
                           "--requests", "1", "--data-dir", str(small_data)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "loopback" in proc.stderr, proc.stderr
