"""Hostile input against a real server: schemathesis from the service's own OpenAPI schema
(no 5xx, no response that breaks the schema), and random paths/ids that must not create new
metric series."""

from __future__ import annotations

import os
import random
import shutil
import string
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from launch.local_redis import RedisServer
from tests.support import ServerProcess, service_env

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")


def st_binary() -> str | None:
    found = shutil.which("st") or str(Path(sys.executable).parent / "st")
    return found if os.path.exists(found) else None


def run_schemathesis(
    url: str, max_examples: int, max_time_s: int
) -> subprocess.CompletedProcess[str]:
    """`st run` against the live schema; /readyz is left out (its 503 is readiness by design)."""
    st = st_binary()
    if st is None:
        pytest.skip("schemathesis (`st`) is not installed: pip install -e '.[dev]'")
    cmd = [st, "run", url + "/openapi.json", "--checks", CHECKS, "-n", str(max_examples),
           "--seed", "7", "--generation-database", "none", "--max-time", str(max_time_s),
           "--request-timeout", "5", "--exclude-path", "/readyz", "--phases",
           "examples,coverage,fuzzing", "-H", "X-Admin-Key: adm", "--warnings", "off"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=max_time_s + 60,
                          check=False)


def hostile_env(model_repo: Path, redis_url: str) -> dict[str, str]:
    return service_env(model_repo, redis_url, max_candidates=50, admin_api_key="adm",
                       request_timeout_s=2.0, redis_socket_timeout_s=1.0)


def test_schemathesis_no_5xx_no_schema_break(model_repo: Path, live_redis: RedisServer) -> None:
    with ServerProcess(hostile_env(model_repo, live_redis.url)) as server:
        res = run_schemathesis(server.url, max_examples=10, max_time_s=20)
        alive = httpx.get(server.url + "/healthz", timeout=2).status_code
    summary = res.stdout[-3000:]
    print(summary)
    assert res.returncode == 0, summary
    assert "generated" in summary  # it really ran cases
    assert alive == 200


@pytest.mark.slow
def test_schemathesis_long(model_repo: Path, live_redis: RedisServer) -> None:
    with ServerProcess(hostile_env(model_repo, live_redis.url)) as server:
        res = run_schemathesis(server.url, max_examples=300, max_time_s=300)
    print(res.stdout[-3000:])
    assert res.returncode == 0, res.stdout[-3000:]


def series(text: str) -> set[str]:
    """Sample names with their labels: one entry per metric series."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def junk(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "-_.%") for _ in range(n))


def test_random_paths_and_ids_create_no_metric_series(
    model_repo: Path, live_redis: RedisServer
) -> None:
    rng = random.Random(3)
    with ServerProcess(hostile_env(model_repo, live_redis.url)) as server, \
            httpx.Client(base_url=server.url, timeout=5) as c:
        # one of each kind first: the series of an "other" route and each status exist now
        c.get("/no-such-path")
        c.post("/rank", json={"user_id": "u1", "candidates": ["i1"]})
        c.post("/rank", json={"user_id": "", "candidates": []})
        c.post("/rank", json={"user_id": "zz", "candidates": ["nope"]})
        c.post("/admin/reload", params={"version": 999}, headers={"X-Admin-Key": "adm"})
        c.put("/rank")  # 405: statuses are a small fixed set, each seen once here
        c.get("/metrics")  # its own first observation
        before = series(c.get("/metrics").text)
        statuses = set()
        for i in range(150):
            kind = i % 5
            if kind == 0:
                r = c.get("/" + junk(rng, 12) + "/" + junk(rng, 5))
            elif kind == 1:
                r = c.request(rng.choice(["PUT", "DELETE", "PATCH"]), "/rank")
            elif kind == 2:
                r = c.post("/rank", json={"user_id": junk(rng, 20),
                                          "candidates": [junk(rng, 8) for _ in range(5)]},
                           headers={"X-Request-ID": junk(rng, 30)})
            elif kind == 3:
                r = c.post("/rank", json={"user_id": "u1", "candidates": ["i1"],
                                          "weights": {junk(rng, 6): 1.0}})
            else:
                r = c.post("/admin/reload", params={"version": rng.randint(100, 10**6)},
                           headers={"X-Admin-Key": "adm"})
            statuses.add(r.status_code)
        after = series(c.get("/metrics").text)
    new = sorted(s for s in after - before if not s.startswith(("python_gc", "process_")))
    assert statuses <= {200, 404, 405, 409, 422}, statuses
    assert new == [], f"{len(new)} new series, e.g. {new[:5]}"
