"""The /rank request path as one object: validate, fetch, filter, decode, infer, combine,
rerank, encode.

`RankingPipeline.rank` runs the stages in order under one deadline on the event loop's clock
(the clock `asyncio.timeout_at` and the deadline middleware use) and records each stage's
duration in `ranker_stage_duration_seconds` through one `metrics.StageTimer` (the re-rank
filters, which drop candidates before scoring, count in the `decode` stage). Every stage is a
public method, so the benchmark (`bench/floors.py`) times exactly what a request runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from itertools import compress
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import orjson

from service import metrics
from service.encode import explained_items, ranked_items_json
from service.errors import (
    DeadlineExceeded,
    FeatureStoreDown,
    InferenceFailed,
    InvalidRequest,
    ModelUnavailable,
)
from service.experiments import Assignment, ForcedArmError, Overrides
from service.featurestore.reader import FeatureStore, FeatureStoreUnavailable
from service.ranking import combine as combine_scores
from service.ranking import explore_order, propensities, rank_order, sample_positions
from service.registry import LoadedModel
from service.rerank import Filtered, Outcome, ResolvedCache, Rules, attributes, filter_candidates
from service.rerank import apply as apply_rules
from service.rerank_rules import RulesFile
from service.schemas import RankRequest
from service.servedlog.writer import ServedLog
from service.settings import Settings
from service.shadow import Job as ShadowJob
from service.shadow import ShadowScorer
from service.validation import check_rank_request, check_rerank, rerank_bounds

if TYPE_CHECKING:
    from service.arms import Arms


log = logging.getLogger("ranker.pipeline")
# what onnxruntime raises when a graph fails on an input (Fail, InvalidArgument,
# RuntimeException in its Python binding; plain Exception subclasses)
ORT_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail,
              ort.capi.onnxruntime_pybind11_state.InvalidArgument,
              ort.capi.onnxruntime_pybind11_state.RuntimeException)


@dataclass(frozen=True)
class Serving:
    """The model being served and the feature store view for its schema: swapped as one object."""

    model: LoadedModel
    store: FeatureStore | None  # None without Redis


@dataclass
class Features:
    """Model inputs for one request and how much of them is made up."""

    inputs: dict[str, np.ndarray]
    user_defaulted: int
    items_defaulted: int
    stale: int
    degraded_reason: str | None
    seen: Collection[bytes] | None = None  # the user's seen set (only when a rule asks)
    filtered: Filtered | None = None  # what the filters dropped (`RankingPipeline.filter`)


@dataclass(frozen=True)
class Scoring:
    """How a request is scored: one weight per task and the formula."""

    weights: dict[str, float]
    formula: str
    rerank: Rules | None = None  # None: no re-rank rule applies (today's order, today's body)


@dataclass(frozen=True)
class Ranking:
    """Per-task scores [N, T], gate weights [N, T, M] or None, final scores [N], order [K]."""

    scores: np.ndarray
    gates: np.ndarray | None
    final: np.ndarray
    order: np.ndarray
    rerank: Outcome | None = None  # what the re-rank stage did, when rules applied
    # P(each served item is in the top K) under the exploring policy, served order; None when
    # the service does not explore (every served item's is then 1)
    propensity: np.ndarray | None = None


def default_features(model: LoadedModel, n: int, reason: str) -> Features:
    """Every user and item feature at its default: the degraded ranking."""
    return Features(model.synthetic_inputs(n), 1, n, 0, reason)


class RankingPipeline:
    """Ranks one request against the model being served (`serving`, swapped by the lifespan)."""

    def __init__(self, settings: Settings, executor: Executor) -> None:
        self.settings = settings
        self.executor = executor  # inference runs too long to run inline
        self.serving: Serving | None = None
        # the re-rank presets; an invalid file at startup raises (RulesFileError)
        self.rerank_bounds = rerank_bounds(settings)
        self.rules = RulesFile(settings.rerank_rules_file, self.rerank_bounds,
                               settings.rerank_rules_poll_s)
        self.resolved = ResolvedCache()  # the rules resolved per rule set (service.rerank)
        self.log: ServedLog | None = None  # the served log (set by the lifespan)
        self.active = 0  # requests inside rank() on this event loop
        self.arms: Arms | None = None  # the experiments in force (set by the lifespan)
        self.shadow: ShadowScorer | None = None
        # a feature store view for an arm's model (its schema; set by the lifespan)
        self.store_for: Callable[[LoadedModel], FeatureStore | None] = lambda m: None
        self._arm_serving: dict[tuple[str, int], Serving] = {}

    async def rank(self, req: RankRequest, request_id: str, forced: str | None = None) -> bytes:
        """The JSON response body for `req`: every stage in order, each one timed. `forced`
        is an authorised `X-Ranker-Arm` value (experiment/arm)."""
        self.active += 1  # requests in the pipeline now: the log writer works when there are none
        try:
            arm = self.assign(req.user_id, forced)
            if arm is None:
                return await self._rank(req, request_id)
            assert self.arms is not None
            t0, ok = time.perf_counter(), False
            try:
                body = await self._rank(req, request_id, arm)
                ok = True
                return body
            except InvalidRequest:
                ok = True  # the request's fault, not the arm's
                raise
            finally:
                self.arms.record(arm, ok, time.perf_counter() - t0)
        finally:
            self.active -= 1
            if not self.active and self.log is not None:
                self.log.wake()  # the writer may be waiting for this moment

    def assign(self, user_id: str, forced: str | None) -> Assignment | None:
        """The request's experiment arm, or None (the default response)."""
        if self.arms is None:
            if forced is not None:  # never a silent default response to a QA request
                raise InvalidRequest([{"field": "header.X-Ranker-Arm",
                                       "message": "no experiments are configured "
                                                  "(RANKER_EXPERIMENTS_FILE)"}])
            return None
        try:
            return self.arms.resolve(user_id, forced)
        except ForcedArmError as e:
            raise InvalidRequest([{"field": "header.X-Ranker-Arm", "message": str(e)}]) from e

    def serving_for(self, arm: Assignment | None) -> Serving | None:
        """The arm's model and feature store view; the served model without an override."""
        model = None if arm is None or self.arms is None else self.arms.model_for(arm)
        if model is None:
            return self.serving
        key = (model.name, model.version)
        got = self._arm_serving.get(key)
        if got is None or got.model is not model:
            if len(self._arm_serving) > 16:  # versions come and go with the file
                self._arm_serving.clear()
            got = self._arm_serving[key] = Serving(model, self.store_for(model))
        return got

    async def _rank(self, req: RankRequest, request_id: str,
                    arm: Assignment | None = None) -> bytes:
        settings = self.settings
        loop = asyncio.get_running_loop()
        timer = metrics.StageTimer()
        deadline = loop.time() + settings.request_timeout_s
        # the fetch may use the deadline minus the inference budget; inference always gets its
        # budget, so a degraded ranking still runs after a feature store timeout
        reserve = min(settings.inference_budget_s, settings.request_timeout_s / 2)
        serving = self.serving_for(arm)  # held to the end: the response names this version
        if serving is None:
            raise ModelUnavailable("no model loaded yet", headers={"Retry-After": "1"})
        model = serving.model
        if arm is not None:
            req = apply_overrides(req, arm.overrides)
        scoring = self.validate(model, req)
        timer.lap("validate")
        feats = await self.fetch(serving, req, deadline - reserve,
                                 seen=scoring.rerank is not None and scoring.rerank.seen)
        timer.lap("fetch")
        requested = len(req.candidates)
        req, feats = self.filter(model, req, scoring, feats)
        inputs = self.decode(model, req, feats)
        timer.lap("decode")
        infer_deadline = max(deadline, loop.time() + settings.inference_budget_s)
        scores, gates = await self.infer(model, inputs, len(req.candidates), infer_deadline)
        timer.lap("inference")
        ranking = self.combine(model, scoring, scores, gates, req.top_k)
        timer.lap("combine")
        ranking = self.explore(request_id, self.rerank(model, req, scoring, ranking, feats))
        timer.lap("rerank")
        body = self.encode(req, model, request_id, scoring, ranking, feats, arm)
        timer.lap("serialize")
        record_metrics(model, ranking, feats, settings.score_sample_size, requested)
        self.after(request_id, req, model, scoring, ranking, inputs, arm)
        return body

    def after(self, request_id: str, req: RankRequest, model: LoadedModel, scoring: Scoring,
              ranking: Ranking, inputs: dict[str, np.ndarray], arm: Assignment | None) -> None:
        """The served log and the shadow, off the request path: never waits."""
        shadow = None
        if self.arms is not None and self.shadow is not None:
            shadow = self.arms.shadow_model(request_id)
        held = None
        if self.log is not None:  # a sampled response is queued or dropped
            held = self.log.served(
                request_id, req, model, scoring, ranking, inputs,
                None if arm is None else (arm.experiment, arm.arm, arm.forced),
                hold=shadow is not None)
        if shadow is not None and self.shadow is not None:
            self.shadow.offer(ShadowJob(shadow, inputs, scoring, ranking, held))

    def validate(self, model: LoadedModel, req: RankRequest) -> Scoring:
        """Check the request against the settings and the model's tasks (InvalidRequest)."""
        weights = check_rank_request(req, self.settings, model.tasks, model.dense_context)
        rules = check_rerank(req, self.settings, model.schema, self.rules.current(),
                             self.rerank_bounds, self.resolved)
        return Scoring(weights, req.scoring or self.settings.scoring, rules)

    async def fetch(self, serving: Serving, req: RankRequest, deadline: float,
                    seen: bool = False) -> Features:
        """One feature-store round trip before `deadline` (event-loop clock); on failure, fail
        fast (FeatureStoreDown) or degrade to default features, as configured. With `seen`
        the user's seen set rides in the same round trip (for the re-rank filter)."""
        model, store = serving.model, serving.store
        n = len(req.candidates)
        if store is None:
            return default_features(model, n, "no_feature_store")
        remaining = deadline - asyncio.get_running_loop().time()
        reason = "redis_timeout"
        if remaining > 0:
            try:
                # the reader enforces `timeout_s` on its Redis calls (no extra task per request)
                res = await store.fetch(req.user_id, req.candidates, timeout_s=remaining,
                                        seen=seen)
                return Features(dict(res.inputs), int(res.user_defaulted),
                                int(res.items_defaulted), int(res.stale), None, res.seen)
            except FeatureStoreUnavailable as e:
                reason = "redis_timeout" if e.timed_out else "redis_unavailable"
            except (ConnectionError, OSError):
                reason = "redis_unavailable"
        if self.settings.redis_failure_mode == "degrade":
            return default_features(model, n, reason)
        metrics.REJECTED.labels("deadline" if reason == "redis_timeout"
                                else "feature_store_unavailable").inc()
        raise FeatureStoreDown(
            f"feature store {reason.removeprefix('redis_')}; retry later",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    def filter(self, model: LoadedModel, req: RankRequest, scoring: Scoring, feats: Features
               ) -> tuple[RankRequest, Features]:
        """The re-rank filters, before scoring: the excluded and seen candidates leave the
        request and the fetched features' candidate rows, so they are neither scored nor
        served, and every later stage (the response, the served log, the shadow) sees the
        candidates kept. Without a filter rule the request is returned as it is."""
        rules = scoring.rerank
        if rules is None or not (rules.exclude or rules.seen):
            return req, feats
        f = filter_candidates(rules, req.candidates, feats.seen)
        keep = f.keep
        if keep is None or f.kept is None:
            return req, replace(feats, filtered=f)
        per_item = model.candidate_inputs
        # np.take and compress: a fraction of fancy indexing's and a comprehension's cost here
        inputs = {k: np.take(v, keep, axis=0) if k in per_item else v
                  for k, v in feats.inputs.items()}
        return (req.model_copy(update={"candidates": list(compress(req.candidates, f.kept))}),
                replace(feats, inputs=inputs, filtered=f))

    def decode(self, model: LoadedModel, req: RankRequest, feats: Features
               ) -> dict[str, np.ndarray]:
        """The model's inputs: the fetched features plus the request's context (batch 1)."""
        inputs = feats.inputs
        inputs.update(model.context_inputs(req.context))
        return inputs

    async def infer(self, model: LoadedModel, inputs: dict[str, np.ndarray], n: int,
                    deadline: float) -> tuple[np.ndarray, np.ndarray | None]:
        """One batched run of n candidates: inline if the model's warm-up timing says it is
        short, else on the inference executor, cut off at `deadline` (event-loop clock).

        Inline saves the executor's thread hop (docs/benchmarks.md); it blocks the event loop
        for at most `inline_inference_max_ms` and cannot be cut off by the deadline, which is
        why longer runs go to the executor.
        """
        settings = self.settings
        if n == 0:  # the filters left nothing: the outputs' shapes, never a graph run at batch 0
            scores, gates = model.run(model.synthetic_inputs(1))
            return scores[:0], None if gates is None else gates[:0]
        try:
            if model.estimated_run_s(n) * 1e3 <= settings.inline_inference_max_ms:
                metrics.INFERENCE_RUNS_INLINE.inc()
                return model.run(inputs)
            metrics.INFERENCE_RUNS_EXECUTOR.inc()
            future = asyncio.get_running_loop().run_in_executor(self.executor, model.run, inputs)
            async with asyncio.timeout_at(deadline):
                return await future
        except ORT_ERRORS as e:  # the model broke at this input: its version answers a 500
            log.error("model %s version %s failed at %d candidates: %s: %s", model.name,
                      model.version, n, type(e).__name__, e)
            raise InferenceFailed(f"model {model.name} version {model.version} failed at "
                                  f"inference") from e
        except TimeoutError as e:
            metrics.REJECTED.labels("deadline").inc()
            raise DeadlineExceeded(
                f"inference did not finish within {settings.request_timeout_s}s",
                headers={"Retry-After": str(settings.retry_after_s)}) from e

    def combine(self, model: LoadedModel, scoring: Scoring, scores: np.ndarray,
                gates: np.ndarray | None, top_k: int | None) -> Ranking:
        """Final scores from the per-task scores and the request's weights; order and cut."""
        w = np.array([scoring.weights[t] for t in model.tasks], dtype=np.float64)
        final = combine_scores(scores, w, scoring.formula)
        return Ranking(scores, gates, final, rank_order(final, top_k))

    def rerank(self, model: LoadedModel, req: RankRequest, scoring: Scoring, ranking: Ranking,
               feats: Features) -> Ranking:
        """Boosts, MMR, pins and diversity on the combined scores of the candidates the
        filters kept (service.rerank); without rules the ranking is returned as it is."""
        rules = scoring.rerank
        if rules is None:
            return ranking
        out = apply_rules(rules, ranking.final, req.candidates, attributes(model.schema),
                          feats.inputs, req.top_k, filtered=feats.filtered,
                          explain=req.explain, order=ranking.order)
        metrics.count_rerank(out.applied)
        return Ranking(ranking.scores, ranking.gates, out.final, out.order, out)

    def explore(self, request_id: str, ranking: Ranking) -> Ranking:
        """With RANKER_EXPLORE_RATE > 0: a share of the requests serve K candidates drawn
        uniformly instead of the top K, and every request carries its items' propensities for
        the served log. A list the re-rank rules made (filters, pins) is served as it is."""
        rate = self.settings.explore_rate
        if not rate or ranking.rerank is not None:
            return ranking
        n = ranking.final.shape[0]
        explored = explore_order(request_id, n, ranking.order.shape[0], rate)
        if explored is not None:
            metrics.EXPLORED.inc()
        order = ranking.order if explored is None else explored
        return replace(ranking, order=order,
                       propensity=propensities(ranking.order, order, n, rate))

    def encode(self, req: RankRequest, model: LoadedModel, request_id: str, scoring: Scoring,
               ranking: Ranking, feats: Features, arm: Assignment | None = None) -> bytes:
        """The response body as JSON; the items are pre-encoded unless gates are asked for."""
        tasks = model.tasks
        items: Any
        if req.explain and ranking.gates is not None:
            items = explained_items(req.candidates, tasks, ranking.scores, ranking.final,
                                    ranking.order, ranking.gates)
            if ranking.rerank is not None:
                add_rerank_explain(items, ranking.rerank)
        elif req.explain and ranking.rerank is not None:  # a model without gates
            items = orjson.loads(ranked_items_json(req.candidates, ranking.order, ranking.final,
                                                   ranking.scores, tasks))
            add_rerank_explain(items, ranking.rerank)
        else:
            items = orjson.Fragment(ranked_items_json(req.candidates, ranking.order,
                                                      ranking.final, ranking.scores, tasks))
        body = {
            "request_id": request_id,
            "model": {"name": model.name, "version": model.version},
            "tasks": tasks,
            "scoring": scoring.formula,
            "weights": scoring.weights,
            "items": items,
            "defaulted": {"user": feats.user_defaulted, "items": feats.items_defaulted,
                          "stale": feats.stale},
            "degraded": feats.degraded_reason is not None,
            "degraded_reason": feats.degraded_reason,
        }
        if ranking.rerank is not None:
            body["rerank"] = rerank_summary(scoring.rerank, ranking.rerank)
        if arm is not None:  # only then: the default response stays byte-identical
            body["experiment"] = arm.experiment
            body["arm"] = arm.arm
            if arm.forced:
                body["forced"] = True
        return orjson.dumps(body)


def apply_overrides(req: RankRequest, o: Overrides) -> RankRequest:
    """The request as the arm serves it. Precedence: the arm is the experiment's treatment, so
    what it sets wins over the request's own value (weights or preset as a pair: an arm that
    sets either replaces both; scoring alone); what it leaves unset stays the request's."""
    update: dict[str, object] = {}
    if o.weights is not None or o.preset is not None:
        update["weights"] = None if o.weights is None else dict(o.weights)
        update["preset"] = o.preset
    if o.scoring is not None:
        update["scoring"] = o.scoring
    return req.model_copy(update=update) if update else req


def rerank_summary(rules: Rules | None, out: Outcome) -> dict[str, Any]:
    """The response's `rerank` object: what the stage did to this list."""
    return {"preset": None if rules is None else rules.preset, "applied": out.applied,
            "filtered": out.filtered, "relaxed": out.relaxed,
            "adjusted": [] if rules is None else list(rules.adjusted)}


def add_rerank_explain(items: list[dict[str, Any]], out: Outcome) -> None:
    """With explain: each item's position in the plain score order of the candidates the filters
    kept, and the rules that moved it."""
    if out.moved_from is None or out.moved_by is None:
        return
    for item, start, rules in zip(items, out.moved_from.tolist(), out.moved_by, strict=True):
        item["rerank"] = {"from": start, "rules": rules}


def record_metrics(model: LoadedModel, ranking: Ranking, feats: Features, sample: int,
                   requested: int) -> None:
    """Per-request model metrics: counts (the request's candidates; those scored, which the
    filters may have made fewer), a bounded score sample, gate sums."""
    scores, gates = ranking.scores, ranking.gates
    n = scores.shape[0]
    metrics.SCORED.inc(n)
    metrics.CANDIDATES.observe(requested)
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
