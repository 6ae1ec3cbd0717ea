"""Metric names present and values moving after traffic; labels never carry request values."""

from __future__ import annotations

import numpy as np
import pytest

from service.metrics import SCORE_BUCKETS
from tests.service.helpers import load_features, metric, running_app
from tests.support import settings_for

pytestmark = pytest.mark.asyncio

NAMES = [
    "ranker_requests_total",
    "ranker_request_duration_seconds",
    "ranker_stage_duration_seconds",
    "ranker_candidates_per_request",
    "ranker_defaulted_entities_total",
    "ranker_candidates_scored_total",
    "ranker_task_score",
    "ranker_gate_weight_sum_total",
    "ranker_gate_max_share",
    "ranker_degraded_responses_total",
    "ranker_model_info",
    "ranker_model_reloads_total",
    "ranker_rejected_requests_total",
    "ranker_inflight_requests",
]


async def test_metrics_present_and_moving(model_repo, redis_url):
    load_features(redis_url, model_repo / "mmoe" / "1")
    async with running_app(settings_for(model_repo, redis_url, score_sample_size=8)) as client:
        rank_ok = metric("ranker_requests_total", {"route": "/rank", "status": "200"})
        other = metric("ranker_requests_total", {"route": "other", "status": "404"})
        scored = metric("ranker_candidates_scored_total")
        n_cand = metric("ranker_candidates_per_request_count")
        item_def = metric("ranker_defaulted_entities_total", {"entity": "item"})
        user_def = metric("ranker_defaulted_entities_total", {"entity": "user"})
        click_obs = metric("ranker_task_score_count", {"task": "click"})
        stages = {s: metric("ranker_stage_duration_seconds_count", {"stage": s})
                  for s in ("validate", "fetch", "decode", "inference", "combine", "rerank",
                            "serialize")}
        gate_before = {(t, str(m)): metric("ranker_gate_weight_sum_total",
                                           {"task": t, "expert": str(m)})
                       for t in ("click", "like", "share") for m in range(4)}

        cands = [f"i{i}" for i in range(20)] + ["unknown1", "unknown2"]
        r = await client.post("/rank", json={"user_id": "stranger", "candidates": cands,
                                             "explain": True})
        assert r.status_code == 200
        gates = np.array([it["gates"] for it in r.json()["items"]])
        await client.get("/no/such/path/u123")

        text = (await client.get("/metrics")).text
        for name in NAMES:
            assert f"# TYPE {name.removesuffix('_total')}" in text, name
        assert "u123" not in text and "stranger" not in text and "unknown1" not in text

        assert metric("ranker_requests_total", {"route": "/rank", "status": "200"}) == rank_ok + 1
        assert metric("ranker_requests_total", {"route": "other", "status": "404"}) == other + 1
        assert metric("ranker_request_duration_seconds_count", {"route": "/rank"}) >= 1
        assert metric("ranker_candidates_scored_total") == scored + 22
        assert metric("ranker_candidates_per_request_count") == n_cand + 1
        assert metric("ranker_defaulted_entities_total", {"entity": "item"}) == item_def + 2
        assert metric("ranker_defaulted_entities_total", {"entity": "user"}) == user_def + 1
        assert metric("ranker_task_score_count", {"task": "click"}) == click_obs + 8
        for s, before in stages.items():
            assert metric("ranker_stage_duration_seconds_count", {"stage": s}) == before + 1, s
        # gate sums: exactly the sum over the 22 scored candidates, per (task, expert)
        for (t, m), before in gate_before.items():
            j = ["click", "like", "share"].index(t)
            got = metric("ranker_gate_weight_sum_total", {"task": t, "expert": m}) - before
            assert got == pytest.approx(gates[:, j, int(m)].sum(), rel=1e-4)
        # gate health: the largest expert's share of each task's summed gate weight
        for j, t in enumerate(["click", "like", "share"]):
            sums = gates[:, j].sum(0)
            want = sums.max() / sums.sum()
            assert metric("ranker_gate_max_share", {"task": t}) == pytest.approx(want, rel=1e-4)
        assert metric("ranker_model_info", {"name": "mmoe", "version": "1"}) == 1
        assert "ranker_inflight_requests 1.0" in text  # the scrape itself was in flight
        assert metric("ranker_inflight_requests") == 0
        # probability buckets reach down to rare-task scores
        assert f'ranker_task_score_bucket{{le="{SCORE_BUCKETS[0]}",task="share"}}' in text


async def test_route_label_is_the_matched_template(model_repo, redis_url):
    settings = settings_for(model_repo, redis_url, playground_enabled=True)
    async with running_app(settings) as client:
        def count(route: str, status: str) -> float:
            return metric("ranker_requests_total", {"route": route, "status": status})

        before = (count("/playground/{name}", "404"), count("other", "404"),
                  count("/playground/config", "200"))
        assert (await client.get("/playground/config")).status_code == 200
        assert (await client.get("/playground/secret-u42")).status_code == 404
        assert (await client.get("/secret-u42")).status_code == 404
        assert count("/playground/config", "200") == before[2] + 1
        assert count("/playground/{name}", "404") == before[0] + 1
        assert count("other", "404") == before[1] + 1
        assert "secret-u42" not in (await client.get("/metrics")).text
