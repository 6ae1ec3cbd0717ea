"""Shared bits of the stack tests: repository paths, the metric catalogue, PromQL extraction."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ranker.json"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES_DIR = DEPLOY / "prometheus" / "rules"

# The service's metric names (the contract in the brief); histograms expand to _bucket/_sum/_count.
COUNTERS = {
    "ranker_requests_total",
    "ranker_defaulted_entities_total",
    "ranker_candidates_scored_total",
    "ranker_gate_weight_sum_total",
    "ranker_degraded_responses_total",
    "ranker_model_reloads_total",
    "ranker_rejected_requests_total",
    "ranker_inference_runs_total",
    "ranker_rerank_rules_applied_total",
    "ranker_explored_requests_total",
    "ranker_rerank_rules_reloads_total",
    "ranker_gate_polarised_requests_total",
}
HISTOGRAMS = {
    "ranker_request_duration_seconds",
    "ranker_stage_duration_seconds",
    "ranker_candidates_per_request",
    "ranker_task_score",
}
# The feature store reader's own metrics (service/featurestore/metrics.py), beyond the contract.
COUNTERS |= {
    "ranker_featurestore_defaulted_total",
    "ranker_featurestore_errors_total",
    "ranker_featurestore_retries_total",
    "ranker_featurestore_topology_refreshes_total",  # a cluster only
    "ranker_featurestore_cluster_fallbacks_total",  # a cluster only
}
HISTOGRAMS |= {"ranker_featurestore_fetch_seconds"}
# The served log and feedback (service/servedlog): writer health and online rates by version.
COUNTERS |= {
    "ranker_served_log_written_total",
    "ranker_served_log_dropped_total",
    "ranker_impressions_total",
    "ranker_feedback_events_total",
}
GAUGES = {"ranker_model_info", "ranker_inflight_requests", "ranker_model_fallback",
          "ranker_served_log_queue_depth", "ranker_gate_max_share"}
# Experiments (service/arms.py, service/shadow.py): arms, canary, shadow, loaded versions.
COUNTERS |= {
    "ranker_arm_requests_total",
    "ranker_arm_impressions_total",
    "ranker_arm_feedback_events_total",
    "ranker_experiments_reloads_total",
    "ranker_canary_rollbacks_total",
    "ranker_shadow_runs_total",
}
HISTOGRAMS |= {"ranker_arm_request_duration_seconds", "ranker_shadow_kendall_tau",
               "ranker_shadow_top_overlap"}
GAUGES |= {"ranker_model_memory_bytes", "ranker_arm_share", "ranker_canary_share"}
KNOWN_SERIES = (
    COUNTERS
    | GAUGES
    | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}
)
METRIC_RE = re.compile(r"\branker_[a-z_]+\b")
# Grafana's built-in interval variables, replaced by fixed windows when a query goes to Prometheus.
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, raw expr) for every Prometheus target in the dashboard."""
    return [
        (f"{p['title']} / {t['refId']}", t["expr"])
        for p in dashboard_panels()
        for t in p.get("targets", [])
        if "expr" in t
    ]


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rules() -> list[dict[str, Any]]:
    """Every recording and alerting rule in deploy/prometheus/rules."""
    return [
        rule
        for path in rule_files()
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def rule_name(rule: dict[str, Any]) -> str:
    return str(rule.get("record") or rule.get("alert"))


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana variables ($name / ${name}) the way Grafana does before querying."""
    for name, value in {**GRAFANA_BUILTINS, **variables}.items():
        bare = name.lstrip("$")
        expr = expr.replace("${" + bare + "}", value).replace("$" + bare, value)
    return expr


def metrics_in(expr: str) -> set[str]:
    """The ranker_* series names an expression refers to (recording-rule names excluded)."""
    return {m for m in METRIC_RE.findall(expr)}
