"""The OpenAPI schema is the contract (issue 14, item 7): schemathesis, property-based from the
service's own schema against a real uvicorn, passes **all** its checks — among them that every
schema-valid request is accepted (`positive_data_acceptance`; today an empty candidate list is
schema-valid and refused) and every schema-invalid one refused (`negative_data_rejection`).

Bounded: at most `EXAMPLES` generated cases per operation and phase, `MAX_TIME_S` in all.

`/rank`'s `rerank` object is left out of the schema schemathesis reads: its rules have limits
across fields that JSON Schema cannot state (a diversity window no larger than the candidate
list, one factor more than the boost's edges, pins within a share of the list), so a
schema-valid `rerank` may rightly be refused. Those rules are property-tested against their
own checks in tests/service/test_rerank.py; every other field of every route is fuzzed here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from launch.local_redis import RedisServer
from tests.reliability.test_hostile import st_binary
from tests.support import ServerProcess, service_env

EXAMPLES = 10
MAX_TIME_S = 25


def without_rerank(schema: dict) -> dict:
    """The served schema without RankRequest's `rerank` property (see the module doc)."""
    req = schema["components"]["schemas"]["RankRequest"]
    del req["properties"]["rerank"]
    return schema


def test_schemathesis_all_checks_pass(model_repo: Path, live_redis: RedisServer,
                                      tmp_path: Path) -> None:
    st = st_binary()
    if st is None:
        pytest.skip("schemathesis (`st`) is not installed: pip install -e '.[dev]'")
    env = service_env(model_repo, live_redis.url, max_candidates=50, admin_api_key="adm",
                      request_timeout_s=2.0, redis_socket_timeout_s=1.0)
    with ServerProcess(env) as server:
        served = httpx.get(server.url + "/openapi.json", timeout=5).json()
        spec = tmp_path / "openapi.json"
        spec.write_text(json.dumps(without_rerank(served)))
        cmd = [st, "run", str(spec), "--url", server.url, "--checks", "all",
               "-n", str(EXAMPLES), "--seed", "11", "--generation-database", "none",
               "--max-time", str(MAX_TIME_S), "--request-timeout", "5",
               "--phases", "examples,coverage,fuzzing", "-H", "X-Admin-Key: adm",
               "--warnings", "off"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=MAX_TIME_S + 60,
                             check=False)
        alive = httpx.get(server.url + "/healthz", timeout=2).status_code
    summary = res.stdout[-4000:]
    print(summary)
    assert res.returncode == 0, summary
    assert "generated" in summary and "failure" not in summary.split("Test cases:")[-1], summary
    assert alive == 200
