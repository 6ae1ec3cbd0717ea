"""Redis faults against the real server: stopped, or paused past the deadline; then recovery."""

from __future__ import annotations

import asyncio
import time
import traceback

import httpx
import pytest

from tests.reliability.test_overload_redis import stalled
from tests.service.helpers import load_features, metric, running_app
from tests.support import settings_for

pytestmark = pytest.mark.asyncio

BODY = {"user_id": "u1", "candidates": ["i1", "i2", "i3"]}
DEADLINE_S = 0.3


async def wait_until_ok(client: httpx.AsyncClient, timeout_s: float = 5.0) -> httpx.Response:
    """Post /rank until it answers 200 non-degraded (bounded in time)."""
    end = time.monotonic() + timeout_s
    while True:
        r = await client.post("/rank", json=BODY)
        if r.status_code == 200 and not r.json()["degraded"]:
            return r
        assert time.monotonic() < end, f"did not recover: {r.status_code} {r.text}"
        await asyncio.sleep(0.05)  # poll interval


async def test_fail_mode_stopped_redis_gives_fast_503_then_recovers(model_repo, redis_server,
                                                                    redis_url):
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, redis_failure_mode="fail",
                            request_timeout_s=DEADLINE_S, retry_after_s=2)
    async with running_app(settings) as client:
        await wait_until_ok(client)
        redis_server.stop()
        try:
            t0 = time.perf_counter()
            r = await client.post("/rank", json=BODY)
            elapsed = time.perf_counter() - t0
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "feature_store_unavailable"
            assert r.headers["retry-after"] == "2"
            assert elapsed < DEADLINE_S + 0.5  # bounded by the deadline, with slack for a busy CI
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and "unreachable" in ready.json()["reason"]
            assert (await client.get("/healthz")).status_code == 200
        finally:
            redis_server.start()
        load_features(redis_url, model_repo / "mmoe" / "1")  # the server kept nothing
        r = await wait_until_ok(client)
        assert r.json()["defaulted"]["items"] == 0
        assert (await client.get("/readyz")).status_code == 200


async def test_degrade_mode_ranks_with_defaults_when_redis_is_down(model_repo, redis_server,
                                                                   redis_url):
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, redis_failure_mode="degrade",
                            request_timeout_s=DEADLINE_S)
    async with running_app(settings) as client:
        healthy = (await wait_until_ok(client)).json()
        degraded = metric("ranker_degraded_responses_total", {"reason": "redis_unavailable"})
        redis_server.stop()
        try:
            r = await client.post("/rank", json=BODY)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["degraded"] is True and body["degraded_reason"] == "redis_unavailable"
            assert body["defaulted"] == {"user": 1, "items": 3, "stale": 0}
            assert body["items"] != healthy["items"]
            assert metric("ranker_degraded_responses_total",
                          {"reason": "redis_unavailable"}) == degraded + 1
        finally:
            redis_server.start()
        load_features(redis_url, model_repo / "mmoe" / "1")
        assert (await wait_until_ok(client)).json()["items"] == healthy["items"]


@pytest.mark.parametrize("mode", ["fail", "degrade"])
async def test_redis_slower_than_deadline(model_repo, redis_server, redis_url, mode):
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, redis_failure_mode=mode,
                            request_timeout_s=DEADLINE_S, redis_socket_timeout_s=2.0)
    async with running_app(settings) as client:
        await wait_until_ok(client)
        with stalled(redis_server):  # stalled until the answer is in, however long that takes
            t0 = time.perf_counter()
            r = await client.post("/rank", json=BODY)
            elapsed = time.perf_counter() - t0
        assert elapsed < DEADLINE_S + 0.5, elapsed  # never a hang
        if mode == "fail":
            assert r.status_code == 503 and "retry-after" in r.headers
        else:
            assert r.status_code == 200 and r.json()["degraded_reason"] == "redis_timeout"
        await wait_until_ok(client)  # the stall is over: normal again


async def test_overload_beyond_max_inflight_is_refused_at_once(model_repo, redis_server,
                                                              redis_url):
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, max_inflight=1, request_timeout_s=2.0,
                            redis_socket_timeout_s=2.0)
    async with running_app(settings) as client:
        await wait_until_ok(client)
        overload = metric("ranker_rejected_requests_total", {"reason": "overload"})
        with stalled(redis_server):  # holds the first request inside its feature fetch
            first = asyncio.create_task(client.post("/rank", json=BODY))
            end = time.monotonic() + 10
            while metric("ranker_inflight_requests") < 1:  # bounded: until it is inside
                assert time.monotonic() < end, "the first request never got in"
                await asyncio.sleep(0.01)  # poll interval
            second = await client.post("/rank", json=BODY)
            assert not first.done()  # answered while the first is still held: not queued
        assert second.status_code == 503 and second.json()["error"] == "overloaded"
        assert second.headers["retry-after"] == "1"
        assert (await first).status_code == 200
        assert metric("ranker_rejected_requests_total", {"reason": "overload"}) == overload + 1
        assert (await client.post("/rank", json=BODY)).status_code == 200


