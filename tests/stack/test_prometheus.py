"""Every dashboard query and every rule, evaluated by a real Prometheus scraping the real service.

Real parts: redis-server (embedded), the tiny exported model, `ranker serve` with 2 uvicorn
workers (multiprocess metrics) and /metrics + /admin on a separate operator port (as in
docker-compose.yml), and Debian's `prometheus` scraping that port
every second with deploy/prometheus/prometheus.yml (targets and intervals replaced) and the
rule files. The traffic exercises every signal the dashboard shows: good requests, unknown
users and items (defaulted), invalid and oversized bodies (rejected), an unknown path, a failed
model reload (a corrupted version 2) and, after Redis is stopped, degraded responses; every
response is logged (`RANKER_LOG_SAMPLE_RATE=1`) and feedback is posted for some of them, so the
served log and online-rate panels have data too (drops come from the Redis outage).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from launch import procs
from tests.stack.helpers import (
    KNOWN_SERIES,
    PROM_CONFIG,
    ROOT,
    dashboard_queries,
    metrics_in,
    rule_files,
    rule_name,
    rules,
    substitute,
)

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not installed (Debian package `prometheus`; .ci/run installs it)",
)

TASKS = ("click", "like", "share")  # the tiny model's tasks: the values of the $task variable
# Dashboard queries that may legitimately return nothing after this traffic, and why.
EXPECTED_EMPTY: dict[str, str] = {
    "Requests per second by experiment arm and outcome / B [task=-]":
        "forced arms need the admin key, which this stack does not configure (QA traffic only)",
}
MAX_BODY = 4096
STACK_EXPERIMENTS = """
[[experiment]]
name = "stack"
salt = "stack-1"
[[experiment.arm]]
name = "treatment"
share = 0.5
weights = {click = 1.0, like = 1.0, share = 1.0}  # the defaults: the bursts' answers stay
[[experiment.arm]]
name = "control"
share = 0.5
[experiment.canary]
arm = "treatment"
steps = [0.5, 1.0]
step_s = 86400
max_error_ratio = 1.0
max_p99_ms = 60000

[shadow]
model_version = 1
"""


@dataclass
class Stack:
    service_url: str
    ops_url: str
    prom_url: str
    redis_stop: Callable[[], None]
    version2: Path


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _wait(what: str, check: Callable[[], bool], timeout_s: float, proc: Any = None) -> None:
    procs.wait_until(check, timeout_s=timeout_s, proc=proc, what=what, interval_s=0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    procs.stop(proc, 15.0)


def _prometheus_config(target: str, dest: Path) -> Path:
    """The repo's config with the live target, 1 s intervals and absolute rule paths."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(p) for p in rule_files()]
    (job,) = cfg["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    dest.write_text(yaml.safe_dump(cfg))
    return dest


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from launch.local_redis import RedisServer
    from launch.procs import free_port
    from service.featurestore.writer import load_tables, make_sync_client
    from tests.launch.test_mainjob import write_tiny_tables

    tmp = tmp_path_factory.mktemp("promstack")
    repo = tmp / "models"
    shutil.copytree(tiny_model_dir, repo / "ranker" / "1")
    write_tiny_tables(tmp / "data")
    procs: list[subprocess.Popen[bytes]] = []
    redis = RedisServer().start()
    try:
        import pyarrow.parquet as pq

        from ranker.manifest import load_manifest, load_schema

        vdir = repo / "ranker" / "1"
        schema = load_schema(vdir, load_manifest(vdir))
        client = make_sync_client(redis.url)
        try:
            load_tables(client, schema, pq.read_table(tmp / "data/users.parquet"),
                        pq.read_table(tmp / "data/items.parquet"), progress=False)
        finally:
            client.close()

        port, ops_port = free_port(), free_port()
        (tmp / "multiproc").mkdir()
        rules = tmp / "rerank.toml"  # a preset the bursts ask for (the re-rank panel's data)
        rules.write_text('[presets.diverse.diversity]\nattribute = "category"\n'
                         'max_per_window = 1\nwindow = 3\n')
        # an experiment (arms, a canary that stays within its limits) and a shadow, so the
        # experiments row has data
        experiments = tmp / "experiments.toml"
        experiments.write_text(STACK_EXPERIMENTS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RANKER_")}
        env.update(RANKER_MODEL_REPO=str(repo), RANKER_MODEL_NAME="ranker",
                   RANKER_REDIS_URL=redis.url, RANKER_REDIS_FAILURE_MODE="degrade",
                   RANKER_MAX_BODY_BYTES=str(MAX_BODY), RANKER_METRICS_PORT=str(ops_port),
                   RANKER_LOG_SAMPLE_RATE="1", RANKER_LOG_WRITE_TIMEOUT_S="0.2",
                   RANKER_RERANK_RULES_FILE=str(rules),
                   RANKER_EXPERIMENTS_FILE=str(experiments),
                   PROMETHEUS_MULTIPROC_DIR=str(tmp / "multiproc"))
        service = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "serve", "--host", "127.0.0.1", "--port",
             str(port), "--workers", "2", "--log-level", "warning"], cwd=ROOT, env=env)
        procs.append(service)
        service_url = f"http://127.0.0.1:{port}"
        _wait("the service to be ready", lambda: _http("GET", f"{service_url}/readyz")[0] == 200,
              90, service)

        prom_port = free_port()
        config = _prometheus_config(f"127.0.0.1:{ops_port}", tmp / "prometheus.yml")
        assert PROMETHEUS is not None
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(prom)
        prom_url = f"http://127.0.0.1:{prom_port}"
        _wait("Prometheus to be ready", lambda: _http("GET", f"{prom_url}/-/ready")[0] == 200,
              30, prom)
        _wait("the first scrape",
              lambda: bool(query(prom_url, 'up{job="ranker"} == 1')), 30, prom)
        yield Stack(service_url, f"http://127.0.0.1:{ops_port}", prom_url, redis.stop,
                    repo / "ranker" / "2")
    finally:
        for p in reversed(procs):
            _stop(p)
        redis.stop()


