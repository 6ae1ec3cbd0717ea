"""The served log in a real `ranker serve` process: SIGTERM flushes what is still queued."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from ranker.servedlog import decode_served, served_stream
from tests.service.helpers import load_features
from tests.support import ServerProcess


def test_sigterm_flushes_the_queued_records(model_repo: Path, redis_url: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    env = {"RANKER_WARMUP_BATCH_SIZES": "[1, 8]", "RANKER_REQUEST_TIMEOUT_S": "2.0",
           "RANKER_LOG_SAMPLE_RATE": "1", "RANKER_LOG_WRITE_TIMEOUT_S": "5",
           "RANKER_GRACEFUL_SHUTDOWN_S": "10"}
    flags = ["--model-repo", str(model_repo), "--model-name", "mmoe", "--redis-url", redis_url]
    server = ServerProcess(env, cli=True, extra_args=flags, ready_timeout_s=60.0,
                           stop_timeout_s=20.0)
    control = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        server.start()
        rids = []
        with httpx.Client(base_url=server.url, timeout=5.0) as client:
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
        server.signal(signal.SIGTERM)
        assert server.wait(20) == 0, server.log_tail()
        assert time.monotonic() - t0 < 10  # within the graceful period
        logged = [decode_served(f).request_id for _, f in control.xrange(served_stream("rk"))]
        assert sorted(logged) == sorted(rids)  # all of them, once each
    finally:
        server.close()
        control.close()
