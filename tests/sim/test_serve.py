"""`ranker simulate` against a real uvicorn serving the real app, with a model trained on the
world's own tables and the world's features in a real redis-server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from launch.local_redis import RedisServer
from sim.cli import main
from tests.conftest import emptied_url
from tests.support import ServerProcess, load_world

API_KEY = "sim-test-key"
RUN_KEYS = ("run",)  # what differs between two runs of the same simulation: timings


@pytest.fixture(scope="module")
def model_repo(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MMoE trained (short run) on the world's impressions and exported."""
    from training.pipeline import ensure_default_model

    repo = tmp_path_factory.mktemp("sim_models")
    ensure_default_model(repo, small_data, small=True)
    return repo


@pytest.fixture(scope="module")
def server(model_repo: Path, small_data: Path, redis_server: RedisServer
           ) -> Iterator[ServerProcess]:
    url = emptied_url(redis_server)
    load_world(url, model_repo / "mmoe" / "1", small_data)
    env = {"RANKER_MODEL_REPO": str(model_repo), "RANKER_MODEL_NAME": "mmoe",
           "RANKER_REDIS_URL": url, "RANKER_WARMUP_BATCH_SIZES": "[1, 64]",
           "RANKER_REQUEST_TIMEOUT_S": "5.0", "RANKER_API_KEYS": json.dumps([API_KEY])}
    with ServerProcess(env, ready_timeout_s=60) as proc:
        yield proc


def simulate(server: ServerProcess, small_data: Path, tmp_path: Path, *args: str
             ) -> dict[str, Any]:
    out = tmp_path / f"summary-{len(list(tmp_path.iterdir()))}.json"
    rc = main(["--base-url", server.url, "--data-dir", str(small_data), "--json", str(out),
               *args])
    assert rc == 0, server.log_tail()
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary


def test_a_bounded_run_adds_up(server: ServerProcess, small_data: Path, tmp_path: Path) -> None:
    s = simulate(server, small_data, tmp_path, "--requests", "40", "--concurrency", "3",
                 "--candidates", "60", "--top-k", "8", "--seed", "1", "--api-key", API_KEY,
                 "--weights", '{"click": 1, "like": 4, "share": 8}')
    assert s["requests"] == 40 and s["rank_status"] == {"200": 40}, s["problems"]
    assert s["answered"] == 40 and s["model_versions"] == {"mmoe/1": 40}
    assert s["impressions"] == 40 * 8 and s["problems"] == []
    assert 0 < s["examined"] <= s["impressions"]
    assert s["events"]["click"] <= s["examined"]
    assert s["run"]["stopped_by"] == "requests"
    fb = s["feedback"]
    total_events = sum(s["events"].values())
    # one batch per answered request that drew an event; /feedback is 202, or 404 where the
    # server has no such route (counted, not a failure)
    assert 1 <= fb["batches"] <= 40 and total_events >= fb["batches"]
    assert set(fb["status"]) <= {"202", "404"} and sum(fb["status"].values()) == fb["batches"]
    assert fb["supported"] == ("404" not in fb["status"])
    if fb["status"] == {"202": fb["batches"]}:
        assert fb["accepted_events"] == total_events
    elif fb["status"] == {"404": fb["batches"]}:
        assert fb["accepted_events"] == 0
    er = s["expected_rates"]
    assert er["oracle"]["weighted"] >= er["served"]["weighted"]
    assert er["oracle"]["weighted"] > er["random"]["weighted"]
    # the trained model's ranking carries signal: better than a random order of its candidates
    assert er["served"]["weighted"] > er["random"]["weighted"]
    assert s["position_model"]["top_k"] == 8 and s["position_model"]["examine"][0] == 1.0


def test_same_seed_same_summary_whatever_the_concurrency(server: ServerProcess, small_data: Path,
                                                         tmp_path: Path) -> None:
    args = ("--requests", "25", "--candidates", "40", "--top-k", "5", "--seed", "9",
            "--api-key", API_KEY)
    a = simulate(server, small_data, tmp_path, *args, "--concurrency", "1")
    b = simulate(server, small_data, tmp_path, *args, "--concurrency", "4")
    for k in RUN_KEYS:
        a.pop(k), b.pop(k)
    assert a == b


def test_without_the_api_key_every_request_is_refused_and_counted(
        server: ServerProcess, small_data: Path, tmp_path: Path) -> None:
    s = simulate(server, small_data, tmp_path, "--requests", "5", "--candidates", "10")
    assert s["rank_status"] == {"401": 5} and s["impressions"] == 0
    assert s["feedback"]["batches"] == 0 and s["problems_total"] == 5


def test_the_run_stops_at_max_seconds(server: ServerProcess, small_data: Path,
                                      tmp_path: Path) -> None:
    s = simulate(server, small_data, tmp_path, "--requests", "1000000", "--max-seconds", "1.5",
                 "--candidates", "20", "--api-key", API_KEY, "--timeout", "5")
    assert s["run"]["stopped_by"] == "time" and 0 < s["requests"] < 1_000_000
    assert s["run"]["elapsed_s"] < 1.5 + 2 * 5
    assert s["rank_status"]["200"] == s["requests"]
