"""`ranker run` end to end: real model, real embedded redis-server, real uvicorn child process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.stack.helpers import ROOT
from tests.support import port_open

N_USERS, N_ITEMS = 50, 200  # the tiny schema's vocabularies: u0..u49, i0..i199


def write_tiny_tables(data_dir: Path) -> None:
    """users/items parquet with the tiny schema's raw columns (ids beyond the vocab are OOV)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    users = pa.table({
        "user_id": [f"u{i}" for i in range(N_USERS)],
        "country": [("us", "de", "br", "in")[i % 4] for i in range(N_USERS)],
        "activity": [float(i % 7) for i in range(N_USERS)],
    })
    items = pa.table({
        "item_id": [f"i{i}" for i in range(N_ITEMS)],
        "category": [f"c{i % 8}" for i in range(N_ITEMS)],
        "age_days": [float(i % 60) for i in range(N_ITEMS)],
        "duration": [float(30 + i % 90) for i in range(N_ITEMS)],
    })
    pq.write_table(users, data_dir / "users.parquet")
    pq.write_table(items, data_dir / "items.parquet")


def run_args(model_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    repo, name = model_dir.parent.parent, model_dir.parent.name
    return [sys.executable, "-m", "launch.cli", "run", "--port", "0", "--repo", str(repo),
            "--name", name, "--data-dir", str(data_dir), *extra]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKER_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def embedded_redis_port(output: str) -> int:
    m = re.search(r"embedded redis-server on 127\.0\.0\.1:(\d+)", output)
    assert m, output
    return int(m.group(1))


def curl_body(output: str) -> dict:
    m = re.search(r"curl -s -X POST http://127\.0\.0\.1:\d+/rank .* -d '(.*)'", output)
    assert m, output
    return json.loads(m.group(1))


def test_smoke_serves_a_ranked_response_and_cleans_up(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_tiny_tables(data)
    done = subprocess.run(run_args(tiny_model_dir, data, "--smoke"), cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "smoke: POST /rank -> 200" in out
    assert f"loaded {N_USERS} users and {N_ITEMS} items" in out
    body = curl_body(out)  # the printed curl uses real ids from the loaded tables
    assert body["user_id"] == "u0" and body["candidates"] == [f"i{i}" for i in range(5)]
    assert not port_open(embedded_redis_port(out)), "the embedded Redis outlived the job"


def test_no_serve_prepares_an_external_redis(
    tiny_model_dir: Path, tmp_path: Path, redis_url: str
) -> None:
    """The docker-compose trainer job's mode: load into the given Redis and exit 0."""
    import redis

    data = tmp_path / "data"
    write_tiny_tables(data)
    env = {**clean_env(), "RANKER_REDIS_URL": redis_url}
    done = subprocess.run(run_args(tiny_model_dir, data, "--no-serve"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "using the configured server" in done.stdout
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() >= N_USERS + N_ITEMS
    finally:
        client.close()


def _the_printed_curl_works(output: str) -> None:
    """Run the printed command as a user would (curl), or send its body with urllib."""
    line = next(ln.strip() for ln in output.splitlines() if ln.strip().startswith("curl "))
    body = curl_body(output)
    if shutil.which("curl"):
        raw = subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True,
                             timeout=30).stdout
    else:
        url = re.search(r"(http://\S+/rank)", line).group(1)  # type: ignore[union-attr]
        req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read().decode()
    ranked = json.loads(raw)["items"]
    assert sorted(it["id"] for it in ranked) == sorted(body["candidates"])


def test_sigterm_stops_server_and_embedded_redis(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_tiny_tables(data)
    proc = subprocess.Popen(run_args(tiny_model_dir, data), cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "curl -s -X POST" in line:
                break
        out = "".join(lines)
        assert "curl -s -X POST" in out, out
        server_port = int(re.search(r"on http://127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
        assert port_open(server_port)
        _the_printed_curl_works(out)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out += rest
    assert proc.returncode == 0, out
    assert "embedded server stopped" in out
    assert not port_open(server_port)
    assert not port_open(embedded_redis_port(out))


def test_missing_tables_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(run_args(tiny_model_dir, tmp_path / "nothing", "--smoke"), cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "feature tables missing" in done.stdout and "users.parquet" in done.stdout


def test_smoke_on_an_empty_repository_trains_first(tmp_path: Path) -> None:
    """The newcomer's path: no model, no data -> synthetic data, training, export, serve, 200."""
    repo, data = tmp_path / "models", tmp_path / "data" / "synthetic"
    cmd = [sys.executable, "-m", "launch.cli", "run", "--smoke", "--small", "--port", "0",
           "--repo", str(repo), "--data-dir", str(data)]
    done = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "training one on the synthetic data" in out
    assert (repo / "mmoe" / "1" / "manifest.json").is_file()
    assert (data / "users.parquet").is_file() and (data / "items.parquet").is_file()
    assert "smoke: POST /rank -> 200" in out
    assert not port_open(embedded_redis_port(out))
    # a second run finds the model and does not train again
    again = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "model: using" in again.stdout and "training one" not in again.stdout
    assert sorted(p.name for p in (repo / "mmoe").iterdir()) == ["1"]


def test_a_busy_port_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_tiny_tables(data)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = run_args(tiny_model_dir, data, "--smoke")
        args[args.index("--port") + 1] = str(port)
        done = subprocess.run(args, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stdout
    assert not port_open(embedded_redis_port(done.stdout)), "Redis stopped after the failure"
