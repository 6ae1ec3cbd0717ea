"""`ranker serve` as a real uvicorn process (1 and 2 workers), against the real Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import load_features


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert proc.poll() is None, "server exited during startup"
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server not ready in time")


@pytest.mark.parametrize("workers", [1, 2])
def test_ranker_serve(model_repo: Path, redis_url: str, tmp_path: Path, workers: int) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    port = free_port()
    env = {**os.environ, "RANKER_WARMUP_BATCH_SIZES": "[1, 8]", "RANKER_REQUEST_TIMEOUT_S": "2.0"}
    # prometheus_client switches to multiprocess mode when the variable merely exists (even
    # empty: then it writes its files into the cwd), so it is set only for several workers
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if workers > 1:
        (tmp_path / "prom").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
    cmd = [sys.executable, "-m", "launch.cli", "serve", "--host", "127.0.0.1", "--port",
           str(port), "--workers", str(workers), "--model-repo", str(model_repo),
           "--model-name", "mmoe", "--redis-url", redis_url, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        with httpx.Client(base_url=url, timeout=5.0) as client:
            for _ in range(6):  # several requests so that both workers likely serve some
                r = client.post("/rank", json={"user_id": "u2", "candidates": ["i1", "i2", "i3"],
                                               "preset": "engagement"})
                assert r.status_code == 200, r.text
                assert r.json()["model"]["version"] == 1 and len(r.json()["items"]) == 3
            r = client.post("/rank", json={"user_id": "u2", "candidates": []})
            assert r.status_code == 422
            text = client.get("/metrics").text
            ok = [ln for ln in text.splitlines()
                  if ln.startswith('ranker_requests_total{route="/rank",status="200"}')]
            assert ok and float(ok[0].split()[-1]) == 6.0, ok  # summed over all workers
            assert 'ranker_model_info{name="mmoe",version="1"} 1.0' in text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
