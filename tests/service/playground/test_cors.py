"""CORS for browser clients: preflight and simple requests against a real ASGI app."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from service.middleware.cors import CorsConfigError, check_cors_config, cors_middleware

ALLOWED = "http://app.example.test:3000"
OTHER = "http://evil.example.test"


class Body(BaseModel):
    user_id: str


def make_app(origins: list[str], credentials: bool = False) -> FastAPI:
    """A small app with a POST /rank route; CORS installed exactly as the service does."""
    settings = SimpleNamespace(cors_origins=origins, cors_allow_credentials=credentials)
    cors = cors_middleware(settings)
    app = FastAPI(middleware=[cors] if cors else [])

    @app.post("/rank")
    async def rank(body: Body) -> dict[str, str]:
        return {"user_id": body.user_id}

    return app


async def call(app: FastAPI, method: str, headers: dict[str, str], **kw: object) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return await client.request(method, "/rank", headers=headers, **kw)  # type: ignore[arg-type]


def preflight(origin: str, headers: str = "content-type,x-request-id,x-api-key") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": headers,
    }


async def test_preflight_from_allowed_origin_passes_with_methods_and_headers() -> None:
    r = await call(make_app([ALLOWED]), "OPTIONS", preflight(ALLOWED))
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED
    methods = {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
    assert {"POST", "OPTIONS"} <= methods
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "x-request-id", "x-api-key"} <= allowed
    assert "access-control-allow-credentials" not in r.headers  # credentials off by default
    assert int(r.headers["access-control-max-age"]) > 0


async def test_preflight_from_other_origin_gets_no_allow_origin() -> None:
    r = await call(make_app([ALLOWED]), "OPTIONS", preflight(OTHER))
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers


async def test_preflight_with_a_header_not_allowed_is_refused() -> None:
    r = await call(make_app([ALLOWED]), "OPTIONS", preflight(ALLOWED, "content-type,x-secret"))
    assert r.status_code == 400


async def test_simple_post_from_allowed_origin_gets_the_header() -> None:
    r = await call(make_app([ALLOWED]), "POST", {"Origin": ALLOWED}, json={"user_id": "u1"})
    assert r.status_code == 200
    assert r.json() == {"user_id": "u1"}
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


async def test_post_from_other_origin_gets_no_allow_origin() -> None:
    r = await call(make_app([ALLOWED]), "POST", {"Origin": OTHER}, json={"user_id": "u1"})
    assert "access-control-allow-origin" not in r.headers


async def test_no_origins_configured_means_no_cors_headers() -> None:
    r = await call(make_app([]), "OPTIONS", preflight(ALLOWED))
    assert "access-control-allow-origin" not in r.headers
    r = await call(make_app([]), "POST", {"Origin": ALLOWED}, json={"user_id": "u1"})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers


async def test_wildcard_without_credentials_allows_any_origin() -> None:
    r = await call(make_app(["*"]), "POST", {"Origin": OTHER}, json={"user_id": "u1"})
    assert r.headers["access-control-allow-origin"] == "*"


async def test_credentials_with_explicit_origin_echo_the_origin() -> None:
    r = await call(make_app([ALLOWED], credentials=True), "OPTIONS", preflight(ALLOWED))
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert r.headers["access-control-allow-credentials"] == "true"


def test_wildcard_with_credentials_is_refused_at_startup() -> None:
    with pytest.raises(CorsConfigError, match="never combined with credentials"):
        make_app(["*"], credentials=True)
    with pytest.raises(CorsConfigError, match="never combined with credentials"):
        make_app([ALLOWED, "*"], credentials=True)


@pytest.mark.parametrize("bad", ["app.example.test", "http://app.example.test/", "https://a.test/x"])
def test_entries_that_are_not_origins_are_refused(bad: str) -> None:
    with pytest.raises(CorsConfigError, match="not an origin"):
        check_cors_config([bad], False)
