"""Prometheus metrics of the ranking service (names are a contract with the dashboards).

Metrics live in prometheus_client's default registry. When `PROMETHEUS_MULTIPROC_DIR` is set
(several uvicorn workers), prometheus_client writes values to files there and `/metrics`
aggregates every worker's files; gauges declare how they aggregate. Label values always come
from fixed sets (route templates, stage names, task and expert names from the manifest), never
from the request.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25,
                 0.5, 1.0)
CANDIDATE_BUCKETS = (1, 10, 25, 50, 100, 200, 300, 500, 750, 1000, 2000, 5000)
# probabilities of rare tasks (shares) sit far below 0.1, so the low end is fine-grained
SCORE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)

STAGES = ("validate", "fetch", "decode", "inference", "combine", "rerank", "serialize")

REQUESTS = Counter("ranker_requests", "HTTP requests by route template and status",
                   ["route", "status"])
REQUEST_DURATION = Histogram("ranker_request_duration_seconds", "End-to-end request latency",
                             ["route"], buckets=LATENCY_BUCKETS)
STAGE_DURATION = Histogram("ranker_stage_duration_seconds", "Latency of one stage of /rank",
                           ["stage"], buckets=STAGE_BUCKETS)
CANDIDATES = Histogram("ranker_candidates_per_request", "Candidates per /rank request",
                       buckets=CANDIDATE_BUCKETS)
DEFAULTED = Counter("ranker_defaulted_entities", "Entities scored with default features",
                    ["entity"])
SCORED = Counter("ranker_candidates_scored", "Candidates scored by the model")
TASK_SCORE = Histogram("ranker_task_score",
                       "Per-task scores of a deterministic subset of candidates per request",
                       ["task"], buckets=SCORE_BUCKETS)
GATE_WEIGHT_SUM = Counter("ranker_gate_weight_sum",
                          "Sum over scored candidates of the gate weight of (task, expert)",
                          ["task", "expert"])
# gate health: of one request's gate weight of a task (summed over its candidates), the share
# of the largest expert; >= POLARISED_SHARE counts the request as polarised for that task
POLARISED_SHARE = 0.9
GATE_MAX_SHARE = Gauge("ranker_gate_max_share",
                       "Largest expert's share of a task's gate weight in the latest request",
                       ["task"], multiprocess_mode="livemax")
GATE_POLARISED = Counter("ranker_gate_polarised_requests",
                         "Requests whose gate put >= 0.9 of a task's weight on one expert",
                         ["task"])
DEGRADED = Counter("ranker_degraded_responses", "Responses ranked with default features",
                   ["reason"])
MODEL_INFO = Gauge("ranker_model_info", "1 for the model version being served",
                   ["name", "version"], multiprocess_mode="livemax")
MODEL_FALLBACK = Gauge("ranker_model_fallback", "1 while an older model version serves because "
                       "every newer one was refused", multiprocess_mode="livemax")
MODEL_RELOADS = Counter("ranker_model_reloads", "Model version loads by result", ["result"])
REJECTED = Counter("ranker_rejected_requests", "Requests refused before ranking", ["reason"])
INFERENCE_RUNS = Counter("ranker_inference_runs", "Batched inference calls by where they ran "
                         "(inline on the event loop or on the inference executor)", ["path"])
INFERENCE_RUNS_INLINE = INFERENCE_RUNS.labels("inline")
INFERENCE_RUNS_EXECUTOR = INFERENCE_RUNS.labels("executor")
INFLIGHT = Gauge("ranker_inflight_requests", "Requests being processed",
                 multiprocess_mode="livesum")

EXPLORED = Counter("ranker_explored_requests", "Requests served in a random order "
                   "(RANKER_EXPLORE_RATE), with their propensities in the served log")
RERANK_APPLIED = Counter("ranker_rerank_rules_applied", "Requests in which a re-rank rule changed "
                         "something, by rule (service.rerank.RULES)", ["rule"])
_RERANK_CHILDREN: dict[str, Any] = {}


def count_rerank(rules: list[str]) -> None:
    """One increment per re-rank rule that changed this request's list (children cached)."""
    for rule in rules:
        child = _RERANK_CHILDREN.get(rule)
        if child is None:
            child = _RERANK_CHILDREN[rule] = RERANK_APPLIED.labels(rule)
        child.inc()


RERANK_RELOADS = Counter("ranker_rerank_rules_reloads", "Loads of the re-rank rules file by result",
                         ["result"])


# the served log and feedback (service/servedlog/writer.py); model_version is a served version
# or "unknown", task one of the serving model's tasks, stream "served" | "feedback"
LOG_WRITTEN = Counter("ranker_served_log_written", "Entries written to the log streams",
                      ["stream"])
LOG_DROPPED = Counter("ranker_served_log_dropped",
                      "Log entries dropped (queue full, Redis unavailable, no Redis, shutdown)",
                      ["stream", "reason"])
LOG_QUEUE_DEPTH = Gauge("ranker_served_log_queue_depth", "Log entries waiting for the writer",
                        multiprocess_mode="livesum")
IMPRESSIONS = Counter("ranker_impressions", "Items returned by /rank, by model version",
                      ["model_version"])
