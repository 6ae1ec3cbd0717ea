"""The served log through the real app, the tiny real model and a real redis-server: what is
logged is what was served, sampling, a full queue and a dead Redis never fail /rank."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import redis

from launch.local_redis import RedisServer
from ranker.manifest import MODEL_FILE, load_manifest, load_schema
from ranker.servedlog import decode_served, served_stream
from service.featurestore.keys import seen_key
from service.featurestore.reader import FeatureStore, close_client, make_client
from service.servedlog.writer import RecentVersions, sampled
from tests.service.helpers import load_features, metric, running_app
from tests.support import settings_for

CANDS = [f"i{i}" for i in range(30)]
STREAM = served_stream("rk")


async def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what or cond}"
        await asyncio.sleep(0.02)


def xlen(url: str, stream: str = STREAM) -> int:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return int(client.xlen(stream))
    finally:
        client.close()


def served_records(url: str) -> list:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return [decode_served(fields) for _, fields in client.xrange(STREAM)]
    finally:
        client.close()


def dropped(reason: str, stream: str = "served") -> float:
    return metric("ranker_served_log_dropped_total", {"stream": stream, "reason": reason})


def written(stream: str = "served") -> float:
    return metric("ranker_served_log_written_total", {"stream": stream})


async def rank(client: httpx.AsyncClient, rid: str | None = None, **payload) -> dict:
    payload.setdefault("user_id", "u1")
    payload.setdefault("candidates", CANDS)
    headers = {"x-request-id": rid} if rid else {}
    r = await client.post("/rank", json=payload, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


# ---- the pure parts ------------------------------------------------------------------------


def test_sampling_is_deterministic_and_close_to_the_rate() -> None:
    ids = [uuid.uuid4().hex for _ in range(20_000)] + [f"req-{i}" for i in range(20_000)]
    for rate in (0.01, 0.3, 0.9):
        picks = [sampled(i, rate) for i in ids]
        assert picks == [sampled(i, rate) for i in ids]  # the same answer every time
        share = sum(picks) / len(ids)
        assert abs(share - rate) < 4 * (rate * (1 - rate) / len(ids)) ** 0.5 + 1e-3, (rate, share)
    assert all(sampled(i, 1.0) for i in ids[:100]) and not any(sampled(i, 0.0) for i in ids[:100])
    # a higher rate logs a superset: raising it keeps every request that was logged
    assert all(sampled(i, 0.5) for i in ids if sampled(i, 0.2))


def test_recent_versions_are_bounded_and_forget_the_oldest() -> None:
    m = RecentVersions(3)
    for i in range(10):
        m.add(f"r{i}", i)
    assert len(m) == 3
    assert m.get("r6") is None and [m.get(f"r{i}") for i in (7, 8, 9)] == [7, 8, 9]


# ---- through the app -------------------------------------------------------------------------


@pytest.mark.parametrize("filters", [False, True], ids=["plain", "filtered"])
async def test_a_logged_response_is_exactly_what_was_served(model_repo: Path, redis_url: str,
                                                            filters: bool) -> None:
    vdir = model_repo / "mmoe" / "1"
    load_features(redis_url, vdir)
    extra: dict = {}
    if filters:  # the filters drop candidates before scoring: the log has the kept ones only
        r = redis.Redis.from_url(redis_url)
        r.sadd(seen_key("rk", "u3"), *CANDS[5:15])
        r.close()
        extra = {"rerank": {"filters": {"exclude": CANDS[:5], "seen": True}}}
    settings = settings_for(model_repo, redis_url, log_sample_rate=1.0)
    async with running_app(settings) as client:
        body = await rank(client, user_id="u3", top_k=7, context={"hour": 20, "surface": "home"},
                          weights={"click": 1.0, "like": 4.0, "share": 8.0},
                          candidates=[*CANDS, "not_an_item"], **extra)
        await wait_for(lambda: xlen(redis_url) == 1, what="the record")
    [rec] = served_records(redis_url)
    ids = [it["id"] for it in body["items"]]
    if filters:
        assert body["rerank"]["filtered"] == 15 and not set(ids) & set(CANDS[:15])
    assert rec.request_id == body["request_id"] and rec.user_id == "u3"
    assert (rec.model_name, rec.model_version) == ("mmoe", 1)
    assert rec.item_ids == ids and len(ids) == 7
    assert rec.weights == body["weights"] and rec.scoring == body["scoring"] == "weighted_sum"
    assert rec.context == {"hour": 20, "surface": "home"} and rec.tasks == tuple(body["tasks"])
    # the response's floats are the shortest texts of the same float32 / float64 values
    want = np.array([[it["scores"][t] for t in body["tasks"]] for it in body["items"]])
    np.testing.assert_array_equal(rec.scores, want.astype(np.float32))
    np.testing.assert_array_equal(rec.final, [it["score"] for it in body["items"]])
    # the inputs: exactly what the feature store holds for the served items, in served order
    schema = load_schema(vdir, load_manifest(vdir))
    reader = make_client(redis_url)
    try:
        fetched = await FeatureStore(reader, schema, prefix="rk").fetch("u3", ids)
    finally:
        await close_client(reader)
    expected = {**fetched.inputs, **schema.context_inputs({"hour": 20, "surface": "home"})}
    assert list(rec.inputs) == schema.input_names()
    for name in schema.input_names():
        assert rec.inputs[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(rec.inputs[name], expected[name], err_msg=name)
    assert rec.inputs["user_cat"].shape[0] == 1 and rec.inputs["item_cat"].shape[0] == 7
    # and the model run on the logged inputs gives the logged scores
    session = ort.InferenceSession(str(vdir / MODEL_FILE), providers=["CPUExecutionProvider"])
    outs = session.run(list(rec.tasks), dict(rec.inputs))
    np.testing.assert_allclose(np.stack(outs, axis=1), rec.scores, rtol=1e-6, atol=1e-7)


async def test_sampling_in_the_app_follows_the_request_id(model_repo: Path,
                                                          redis_url: str) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, log_sample_rate=0.5)
    rids = [f"req-{i}" for i in range(40)]
    expect = {r for r in rids if sampled(r, 0.5)}
    assert 0 < len(expect) < 40
    before = metric("ranker_impressions_total", {"model_version": "1"})
    async with running_app(settings) as client:
        for rid in rids:
            await rank(client, rid, top_k=3)
        await wait_for(lambda: xlen(redis_url) >= len(expect), what="the sampled records")
    assert {r.request_id for r in served_records(redis_url)} == expect
    # impressions count every response's returned items, logged or not
    assert metric("ranker_impressions_total", {"model_version": "1"}) - before == 40 * 3


async def test_logging_off_writes_nothing(model_repo: Path, redis_url: str) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    async with running_app(settings_for(model_repo, redis_url)) as client:
        assert client is not None
        for _ in range(5):
            await rank(client)
    assert xlen(redis_url) == 0


async def test_a_full_queue_drops_and_counts_without_slowing_rank(model_repo: Path,
                                                                  redis_url: str) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, log_sample_rate=1.0, log_queue_size=2,
                            log_batch_size=1, log_write_timeout_s=10.0)
    full0, written0 = dropped("queue_full"), written()
    async with running_app(settings) as client:
        await rank(client)  # warm the paths up
        await wait_for(lambda: written() - written0 == 1, what="the first record")
        control = redis.Redis.from_url(redis_url, socket_timeout=2)
        try:
            # Redis stops executing writes (XADD) for 2 s; reads (the feature MGET) go on
            control.execute_command("CLIENT", "PAUSE", 2000, "WRITE")
            took = []
            for _ in range(20):
                t0 = time.perf_counter()
                await rank(client)
                took.append(time.perf_counter() - t0)
            # the writer holds at most one record, the queue two: the rest is dropped
            lost = dropped("queue_full") - full0
            assert lost >= 17, lost
            assert max(took) < 0.5, took  # nobody waited for the stalled writer
        finally:
            control.execute_command("CLIENT", "UNPAUSE")
            control.close()
        await wait_for(lambda: written() - written0 == 21 - lost, what="the queued records")
    assert xlen(redis_url) == 21 - lost


async def test_redis_down_never_fails_rank_because_of_logging(model_repo: Path, redis_url: str,
                                                              redis_server: RedisServer) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, log_sample_rate=1.0, log_queue_size=4,
                            redis_failure_mode="degrade", log_write_timeout_s=0.2)
    down0 = dropped("redis_unavailable")
    async with running_app(settings) as client:
        await rank(client)
        await wait_for(lambda: xlen(redis_url) == 1, what="the first record")
        redis_server.stop()
        try:
            for _ in range(30):
                body = await rank(client)  # degraded (no features), never failed by the log
                assert body["degraded"] is True
            await wait_for(lambda: dropped("redis_unavailable") - down0 >= 1,
                           what="drops counted as redis_unavailable")
        finally:
            redis_server.start()
        # the writer recovers by itself: once it has settled what the outage left in its queue
        # (of 4: a request queued while it is still full is dropped, as it should be), a
        # request logged after the restart reaches the stream
        await wait_for(lambda: metric("ranker_served_log_queue_depth") == 0,
                       what="the queue drained after the restart")
        body = await rank(client)
        await wait_for(lambda: body["request_id"] in {r.request_id
                                                      for r in served_records(redis_url)},
                       what="a record written after the restart")
