"""A client that goes away mid-body, caused for real: a raw socket against a real uvicorn sends
the headers with a Content-Length and half the body, then closes. It is counted as 499 (client
closed request), never as a 500: a 500 feeds the error-ratio alert."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import orjson

from launch.local_redis import RedisServer
from tests.reliability.conftest import rank_body
from tests.reliability.procs import metric_value
from tests.support import HOST, ServerProcess, service_env


def send_half_and_close(port: int, body: bytes) -> None:
    """POST /rank announcing all of `body` in Content-Length, send half of it, close."""
    head = (b"POST /rank HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (HOST.encode(), port, len(body)))
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(head + body[: len(body) // 2])


def rank_counts(url: str) -> dict[str, float]:
    """ranker_requests_total of /rank by status, from the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return {status: metric_value(text, "ranker_requests_total",
                                 f'route="/rank",status="{status}"')
            for status in ("200", "499", "500")}


def test_client_gone_mid_body_is_a_499_not_a_500(
    model_repo: Path, live_redis: RedisServer
) -> None:
    n = 5
    body = orjson.dumps(rank_body(0))
    with ServerProcess(service_env(model_repo, live_redis.url)) as server:
        for _ in range(n):
            send_half_and_close(server.port, body)
        # the server notices each close on its own time: wait until all n are counted
        end = time.monotonic() + 15
        counts = rank_counts(server.url)
        while counts["499"] + counts["500"] < n and time.monotonic() < end:
            time.sleep(0.05)  # poll interval of a bounded wait
            counts = rank_counts(server.url)
        after = httpx.post(server.url + "/rank", json=rank_body(1), timeout=5)
        final = rank_counts(server.url)
        log = server.log_text()
    assert final["500"] == 0, f"a client that left was counted as a server error: {final}"
    assert final["499"] == n, final
    assert after.status_code == 200 and final["200"] == 1, after.text  # the server is fine
    assert "Traceback" not in log, log[-2000:]