FEEDBACK_EVENTS = Counter("ranker_feedback_events",
                          "Feedback events accepted, by task and the version that served them",
                          ["task", "model_version"])


# experiments (service/experiments.py): experiment and arm names come from the experiments file
# (validated charset, a handful per file), never from the request; "forced" requests (QA) apart
ARM_REQUESTS = Counter("ranker_arm_requests", "/rank requests assigned to an experiment arm, by "
                       "outcome (ok | error) and whether the arm was forced (QA header)",
                       ["experiment", "arm", "outcome", "forced"])
ARM_DURATION = Histogram("ranker_arm_request_duration_seconds",
                         "/rank pipeline latency of requests assigned to an arm",
                         ["experiment", "arm"], buckets=LATENCY_BUCKETS)
ARM_IMPRESSIONS = Counter("ranker_arm_impressions", "Items returned by /rank, by experiment arm",
                          ["experiment", "arm"])
ARM_FEEDBACK_EVENTS = Counter("ranker_arm_feedback_events",
                              "Feedback events accepted, by task and the arm that served them",
                              ["task", "experiment", "arm"])
EXPERIMENTS_RELOADS = Counter("ranker_experiments_reloads",
                              "Loads of the experiments file by result", ["result"])
MODEL_MEMORY = Gauge("ranker_model_memory_bytes", "Resident memory taken by loading a model "
                     "version (RSS growth over its load and warm-up)", ["name", "version"],
                     multiprocess_mode="livemax")  # live*: a dead worker's value leaves /metrics
ARM_SHARE = Gauge("ranker_arm_share", "The share of its experiment's users an arm serves now "
                  "(declared, or the canary's step)", ["experiment", "arm"],
                  multiprocess_mode="livemax")
CANARY_SHARE = Gauge("ranker_canary_share", "The canary arm's share of its experiment's users now",
                     ["experiment", "arm"], multiprocess_mode="livemin")
CANARY_ROLLBACKS = Counter("ranker_canary_rollbacks", "Canary arms rolled back to share 0 on a "
                           "breach of their error-ratio or p99 limit", ["experiment", "arm",
                                                                       "reason"])
SHADOW_RUNS = Counter("ranker_shadow_runs", "Shadow scorings by result (scored | dropped | "
                      "failed)", ["result"])
SHADOW_TAU = Histogram("ranker_shadow_kendall_tau", "Kendall's tau-b of the shadow model's and "
                       "the live final scores over a request's candidates",
                       buckets=(-1.0, -0.5, 0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))
SHADOW_TOP10 = Histogram("ranker_shadow_top_overlap", "Share of the live top 10 that is in the "
                         "shadow's top 10", buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                     0.8, 0.9, 1.0))

# label children looked up once, not per observation on the hot path
STAGE = {s: STAGE_DURATION.labels(s) for s in STAGES}


class StageTimer:
    """Observes the time since the previous lap as one /rank stage: the one place stage
    durations are taken (perf_counter; deadlines are on the event loop's clock)."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        STAGE[stage].observe(now - self._last)
        self._last = now


def observe_scores(tasks: list[str], scores: np.ndarray, positions: np.ndarray) -> None:
    """Observe the per-task scores [N, T] of the given candidate positions."""
    sub = scores[positions]
    for j, task in enumerate(tasks):
        hist = TASK_SCORE.labels(task)
        for v in sub[:, j].tolist():
            hist.observe(v)


def add_gate_sums(tasks: list[str], gates: np.ndarray) -> None:
    """One increment per (task, expert): the gate weights [N, T, M] summed over candidates;
    and per task the largest expert's share of that sum (gate health)."""
    sums = gates.sum(axis=0, dtype=np.float64)
    for j, task in enumerate(tasks):
        for m, v in enumerate(sums[j].tolist()):
            child = _GATE_CHILDREN.get((task, m))
            if child is None:
                child = _GATE_CHILDREN[task, m] = GATE_WEIGHT_SUM.labels(task, str(m))
            child.inc(v)
    total = sums.sum(axis=1)  # (T,)
    for j, task in enumerate(tasks):
        if total[j] <= 0:
            continue
        share = float(sums[j].max() / total[j])
        children = _HEALTH_CHILDREN.get(task)
        if children is None:
            children = _HEALTH_CHILDREN[task] = (GATE_MAX_SHARE.labels(task),
                                                 GATE_POLARISED.labels(task))
        children[0].set(share)
        if share >= POLARISED_SHARE:
            children[1].inc()


_GATE_CHILDREN: dict[tuple[str, int], Any] = {}
_HEALTH_CHILDREN: dict[str, tuple[Any, Any]] = {}


def set_model_info(name: str, version: int, old: tuple[str, int] | None) -> None:
    """Mark `version` as serving and the previous one (if any) as not."""
    if old is not None and old != (name, version):
        MODEL_INFO.labels(old[0], str(old[1])).set(0)
    MODEL_INFO.labels(name, str(version)).set(1)


def render() -> tuple[bytes, str]:
    """The exposition text: this process, or every worker's files in multiprocess mode."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # the same test prometheus_client makes
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