def query(prom_url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query through the HTTP API; raises with Prometheus's error if it fails."""
    url = f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, raw = _http("GET", url)
    body = json.loads(raw)
    if status != 200 or body.get("status") != "success":
        raise AssertionError(f"{expr!r}: {status} {body.get('errorType')}: {body.get('error')}")
    return list(body["data"]["result"])


def _rank(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, raw = _http("POST", f"{url}/rank", json.dumps(body).encode(),
                        headers={"content-type": "application/json"})
    return status, json.loads(raw) if raw else {}


def _feedback(url: str, events: list[dict[str, Any]]) -> None:
    status, raw = _http("POST", f"{url}/feedback", json.dumps({"events": events}).encode(),
                        headers={"content-type": "application/json"})
    assert status == 202, raw


def _burst(url: str) -> None:
    """Good, defaulted, invalid, oversized and unknown-path requests, with their statuses, and
    feedback on the good ones (plus one event for a request never served)."""
    items = [f"i{i}" for i in range(40)]
    for n in range(12):
        status, body = _rank(url, {"user_id": f"u{n}", "candidates": items,
                                   "context": {"hour": str(n), "surface": "home"}})
        assert status == 200 and not body["degraded"], body
        _feedback(url, [{"request_id": body["request_id"], "item_id": body["items"][0]["id"],
                         "event": task, "ts": time.time()} for task in TASKS])
    _feedback(url, [{"request_id": "never-served", "item_id": "i1", "event": "click",
                     "ts": time.time()}])
    status, body = _rank(url, {"user_id": "u1", "candidates": items,
                               "rerank": {"preset": "diverse"}})
    assert status == 200 and "diversity" in body["rerank"]["applied"], body
    status, body = _rank(url, {"user_id": "nobody", "candidates": ["i1", "no-such-item"]})
    assert status == 200 and body["defaulted"] == {"user": 1, "items": 1, "stale": 0}, body
    assert _rank(url, {"user_id": "u1", "candidates": "i1"})[0] == 422
    assert _rank(url, {"user_id": "u1", "candidates": ["x" * 200] * 30})[0] == 413
    assert _http("GET", f"{url}/no/such/path")[0] == 404


def _wait_for_value(prom_url: str, expr: str, want: float, timeout_s: float = 30) -> None:
    def seen() -> bool:
        res = query(prom_url, expr)
        return bool(res) and float(res[0]["value"][1]) >= want

    _wait(f"{expr} >= {want}", seen, timeout_s)


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Stack:
    """Two bursts a few scrapes apart (so rates have two samples), a failed reload, then Redis
    stops and responses degrade; returns once Prometheus has scraped all of it."""
    _burst(stack.service_url)
    time.sleep(2.5)
    _burst(stack.service_url)
    # a corrupted version 2: the manifest's sha256 no longer matches the model file
    shutil.copytree(stack.version2.parent / "1", stack.version2)
    with open(stack.version2 / "model.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"corrupted")
    assert _http("POST", f"{stack.service_url}/admin/reload")[0] == 404  # not on the API port
    status, raw = _http("POST", f"{stack.ops_url}/admin/reload")
    assert status == 409, raw
    stack.redis_stop()
    for _ in range(2):
        for _ in range(6):
            status, body = _rank(stack.service_url, {"user_id": "u1", "candidates": ["i1", "i2"]})
            assert status == 200 and body["degraded"], body
        time.sleep(1.5)
    _wait_for_value(stack.prom_url, "sum(ranker_degraded_responses_total)", 12)
    _wait_for_value(stack.prom_url, 'sum(ranker_model_reloads_total{result="failure"})', 1)
    time.sleep(2.5)  # a couple more scrapes and rule evaluations on top of the final values
    return stack


def _dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for where, raw in dashboard_queries():
        tasks = TASKS if "$task" in raw else ("-",)
        out += [(f"{where} [task={t}]", substitute(raw, {"task": t})) for t in tasks]
    return out


def test_metrics_only_on_the_operator_port(stack: Stack) -> None:
    assert _http("GET", f"{stack.service_url}/metrics")[0] == 404
    status, raw = _http("GET", f"{stack.ops_url}/metrics")
    assert status == 200 and b"ranker_requests_total" in raw


def test_promtool_accepts_the_live_config(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool ships with the prometheus package"
    config = _prometheus_config("127.0.0.1:8000", tmp_path / "prometheus.yml")
    done = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("where", "expr"), _dashboard_exprs())
def test_dashboard_query_evaluates_with_data(traffic: Stack, where: str, expr: str) -> None:
    result = query(traffic.prom_url, expr)
    if where not in EXPECTED_EMPTY:
        assert result, f"{where}: no data for {expr}"


@pytest.mark.parametrize("name", [rule_name(r) for r in rules()])
def test_rule_expression_evaluates(traffic: Stack, name: str) -> None:
    rule = next(r for r in rules() if rule_name(r) == name)
    result = query(traffic.prom_url, rule["expr"])
    if "record" in rule:
        assert result, f"recording rule {name} has no data"
        assert query(traffic.prom_url, name), f"Prometheus has not recorded {name}"


def test_prometheus_evaluates_every_rule_healthily(traffic: Stack) -> None:
    status, raw = _http("GET", f"{traffic.prom_url}/api/v1/rules")
    assert status == 200, raw
    groups = json.loads(raw)["data"]["groups"]
    seen = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(seen) == {rule_name(r) for r in rules()}
    for name, r in seen.items():
        assert r["health"] == "ok", f"{name}: {r.get('lastError')}"


def test_the_faults_raise_their_alerts_and_healthy_signals_do_not(traffic: Stack) -> None:
    """The failed reload fires at once (no `for`); the Redis outage is pending (for: 1m)."""
    status, raw = _http("GET", f"{traffic.prom_url}/api/v1/alerts")
    assert status == 200, raw
    alerts = {a["labels"]["alertname"]: a["state"] for a in json.loads(raw)["data"]["alerts"]}
    assert alerts.get("RankerModelReloadFailed") == "firing"
    assert alerts.get("RankerRedisUnavailable") in ("pending", "firing")
    assert "RankerErrorRatioHigh" not in alerts  # degrade mode: no 5xx
    assert "RankerDown" not in alerts


def test_service_exports_exactly_the_contract_and_the_dashboard_uses_it(traffic: Stack) -> None:
    """Drift check: what Prometheus scraped from the service vs what the dashboard queries."""
    scraped = {r["metric"]["__name__"]
               for r in query(traffic.prom_url, 'group by (__name__) ({__name__=~"ranker_.*"})')}
    scraped = {n for n in scraped if not n.endswith("_created")}
    assert scraped <= KNOWN_SERIES, f"not in the metrics contract: {sorted(scraped - KNOWN_SERIES)}"
    used = set().union(*(metrics_in(e) for _, e in dashboard_queries()))
    families = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                for n in scraped}
    used_families = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                     for n in used}
    assert families <= used_families, f"not on the dashboard: {sorted(families - used_families)}"