async def test_inference_past_the_deadline_is_a_503(model_repo, redis_url, monkeypatch):
    """A stuck inference cannot be caused for real with a tiny model: the one injected fault."""
    from service.registry import LoadedModel

    load_features(redis_url, model_repo / "mmoe" / "1")
    # inline_inference_max_ms=0: every run on the executor, where the deadline applies
    settings = settings_for(model_repo, redis_url, request_timeout_s=0.3, inference_budget_s=0.1,
                            inline_inference_max_ms=0)
    async with running_app(settings) as client:
        await wait_until_ok(client)
        real_run = LoadedModel.run

        def slow_run(self, inputs):
            time.sleep(0.6)  # the fault itself: an inference that takes 0.6 s
            return real_run(self, inputs)

        monkeypatch.setattr(LoadedModel, "run", slow_run)
        deadline = metric("ranker_rejected_requests_total", {"reason": "deadline"})
        t0 = time.perf_counter()
        r = await client.post("/rank", json=BODY)
        assert time.perf_counter() - t0 < 0.55  # did not wait for the 0.6 s inference
        assert r.status_code == 503 and r.json()["error"] == "deadline_exceeded"
        assert "retry-after" in r.headers
        assert metric("ranker_rejected_requests_total", {"reason": "deadline"}) == deadline + 1
        assert (await client.get("/healthz")).status_code == 200  # the loop was never blocked
        monkeypatch.setattr(LoadedModel, "run", real_run)
        await wait_until_ok(client)  # once the stuck run has left the executor


@pytest.mark.parametrize(("inline_max_ms", "path"), [(1000.0, "inline"), (0.0, "executor")])
async def test_inference_runs_inline_only_when_the_model_is_timed_fast_enough(
        model_repo, redis_url, inline_max_ms, path):
    """The warm-up timing decides: a run estimated within inline_inference_max_ms skips the
    executor's thread hop; with 0 every run goes to the executor. Same scores either way."""
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, inline_inference_max_ms=inline_max_ms)
    async with running_app(settings) as client:
        await wait_until_ok(client)
        before = {p: metric("ranker_inference_runs_total", {"path": p})
                  for p in ("inline", "executor")}
        r = await client.post("/rank", json=BODY)
        assert r.status_code == 200
        after = {p: metric("ranker_inference_runs_total", {"path": p})
                 for p in ("inline", "executor")}
        other = "executor" if path == "inline" else "inline"
        assert after[path] == before[path] + 1 and after[other] == before[other]



async def test_unhandled_error_is_a_json_500_with_request_id_and_cors(model_repo, redis_url,
                                                                     caplog):
    """A bug in a route (a test-only route on an app built by the real factory) is answered
    through error_response by the request-context layer: JSON, the request id in header and
    body, the CORS headers a browser needs to read it, and the traceback in the log."""
    from asgi_lifespan import LifespanManager

    from service.app import create_app

    origin = "http://app.example.test"
    settings = settings_for(model_repo, redis_url, cors_origins=[origin])
    app = create_app(settings)

    async def boom() -> None:
        raise RuntimeError("a bug the handlers do not know")

    app.add_api_route("/boom", boom, methods=["GET"])
    before = metric("ranker_requests_total", {"route": "/boom", "status": "500"})
    async with LifespanManager(app, startup_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            with caplog.at_level("ERROR", logger="ranker.errors"):
                r = await client.get("/boom", headers={"Origin": origin,
                                                       "X-Request-ID": "req-boom-1"})
            ok = await client.get("/healthz", headers={"Origin": origin})
    assert r.status_code == 500, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "internal_error", "message": "internal error",
                        "request_id": "req-boom-1"}
    assert r.headers["x-request-id"] == "req-boom-1"
    assert r.headers["access-control-allow-origin"] == origin
    assert "a bug the handlers do not know" not in r.text  # no internals to the client
    records = [rec for rec in caplog.records if rec.exc_info and "req-boom-1" in rec.getMessage()]
    assert records, [rec.getMessage() for rec in caplog.records]
    assert "a bug the handlers do not know" in "".join(
        traceback.format_exception(*records[0].exc_info))
    assert metric("ranker_requests_total", {"route": "/boom", "status": "500"}) == before + 1
    assert ok.status_code == 200  # the app goes on serving
