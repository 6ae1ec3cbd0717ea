"""Unit tests of the middleware on a tiny Starlette app (in-process ASGI, real asyncio timing)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from service.middleware.auth import ApiKeyMiddleware, key_matches, parse_keys
from service.middleware.context import RequestContextMiddleware
from service.middleware.deadline import DeadlineMiddleware, remaining_s


def tiny_app(
    gate: asyncio.Event | None = None, pool: ThreadPoolExecutor | None = None
) -> Starlette:
    """/rank waits for `gate` (if any); /slow sleeps; /pool blocks a thread; /admin/x, /healthz."""

    async def rank(request: Request) -> JSONResponse:
        if gate is not None:
            await gate.wait()
        return JSONResponse({"ok": True, "remaining": remaining_s(request.scope)})

    async def slow(request: Request) -> JSONResponse:
        await asyncio.sleep(float(request.query_params.get("s", "1")))  # the slow handler
        return JSONResponse({"ok": True})

    async def in_pool(request: Request) -> JSONResponse:
        assert pool is not None
        await asyncio.get_running_loop().run_in_executor(pool, time.sleep, 0.3)
        return JSONResponse({"ok": True})

    async def own_timeout(request: Request) -> JSONResponse:
        raise TimeoutError("the app's own timeout")

    async def stream(request: Request) -> StreamingResponse:
        async def body():  # starts at once, finishes after the deadline
            yield b"a"
            await asyncio.sleep(0.3)  # the slow stream itself
            yield b"b"

        return StreamingResponse(body())

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/rank", rank, methods=["POST", "GET"]),
        Route("/slow", slow), Route("/pool", in_pool), Route("/own", own_timeout),
        Route("/stream", stream), Route("/healthz", ok),
        Route("/admin/reload", ok, methods=["POST"]),
    ])


def client(app: ASGIApp) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=5.0)


# --- in-flight limit ---------------------------------------------------------------------------

def limited(app: ASGIApp, max_inflight: int, retry_after_s: int = 1) -> RequestContextMiddleware:
    return RequestContextMiddleware(app, routes=("/rank", "/healthz"), max_inflight=max_inflight,
                                    retry_after_s=retry_after_s)


async def test_inflight_limit_rejects_at_once_beyond_max() -> None:
    gate = asyncio.Event()
    app = limited(tiny_app(gate), max_inflight=3, retry_after_s=2)
    async with client(app) as c:
        held = [asyncio.create_task(c.post("/rank")) for _ in range(3)]
        for _ in range(100):  # bounded: wait until the three are really inside
            if app.inflight == 3:
                break
            await asyncio.sleep(0.01)  # poll interval
        assert app.inflight == 3
        t0 = time.perf_counter()
        extra = await c.post("/rank")
        took = time.perf_counter() - t0
        assert extra.status_code == 503
        assert extra.headers["retry-after"] == "2"
        assert extra.json()["error"] == "overloaded"
        assert "max_inflight" in extra.json()["message"]
        assert took < 0.5  # rejected at once, not queued behind the held ones
        other = await c.get("/healthz")  # other routes are not limited
        assert other.status_code == 200
        gate.set()
        done = await asyncio.gather(*held)
    assert [r.status_code for r in done] == [200, 200, 200]
    assert app.inflight == 0


async def test_inflight_zero_means_unlimited() -> None:
    gate = asyncio.Event()
    app = limited(tiny_app(gate), max_inflight=0)
    async with client(app) as c:
        tasks = [asyncio.create_task(c.post("/rank")) for _ in range(20)]
        for _ in range(500):  # bounded: wait until all twenty are inside at once
            if app.inflight == 20:
                break
            await asyncio.sleep(0.01)  # poll interval
        assert app.inflight == 20
        gate.set()
        done = await asyncio.gather(*tasks)
    assert {r.status_code for r in done} == {200}


async def test_inflight_slot_freed_when_app_fails() -> None:
    app = limited(tiny_app(), max_inflight=1)
    async with client(app) as c:
        for _ in range(3):
            assert (await c.get("/own")).status_code == 500
    assert app.inflight == 0


# --- deadline ----------------------------------------------------------------------------------

async def test_deadline_answers_503_in_time_instead_of_late() -> None:
    reasons: list[str] = []
    app = DeadlineMiddleware(tiny_app(), timeout_s=0.1, paths=("/slow",), on_reject=reasons.append)
    async with client(app) as c:
        t0 = time.perf_counter()
        r = await c.get("/slow", params={"s": "2"})
        took = time.perf_counter() - t0
    assert r.status_code == 503
    assert r.json()["error"] == "deadline_exceeded"
    assert "request_timeout_s" in r.json()["message"]
    assert r.headers["retry-after"] == "1"
    assert 0.09 <= took < 0.6
    assert reasons == ["deadline"]


async def test_deadline_while_waiting_for_a_busy_thread_pool() -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        app = DeadlineMiddleware(tiny_app(pool=pool), timeout_s=0.5, paths=("/pool",))
        async with client(app) as c:
            # each call holds the only thread 0.3s: the first two fit, the later ones wait
            results = await asyncio.gather(*(c.get("/pool") for _ in range(5)))
    finally:
        pool.shutdown(wait=True)
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 1
    assert codes.count(503) >= 2
    assert all(r.json()["error"] == "deadline_exceeded" for r in results if r.status_code == 503)


async def test_fast_request_passes_and_sees_its_remaining_time() -> None:
    app = DeadlineMiddleware(tiny_app(), timeout_s=0.5)
    async with client(app) as c:
        r = await c.post("/rank")
    assert r.status_code == 200
    assert 0.0 < r.json()["remaining"] <= 0.5


async def test_apps_own_timeout_error_is_not_reported_as_deadline() -> None:
    reasons: list[str] = []
    app = DeadlineMiddleware(tiny_app(), timeout_s=1.0, paths=("/own",), on_reject=reasons.append)
    async with client(app) as c:
        r = await c.get("/own")
    assert r.status_code == 500
    assert reasons == []


async def test_started_response_is_let_finish() -> None:
    app = DeadlineMiddleware(tiny_app(), timeout_s=0.1, paths=("/stream",))
    async with client(app) as c:
        r = await c.get("/stream")
    assert r.status_code == 200
    assert r.content == b"ab"


async def test_paths_not_listed_have_no_deadline() -> None:
    app = DeadlineMiddleware(tiny_app(), timeout_s=0.05)  # default paths: /rank only
    async with client(app) as c:
        r = await c.get("/slow", params={"s": "0.2"})
    assert r.status_code == 200


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        DeadlineMiddleware(tiny_app(), timeout_s=0)


# --- API keys ----------------------------------------------------------------------------------

def test_key_parsing_and_matching() -> None:
    assert parse_keys("a, b,,") == (b"a", b"b")
    assert parse_keys(["k1", " "]) == (b"k1",)
    assert parse_keys(None) == ()
    keys = parse_keys("alpha,beta")
    assert key_matches(b"beta", keys)
    assert not key_matches(b"bet", keys)
    assert not key_matches(b"", keys)
    assert not key_matches(None, keys)
    assert not key_matches(b"alpha", ())


async def test_no_keys_configured_means_open() -> None:
    app = ApiKeyMiddleware(tiny_app())
    async with client(app) as c:
        assert (await c.post("/rank")).status_code == 200
        assert (await c.post("/admin/reload")).status_code == 200


async def test_api_keys_guard_rank_only() -> None:
    denied: list[str] = []
    app = ApiKeyMiddleware(tiny_app(), api_keys="key-one,key-two", on_deny=denied.append)
    async with client(app) as c:
        missing = await c.post("/rank")
        wrong = await c.post("/rank", headers={"X-API-Key": "key-three"})
        one = await c.post("/rank", headers={"X-API-Key": "key-one"})
        two = await c.post("/rank", headers={"X-API-Key": "key-two"})
        health = await c.get("/healthz")
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.json()["error"] == "unauthorized"
    assert "X-API-Key" in missing.json()["message"]
    assert "key-three" not in wrong.text and "key-one" not in wrong.text  # keys never echoed
    assert one.status_code == 200 and two.status_code == 200
    assert health.status_code == 200
    assert denied == ["api", "api"]


async def test_admin_key_is_separate_from_api_keys(model_repo, redis_url) -> None:  # type: ignore[no-untyped-def]
    """Through the real app (create_app wires the key check from settings), not the
    middleware alone: an API key never opens /admin, the admin key never opens /rank."""
    from tests.service.helpers import load_features, running_app
    from tests.support import settings_for

    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, api_keys=["user-key"],
                            admin_api_key="admin-key")
    async with running_app(settings) as c:
        api_on_admin = await c.post("/admin/reload", headers={"X-API-Key": "user-key"})
        admin_on_admin = await c.post("/admin/reload", headers={"X-Admin-Key": "admin-key"})
        bearer_on_admin = await c.post("/admin/reload",
                                       headers={"Authorization": "Bearer admin-key"})
        admin_on_rank = await c.post("/rank", headers={"X-API-Key": "admin-key"},
                                     json={"user_id": "u1", "candidates": ["i1"]})
        user_on_rank = await c.post("/rank", headers={"X-API-Key": "user-key"},
                                    json={"user_id": "u1", "candidates": ["i1"]})
        none_on_admin = await c.post("/admin/reload")
    assert api_on_admin.status_code == 401, api_on_admin.text
    assert api_on_admin.json()["error"] == "unauthorized"
    assert "admin" in api_on_admin.json()["message"]
    assert admin_on_admin.status_code == 200, admin_on_admin.text
    assert bearer_on_admin.status_code == 200, bearer_on_admin.text
    assert admin_on_rank.status_code == 401, admin_on_rank.text
    assert user_on_rank.status_code == 200, user_on_rank.text
    assert none_on_admin.status_code == 401
