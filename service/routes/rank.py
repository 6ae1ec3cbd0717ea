"""POST /rank: validate, fetch features (one round trip), one batched inference, combine, sort."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import metrics
from service.encode import ranked_items_json
from service.errors import DeadlineExceeded, FeatureStoreDown, ModelUnavailable
from service.featurestore.reader import FeatureStoreUnavailable
from service.ranking import combine, rank_order, sample_positions
from service.registry import LoadedModel
from service.schemas import ErrorResponse, RankRequest, RankResponse
from service.state import AppState, Serving, StateDep
from service.validation import check_rank_request

router = APIRouter()


@dataclass
class Features:
    """Model inputs for one request and how much of them is made up."""

    inputs: dict[str, np.ndarray]
    user_defaulted: int
    items_defaulted: int
    stale: int
    degraded_reason: str | None


def default_features(model: LoadedModel, n: int, reason: str) -> Features:
    """Every user and item feature at its default: the degraded ranking."""
    return Features(model.synthetic_inputs(n), 1, n, 0, reason)


async def fetch_features(state: AppState, serving: Serving, req: RankRequest,
                         deadline: float) -> Features:
    """One feature-store round trip within the deadline; on failure, fail fast or degrade."""
    model, store = serving.model, serving.store
    n = len(req.candidates)
    if store is None:
        return default_features(model, n, "no_feature_store")
    remaining = deadline - time.perf_counter()
    reason = "redis_timeout"
    if remaining > 0:
        try:
            # the reader enforces `timeout_s` on its Redis calls (no extra task per request)
            res = await store.fetch(req.user_id, req.candidates, timeout_s=remaining)
            return Features(dict(res.inputs), int(res.user_defaulted), int(res.items_defaulted),
                            int(res.stale), None)
        except FeatureStoreUnavailable as e:
            reason = "redis_timeout" if e.timed_out else "redis_unavailable"
        except (ConnectionError, OSError):
            reason = "redis_unavailable"
    if state.settings.redis_failure_mode == "degrade":
        return default_features(model, n, reason)
    rejected = "deadline" if reason == "redis_timeout" else "feature_store_unavailable"
    metrics.REJECTED.labels(rejected).inc()
    raise FeatureStoreDown(
        f"feature store {reason.removeprefix('redis_')}; retry later",
        headers={"Retry-After": str(state.settings.retry_after_s)},
    )


async def infer(state: AppState, model: LoadedModel, inputs: dict[str, np.ndarray], n: int,
                remaining_s: float) -> tuple[np.ndarray, np.ndarray | None]:
    """One batched run of n candidates: inline if the model's warm-up timing says it is short,
    else on the inference executor within the remaining deadline.

    Inline saves the thread hop (the inference stage at N=500 went from 0.58 to 0.35 ms, for a
    0.27 ms run of the default model: docs/benchmarks.md); it blocks the event loop for at most
    `inline_inference_max_ms` and cannot be cut off by the deadline, which is why longer runs go
    to the executor.
    """
    if model.estimated_run_s(n) * 1e3 <= state.settings.inline_inference_max_ms:
        metrics.INFERENCE_RUNS_INLINE.inc()
        return model.run(inputs)
    metrics.INFERENCE_RUNS_EXECUTOR.inc()
    future = asyncio.get_running_loop().run_in_executor(state.executor, model.run, inputs)
    try:
        return await asyncio.wait_for(future, remaining_s)
    except TimeoutError as e:
        metrics.REJECTED.labels("deadline").inc()
        raise DeadlineExceeded(
            f"inference did not finish within {state.settings.request_timeout_s}s",
            headers={"Retry-After": str(state.settings.retry_after_s)}) from e


def build_body(req: RankRequest, serving: Serving, rid: str, weights: dict[str, float],
               formula: str, scores: np.ndarray, final: np.ndarray, order: np.ndarray,
               gates: np.ndarray | None, feats: Features) -> dict[str, Any]:
    """The response body for orjson; the items are pre-encoded JSON unless gates are asked for."""
    model = serving.model
    tasks = model.tasks
    items: Any
    if req.explain and gates is not None:
        items = explained_items(req.candidates, tasks, scores, final, order, gates)
    else:
        items = orjson.Fragment(ranked_items_json(req.candidates, order, final, scores, tasks))
    return {
        "request_id": rid,
        "model": {"name": model.name, "version": model.version},
        "tasks": tasks,
        "scoring": formula,
        "weights": weights,
        "items": items,
        "defaulted": {"user": feats.user_defaulted, "items": feats.items_defaulted,
                      "stale": feats.stale},
        "degraded": feats.degraded_reason is not None,
        "degraded_reason": feats.degraded_reason,
    }


def explained_items(ids: list[str], tasks: list[str], scores: np.ndarray, final: np.ndarray,
                    order: np.ndarray, gates: np.ndarray) -> list[dict[str, Any]]:
    """Ranked items as dicts with their gate weights (the `explain` debugging path)."""
    sel_scores = scores[order].tolist()
    sel_final = final[order].tolist()
    sel_gates = gates[order].tolist()
    return [{"id": ids[pos], "score": sel_final[r],
             "scores": dict(zip(tasks, sel_scores[r], strict=True)), "gates": sel_gates[r]}
            for r, pos in enumerate(order.tolist())]


def record_metrics(model: LoadedModel, scores: np.ndarray, gates: np.ndarray | None,
                   feats: Features, sample: int) -> None:
    """Per-request model metrics: counts, a bounded score sample, gate sums."""
    n = scores.shape[0]
    metrics.SCORED.inc(n)
    metrics.CANDIDATES.observe(n)
    if feats.user_defaulted:
        metrics.DEFAULTED.labels("user").inc(feats.user_defaulted)
    if feats.items_defaulted:
        metrics.DEFAULTED.labels("item").inc(feats.items_defaulted)
    if feats.degraded_reason is not None:
        metrics.DEGRADED.labels(feats.degraded_reason).inc()
    if sample:
        metrics.observe_scores(model.tasks, scores, sample_positions(n, sample))
    if gates is not None:
        metrics.add_gate_sums(model.tasks, gates)


@router.post(
    "/rank",
    response_model=None,
    responses={200: {"model": RankResponse}, 413: {"model": ErrorResponse},
               422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def rank(req: RankRequest, state: StateDep, request: Request) -> Response:
    """Rank the candidates for the user with per-request task weights."""
    t0 = time.perf_counter()
    settings = state.settings
    deadline = t0 + settings.request_timeout_s
    # the fetch may use the deadline minus the inference budget; inference always gets its budget
    fetch_deadline = deadline - min(settings.inference_budget_s, settings.request_timeout_s / 2)
    serving = state.serving  # held to the end: the response names exactly this version
    if serving is None:
        raise ModelUnavailable("no model loaded yet", headers={"Retry-After": "1"})
    model = serving.model
    weights = check_rank_request(req, settings, model.tasks)
    formula = req.scoring or settings.scoring
    stage = metrics.STAGE
    t1 = time.perf_counter()
    stage["validate"].observe(t1 - t0)

    feats = await fetch_features(state, serving, req, fetch_deadline)
    t2 = time.perf_counter()
    stage["fetch"].observe(t2 - t1)

    inputs = feats.inputs
    inputs.update(model.context_inputs(req.context))
    t3 = time.perf_counter()
    stage["decode"].observe(t3 - t2)

    remaining = max(deadline - t3, settings.inference_budget_s)
    scores, gates = await infer(state, model, inputs, len(req.candidates), remaining)
    t4 = time.perf_counter()
    stage["inference"].observe(t4 - t3)

    w = np.array([weights[t] for t in model.tasks], dtype=np.float64)
    final = combine(scores, w, formula)
    order = rank_order(final, req.top_k)
    t5 = time.perf_counter()
    stage["combine"].observe(t5 - t4)

    rid = request.state.request_id
    body = orjson.dumps(build_body(req, serving, rid, weights, formula, scores, final, order,
                                   gates, feats))
    stage["serialize"].observe(time.perf_counter() - t5)
    record_metrics(model, scores, gates, feats, settings.score_sample_size)
    return Response(body, media_type="application/json")
