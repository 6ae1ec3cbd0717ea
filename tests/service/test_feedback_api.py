"""POST /feedback through the real app, the tiny real model and a real redis-server."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis

from ranker.servedlog import FeedbackEvent, decode_feedback, feedback_stream
from tests.service.helpers import load_features, metric, running_app
from tests.service.test_servedlog import dropped, wait_for
from tests.support import settings_for

STREAM = feedback_stream("rk")
KEY = "k-feedback"


def ev(**kw: object) -> dict:
    e = {"request_id": "r1", "item_id": "i1", "event": "click", "ts": time.time()}
    e.update(kw)
    return e


def stream_events(url: str) -> list[FeedbackEvent]:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return [decode_feedback(f) for _, f in client.xrange(STREAM)]
    finally:
        client.close()


def events_metric(task: str, version: str) -> float:
    return metric("ranker_feedback_events_total", {"task": task, "model_version": version})


@pytest.fixture
async def client(model_repo: Path, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, feedback_max_events=5, max_body_bytes=4096,
                            api_keys=[KEY], feedback_recent_requests=3)
    async with running_app(settings) as c:
        c.headers["x-api-key"] = KEY
        yield c


async def post(client: httpx.AsyncClient, body: object, status: int) -> dict:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await client.post("/feedback", content=content,
                          headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    out: dict = r.json()
    return out


async def test_feedback_lands_in_the_stream_and_counts_by_served_version(
        client: httpx.AsyncClient, redis_url: str) -> None:
    r = await client.post("/rank", json={"user_id": "u1", "candidates": ["i1", "i2", "i3"],
                                         "top_k": 2})
    assert r.status_code == 200, r.text
    rid, served = r.json()["request_id"], [it["id"] for it in r.json()["items"]]
    like1, unknown0 = events_metric("like", "1"), events_metric("click", "unknown")
    events = [ev(request_id=rid, item_id=served[0], event="like", ts=1_700_000_000.5),
              ev(request_id=rid, item_id=served[0], event="like", ts=1_700_000_000.5),  # dup
              ev(request_id="never-served", event="click", ts=1_700_000_001)]
    assert await post(client, {"events": events}, 202) == {"accepted": 3, "dropped": 0}
    await wait_for(lambda: len(stream_events(redis_url)) == 3, what="the feedback entries")
    assert stream_events(redis_url) == [
        FeedbackEvent(e["request_id"], e["item_id"], e["event"], float(e["ts"])) for e in events]
    assert events_metric("like", "1") - like1 == 2
    assert events_metric("click", "unknown") - unknown0 == 1


async def test_the_version_map_is_bounded(client: httpx.AsyncClient) -> None:
    rids = []
    for _ in range(4):  # feedback_recent_requests = 3: the first is forgotten
        r = await client.post("/rank", json={"user_id": "u1", "candidates": ["i1"]})
        rids.append(r.json()["request_id"])
    share1, unknown0 = events_metric("share", "1"), events_metric("share", "unknown")
    await post(client, {"events": [ev(request_id=r, event="share") for r in rids]}, 202)
    assert events_metric("share", "unknown") - unknown0 == 1
    assert events_metric("share", "1") - share1 == 3


@pytest.mark.parametrize(("events", "field", "words"), [
    ([ev(), ev(), ev(), ev(event="buy")], "events[3].event", ["'buy'", "click, like, share"]),
    ([ev(request_id="r" * 257)], "events[0].request_id", ["256"]),
    ([ev(item_id="i" * 257)], "events[0].item_id", ["256"]),
    ([ev(item_id="")], "events[0].item_id", ["at least 1"]),
    ([ev() for _ in range(6)], "events", ["at most 5 events", "feedback_max_events"]),
    ([], "events", ["at least 1 event"]),
    ([ev(ts="soon")], "events[0].ts", ["number"]),
    ([ev(item_id=7)], "events[0].item_id", ["string"]),
    ([ev(ts="1700000000")], "events[0].ts", ["number"]),  # strict: a JSON number
    ([ev(ts=True)], "events[0].ts", ["number"]),
    ([ev(ts=1.7e12)], "events[0].ts", ["unix seconds"]),  # milliseconds, not seconds
    ([ev(ts=-1)], "events[0].ts", ["unix seconds"]),
    ([ev(weight=2)], "events[0].weight", ["not permitted"]),
    ([{"request_id": "r1", "item_id": "i1", "event": "click"}], "events[0].ts", ["required"]),
])
async def test_invalid_feedback_names_the_field(client: httpx.AsyncClient, events: list,
                                                field: str, words: list[str]) -> None:
    body = await post(client, {"events": events}, 422)
    assert body["error"] == "invalid_request"
    fields = {d["field"]: d["message"] for d in body["detail"]}
    assert field in fields, body
    for w in words:
        assert w in fields[field], body


@pytest.mark.parametrize("ts", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_ts_is_refused(client: httpx.AsyncClient, ts: str) -> None:
    raw = b'{"events": [{"request_id": "r1", "item_id": "i1", "event": "click", "ts": %s}]}'
    body = await post(client, raw % ts.encode(), 422)
    assert body["detail"][0]["field"] == "events[0].ts" and "finite" in body["detail"][0]["message"]


async def test_ids_must_be_valid_unicode(client: httpx.AsyncClient) -> None:
    raw = b'{"events": [{"request_id": "r1", "item_id": "\\ud800", "event": "click", "ts": 1.7e9}]}'
    body = await post(client, raw, 422)
    assert body["detail"][0]["field"] == "events[0].item_id", body


async def test_not_a_batch_is_refused(client: httpx.AsyncClient) -> None:
    for bad in ({"events": "click"}, [ev()], {"event": ev()}):
        await post(client, bad, 422)
    await post(client, b"{not json", 422)


async def test_body_limit_and_api_key_are_those_of_rank(client: httpx.AsyncClient) -> None:
    big = {"events": [ev(item_id="i" * 200) for _ in range(5)] * 4}  # over 4096 bytes
    assert (await post(client, big, 413))["error"] == "payload_too_large"
    r = await client.post("/feedback", json={"events": [ev()]}, headers={"x-api-key": "wrong"})
    assert r.status_code == 401, r.text
    del client.headers["x-api-key"]
    r = await client.post("/feedback", json={"events": [ev()]})
    assert r.status_code == 401, r.text


async def test_feedback_with_redis_down_is_accepted_and_counted_never_a_500(
        model_repo: Path, redis_url: str, redis_server) -> None:
    settings = settings_for(model_repo, redis_url, log_write_timeout_s=0.2)
    down0 = dropped("redis_unavailable", "feedback")
    async with running_app(settings) as c:
        redis_server.stop()
        try:
            for _ in range(3):
                r = await c.post("/feedback", json={"events": [ev(), ev(event="like")]})
                assert r.status_code == 202, r.text
            await wait_for(lambda: dropped("redis_unavailable", "feedback") - down0 >= 2,
                           what="feedback drops counted")
        finally:
            redis_server.start()
