"""Experiments proven on simulated users, end to end: a real uvicorn serving the real app with
an experiments file, a real redis-server with the world's features, `ranker simulate`, the
served log exported to Parquet (`ranker logs export`) and `ranker experiment report`.

- A/B: control = the default trained model, treatment = the same architecture untrained; the
  report declares control better on click with p < 0.01 and finds no sample-ratio mismatch.
- A/A: seeded runs of two arms serving the same model, the file reloaded without restart
  between runs; few significant differences at 0.05 (20 runs: bench/experiments_aa.py).
- Canary: a version that fails at inference above 4 candidates is canaried at 25 % in a
  2-worker server; it is rolled back automatically during the run, and no request outside the
  canary arm fails.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from analysis.report import experiment_report
from launch.local_redis import RedisServer
from tests.conftest import emptied_url
from tests.experiments_e2e.helpers import (
    ADMIN,
    export_logs,
    get_json,
    metric_sum,
    report,
    server_env,
    simulate,
    wait_logged,
)
from tests.service.experiments_files import canary_toml, experiments_toml
from tests.support import ServerProcess, load_world

AB = experiments_toml("trained-vs-untrained", "ab-1")

# every item of the world a candidate; ranked by the click prediction (the task judged)
SIM = ("--candidates", "150", "--top-k", "10", "--timeout", "10",
       "--weights", '{"click": 1, "like": 0, "share": 0}')


def test_ab_the_report_finds_the_trained_model_better(ab_models: Path, world_dir: Path,
                                                      redis_server: RedisServer,
                                                      tmp_path: Path) -> None:
    url = emptied_url(redis_server)
    load_world(url, ab_models / "mmoe" / "1", world_dir)
    exp = tmp_path / "experiments.toml"
    exp.write_text(AB)
    with ServerProcess(server_env(ab_models, url, exp), ready_timeout_s=90) as srv:
        s = simulate(srv.url, world_dir, tmp_path / "sim.json", "--requests", "3000",
                     "--concurrency", "4", "--seed", "3", *SIM)
        assert s["rank_status"] == {"200": 3000}, s["problems"]
        assert s["model_versions"].keys() == {"mmoe/1", "mmoe/2"}
        # one QA request forced into the treatment: logged as forced, left out of the report
        body = json.dumps({"user_id": "u0", "candidates": ["i1", "i2", "i3"]}).encode()
        req = urllib.request.Request(f"{srv.url}/rank", data=body, method="POST", headers={
            "content-type": "application/json", "X-Admin-Key": ADMIN,
            "X-Ranker-Arm": "trained-vs-untrained/treatment"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.loads(r.read())["forced"] is True
        wait_logged(url, 3001, s["feedback"]["accepted_events"])
    export_logs(url, tmp_path / "logs")
    rep = report(tmp_path / "logs", tmp_path / "report", exp)
    assert rep["forced_impressions_left_out"] == 3
    (e,) = rep["experiments"]
    assert e["srm"]["checked"] and not e["srm"]["mismatch"], e["srm"]
    arms = {a["name"]: a for a in e["arms"]}
    assert arms["control"]["control"]
    click = arms["treatment"]["tasks"]["click"]
    assert click["lift"]["value"] < 0 and click["lift"]["ci"][1] < 0, click
    assert click["lift"]["p_value"] < 0.01, click
    assert arms["control"]["tasks"]["click"]["rate"] > click["rate"]


def aa_file(i: int) -> str:
    return experiments_toml(f"aa-{i}", f"aa-salt-{i}", [{"name": "control", "share": 0.5},
                                                        {"name": "treatment", "share": 0.5}])


def run_aa(repo: Path, world_dir: Path, url: str, tmp: Path, runs: int, requests: int
           ) -> list[dict]:
    """`runs` A/A experiments through one server, the file reloaded between them; the report
    of each (its shares declared)."""
    exp = tmp / "experiments.toml"
    exp.write_text(aa_file(0))
    served = events = 0
    with ServerProcess(server_env(repo, url, exp), ready_timeout_s=90) as srv:
        for i in range(runs):
            if i:
                exp.write_text(aa_file(i))
                end = time.monotonic() + 30
                while get_json(f"{srv.url}/model")["experiments"]["experiments"][0][
                        "name"] != f"aa-{i}":
                    assert time.monotonic() < end, "the experiments file was not reloaded"
                    time.sleep(0.05)
            s = simulate(srv.url, world_dir, tmp / f"sim-{i}.json", "--requests",
                         str(requests), "--concurrency", "4", "--seed", str(100 + i), *SIM)
            assert s["rank_status"] == {"200": requests}, s["problems"]
            served += requests
            events += s["feedback"]["accepted_events"]
        wait_logged(url, served, events)
    export_logs(url, tmp / "logs")
    rep = experiment_report(tmp / "logs", shares={f"aa-{i}": {"control": 0.5, "treatment": 0.5}
                                                  for i in range(runs)})
    return list(rep["experiments"])


def test_aa_few_false_positives(ab_models: Path, world_dir: Path, redis_server: RedisServer,
                                tmp_path: Path) -> None:
    url = emptied_url(redis_server)
    load_world(url, ab_models / "mmoe" / "1", world_dir)
    exps = run_aa(ab_models, world_dir, url, tmp_path, runs=5, requests=300)
    assert [e["name"] for e in exps] == [f"aa-{i}" for i in range(5)]
    significant = [e["name"] for e in exps
                   if next(a for a in e["arms"] if a["name"] == "treatment")
                   ["tasks"]["click"]["lift"]["significant"]]
    # 5 runs at alpha 0.05: two or more false positives has probability 2.3 %
    assert len(significant) <= 1, significant
    assert not any(e["srm"]["mismatch"] for e in exps)


CANARY = canary_toml("canary", "canary-1", steps=[0.25, 1.0], max_error_ratio=0.1)


@pytest.fixture
def brittle_repo(pristine_models: Path, tmp_path: Path) -> Path:
    """mmoe/1: the tiny model; mmoe/2: one that passes a warm-up at 4 candidates and fails at
    inference above (tests/service/variants.py)."""
    import shutil

    from tests.service.variants import export_brittle_version

    repo = tmp_path / "models"
    shutil.copytree(pristine_models / "mmoe" / "1", repo / "mmoe" / "1")
    export_brittle_version(repo, 2, max_batch=4)
    return repo


def test_canary_a_failing_version_is_rolled_back_during_the_run(
        brittle_repo: Path, world_dir: Path, redis_server: RedisServer, tmp_path: Path) -> None:
    url = emptied_url(redis_server)  # the world's ids are unknown to the tiny model: defaulted
    exp = tmp_path / "experiments.toml"
    exp.write_text(CANARY)
    (tmp_path / "multiproc").mkdir()
    env = server_env(brittle_repo, url, exp, RANKER_WARMUP_BATCH_SIZES="[1, 4]",
                     RANKER_CANARY_MIN_REQUESTS="5", RANKER_LOG_SAMPLE_RATE="0",
                     PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "multiproc"))
    with ServerProcess(env, workers=2, ready_timeout_s=90) as srv:
        s = simulate(srv.url, world_dir, tmp_path / "sim.json", "--requests", "300",
                     "--concurrency", "4", "--seed", "5", *SIM)
        failed = s["rank_status"].get("500", 0)
        assert set(s["rank_status"]) <= {"200", "500"}, s["rank_status"]
        # each worker judges its own window (5 outcomes) unless the other's rollback reached
        # it first: at most 2 x 5 errors, plus requests in flight at the breach
        assert 1 <= failed <= 16, s["rank_status"]
        # zero failed requests outside the canary: every 500 is a canary arm's error
        assert metric_sum(srv.url, "ranker_arm_requests_total", arm="stable",
                          outcome="error") == 0
        assert metric_sum(srv.url, "ranker_arm_requests_total", arm="canary",
                          outcome="error") == failed
        assert metric_sum(srv.url, "ranker_requests_total", route="/rank",
                          status="500") == failed
        assert metric_sum(srv.url, "ranker_canary_rollbacks_total", experiment="canary") >= 1
        # after the rollback, the canary arm serves nobody
        late = metric_sum(srv.url, "ranker_arm_requests_total", arm="stable")
        assert late >= 300 - failed - 16
        info = get_json(f"{srv.url}/model")["experiments"]["experiments"][0]
        assert info["canary"]["rolled_back"] is True, info
        assert {a["name"]: a["share"] for a in info["arms"]} == {"canary": 0.0, "stable": 1.0}
    rb = json.loads((tmp_path / "experiments.toml.rollback.json").read_text())
    assert rb["canary"]["arm"] == "canary" and "error ratio" in rb["canary"]["reason"]
