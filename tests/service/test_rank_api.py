"""POST /rank through the real app factory, the real tiny model and a real Redis."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

from tests.service.helpers import (
    CANDS,
    N_ITEMS,
    TWINS,
    load_features,
    metric,
    mget_calls,
    running_app,
)
from tests.support import settings_for

pytestmark = pytest.mark.asyncio



@pytest.fixture
async def client(model_repo, redis_url) -> AsyncIterator[httpx.AsyncClient]:
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, max_candidates=50, max_body_bytes=4096,
                            default_weights={"click": 1.0, "like": 2.0, "share": 3.0})
    async with running_app(settings) as c:
        yield c


def task_matrix(body: dict) -> np.ndarray:
    return np.array([[it["scores"][t] for t in body["tasks"]] for it in body["items"]])


async def rank(client: httpx.AsyncClient, **payload) -> dict:
    payload.setdefault("user_id", "u1")
    payload.setdefault("candidates", CANDS)
    r = await client.post("/rank", json=payload)
    assert r.status_code == 200, r.text
    return r.json()


async def test_order_is_combined_score_order(client):
    body = await rank(client, weights={"click": 1.0, "like": 4.0, "share": 8.0})
    assert body["weights"] == {"click": 1.0, "like": 4.0, "share": 8.0}
    assert {it["id"] for it in body["items"]} == set(CANDS)
    s = task_matrix(body)
    final = np.array([it["score"] for it in body["items"]])
    np.testing.assert_allclose(final, s @ np.array([1.0, 4.0, 8.0]), rtol=1e-6)
    assert np.all(np.diff(final) <= 0)
    assert body["model"] == {"name": "mmoe", "version": 1}
    assert body["defaulted"] == {"user": 0, "items": 0, "stale": 0}
    assert body["degraded"] is False


async def test_ties_are_broken_by_input_position(client):
    # the twins have identical features (ids outside the vocabulary), so identical scores
    cands = ["i1", TWINS[2], "i2", TWINS[0], "i3", TWINS[1]]
    body = await rank(client, candidates=cands)
    twins = [it for it in body["items"] if it["id"] in TWINS]
    assert len({it["score"] for it in twins}) == 1
    assert [it["id"] for it in twins] == [TWINS[2], TWINS[0], TWINS[1]]
    again = await rank(client, candidates=list(reversed(cands)))
    assert [it["id"] for it in again["items"] if it["id"] in TWINS] == [
        TWINS[1], TWINS[0], TWINS[2]
    ]


@pytest.mark.parametrize("task", ["click", "like", "share"])
async def test_zero_weights_for_two_tasks_rank_by_the_third(client, task):
    weights = {t: (2.5 if t == task else 0.0) for t in ["click", "like", "share"]}
    body = await rank(client, weights=weights)
    by_task = [it["scores"][task] for it in body["items"]]
    assert by_task == sorted(by_task, reverse=True)
    order = [it["id"] for it in body["items"]]
    expected = sorted(CANDS, key=lambda c: (-next(
        it["scores"][task] for it in body["items"] if it["id"] == c), CANDS.index(c)))
    assert order == expected


async def test_missing_task_weights_take_defaults(client):
    body = await rank(client, weights={"like": 7.0})
    assert body["weights"] == {"click": 1.0, "like": 7.0, "share": 3.0}
    assert (await rank(client))["weights"] == {"click": 1.0, "like": 2.0, "share": 3.0}


async def test_preset_and_override(client):
    body = await rank(client, preset="engagement")
    assert body["weights"] == {"click": 1.0, "like": 4.0, "share": 8.0}
    body = await rank(client, preset="click", weights={"share": 0.5})
    assert body["weights"] == {"click": 1.0, "like": 0.0, "share": 0.5}


async def test_weighted_product_and_top_k(client):
    body = await rank(client, scoring="weighted_product", weights={"click": 1, "like": 2,
                                                                   "share": 0}, top_k=5)
    assert body["scoring"] == "weighted_product" and len(body["items"]) == 5
    s = task_matrix(body)
    np.testing.assert_allclose([it["score"] for it in body["items"]],
                               s[:, 0] * s[:, 1] ** 2, rtol=1e-5)
    full = await rank(client, scoring="weighted_product", weights={"click": 1, "like": 2,
                                                                   "share": 0})
    assert [it["id"] for it in full["items"][:5]] == [it["id"] for it in body["items"]]


async def test_explain_returns_gates_per_task(client):
    body = await rank(client, explain=True, candidates=CANDS[:5])
    for it in body["items"]:
        g = np.array(it["gates"])
        assert g.shape == (3, 4)
        np.testing.assert_allclose(g.sum(axis=1), 1.0, atol=1e-5)
    assert "gates" not in (await rank(client, candidates=CANDS[:2]))["items"][0]


async def test_unknown_items_and_user_are_defaulted_and_reported(client):
    body = await rank(client, user_id="nobody", candidates=["i1", "nope1", "nope2"])
    assert body["defaulted"] == {"user": 1, "items": 2, "stale": 0}
    assert body["degraded"] is False


async def test_context_changes_scores(client):
    a = await rank(client, candidates=CANDS[:3], context={"hour": 3, "surface": "home"})
    b = await rank(client, candidates=CANDS[:3], context={"hour": 20, "surface": "search"})
    assert a["items"] != b["items"]


async def test_request_id_accepted_or_replaced(client):
    r = await client.post("/rank", json={"user_id": "u1", "candidates": ["i1"]},
                          headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["request_id"] == "abc-123"
    r = await client.post("/rank", json={"user_id": "u1", "candidates": ["i1"]},
                          headers={"X-Request-ID": "bad id with spaces " + "x" * 80})
    assert len(r.headers["x-request-id"]) == 32 and r.json()["request_id"] == r.headers[
        "x-request-id"]


INVALID = [
    ({"weights": {"dwell": 1.0}}, "weights.dwell", "unknown task"),
    ({"weights": {"click": -0.5}}, "weights.click", "between 0 and 100"),
    ({"weights": {"click": 100.01}}, "weights.click", "between 0 and 100"),
    ({"preset": "nope"}, "preset", "unknown preset"),
    ({"candidates": []}, "candidates", "at least 1"),
    ({"candidates": [f"i{i}" for i in range(51)]}, "candidates", "at most 50"),
    ({"candidates": ["i1", "i2", "i1"]}, "candidates[2]", "duplicate"),
    ({"top_k": 0}, "top_k", "greater than or equal to 1"),
    ({"user_id": ""}, "user_id", "at least 1 character"),
    ({"candidates": "i1"}, "candidates", "valid list"),
    ({"surprise": 1}, "surprise", "not permitted"),
]


@pytest.mark.parametrize(("patch", "field", "needle"), INVALID)
async def test_invalid_requests_name_field_and_limit_before_any_work(client, redis_url, patch,
                                                                     field, needle):
    payload = {"user_id": "u1", "candidates": ["i1", "i2"], **patch}
    scored, mgets = metric("ranker_candidates_scored_total"), mget_calls(redis_url)
    invalid = metric("ranker_rejected_requests_total", {"reason": "invalid"})
    r = await client.post("/rank", json=payload)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_request"
    assert any(d["field"] == field and needle in d["message"] for d in body["detail"]), body
    assert metric("ranker_candidates_scored_total") == scored
    assert mget_calls(redis_url) == mgets
    assert metric("ranker_rejected_requests_total", {"reason": "invalid"}) == invalid + 1


@pytest.mark.parametrize(("raw", "field"), [
    (b'{"user_id": "u1", "candidates": ["i1"], "weights": {"click": NaN}}', "weights.click"),
    (b'{"user_id": "u1", "candidates": ["i1"], "weights": {"like": 1e999}}', "weights.like"),
    (b'{"user_id": "u1", "candidates": ["i1"], "weights": {"share": -Infinity}}',
     "weights.share"),
    (b'{"user_id": "u1", "candidates": ["i1"', "body"),
])
async def test_non_finite_weights_and_bad_json(client, redis_url, raw, field):
    mgets = mget_calls(redis_url)
    r = await client.post("/rank", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["field"] == field for d in detail), detail
    if field != "body":
        assert "finite" in detail[0]["message"]
    assert mget_calls(redis_url) == mgets


async def test_oversized_body_413_with_and_without_content_length(client, redis_url):
    payload = json.dumps({"user_id": "u1", "candidates": [f"i{i}" for i in range(40)],
                          "context": {"pad": "x" * 5000}}).encode()
    mgets, scored = mget_calls(redis_url), metric("ranker_candidates_scored_total")
    too_large = metric("ranker_rejected_requests_total", {"reason": "too_large"})
    r = await client.post("/rank", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["detail"] == [{"field": "body", "message": "at most 4096 bytes"}]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked upload
        for i in range(0, len(payload), 1000):
            yield payload[i:i + 1000]

    r = await client.post("/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert mget_calls(redis_url) == mgets
    assert metric("ranker_candidates_scored_total") == scored
    assert metric("ranker_rejected_requests_total", {"reason": "too_large"}) == too_large + 2
    ok = json.dumps({"user_id": "u1", "candidates": ["i1", "i2"]}).encode()

    async def small() -> AsyncIterator[bytes]:
        yield ok[:10]
        yield ok[10:]

    r = await client.post("/rank", content=small(), headers={"content-type": "application/json"})
    assert r.status_code == 200


async def test_item_ids_are_looked_up_in_one_round_trip(client, redis_url):
    await rank(client, candidates=CANDS[:3])  # the reader has found its load pointer
    before = mget_calls(redis_url)
    await rank(client, candidates=[f"i{i}" for i in range(N_ITEMS)][:50])
    assert mget_calls(redis_url) == before + 1


async def test_ops_routes(client):
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["model"]["version"] == 1
    r = await client.get("/model")
    body = r.json()
    assert r.status_code == 200 and body["version"] == 1 and body["tasks"] == [
        "click", "like", "share"]
    assert "golden" not in body and "sha256" in body["files"]["model.onnx"]
    r = await client.get("/nope/123")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_explain_on_a_model_without_gates(tmp_path, redis_url):
    from tests.tiny import export_tiny_model

    vdir = export_tiny_model(tmp_path, name="mmoe", model_type="shared_bottom",
                             bottom_hidden=[8])
    load_features(redis_url, vdir)
    async with running_app(settings_for(tmp_path, redis_url)) as c:
        scored = metric("ranker_candidates_scored_total")
        r = await c.post("/rank", json={"user_id": "u1", "candidates": ["i1", "i2"],
                                        "explain": True})
        assert r.status_code == 200, r.text
        assert all("gates" not in it for it in r.json()["items"])
        assert metric("ranker_candidates_scored_total") == scored + 2
