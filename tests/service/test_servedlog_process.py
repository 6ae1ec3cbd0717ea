"""The served log in a real `ranker serve` process: SIGTERM flushes what is still queued."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from ranker.servedlog import decode_served, served_stream
from tests.service.helpers import load_features
from tests.service.test_serve_process import free_port, wait_ready


def test_sigterm_flushes_the_queued_records(model_repo: Path, redis_url: str) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    port = free_port()
    env = {**os.environ, "RANKER_WARMUP_BATCH_SIZES": "[1, 8]", "RANKER_REQUEST_TIMEOUT_S": "2.0",
           "RANKER_LOG_SAMPLE_RATE": "1", "RANKER_LOG_WRITE_TIMEOUT_S": "5",
           "RANKER_GRACEFUL_SHUTDOWN_S": "10"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "ranker.cli", "serve", "--host", "127.0.0.1", "--port",
           str(port), "--model-repo", str(model_repo), "--model-name", "mmoe",
           "--redis-url", redis_url, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    control = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        wait_ready(url, proc)
        rids = []
        with httpx.Client(base_url=url, timeout=5.0) as client:
            # Redis holds every write for 1.5 s: the records are still in the service's queue
            # (or in a stalled XADD) when it is told to stop
            control.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
            for i in range(25):
                r = client.post("/rank", json={"user_id": "u2", "top_k": 3,
                                               "candidates": [f"i{j}" for j in range(i, i + 9)]})
                assert r.status_code == 200, r.text
                rids.append(r.json()["request_id"])
        assert control.xlen(served_stream("rk")) == 0  # nothing written yet
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 10  # within the graceful period
        logged = [decode_served(f).request_id for _, f in control.xrange(served_stream("rk"))]
        assert sorted(logged) == sorted(rids)  # all of them, once each
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        control.close()
