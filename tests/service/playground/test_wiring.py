"""CORS and the playground wired into the real app factory, configured from RANKER_* settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from service.app import create_app
from service.middleware.cors import CorsConfigError
from service.settings import Settings

ORIGIN = "http://localhost:5173"


def settings_for(model_dir: Path, **kw: Any) -> Settings:
    return Settings(
        model_repo=model_dir.parent.parent,
        model_name=model_dir.parent.name,
        warmup_batch_sizes=[1],
        **kw,
    )


@asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan run (model loaded), over an in-process transport."""
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            yield c


def test_settings_read_cors_and_playground_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().cors_origins == []
    assert Settings().playground_enabled is False
    monkeypatch.setenv("RANKER_CORS_ORIGINS", f'["{ORIGIN}", "https://app.example.com"]')
    monkeypatch.setenv("RANKER_PLAYGROUND_ENABLED", "true")
    s = Settings()
    assert s.cors_origins == [ORIGIN, "https://app.example.com"]
    assert s.playground_enabled is True
    assert s.cors_allow_credentials is False


def test_the_factory_refuses_wildcard_with_credentials(tiny_model_dir: Path) -> None:
    with pytest.raises(CorsConfigError, match="never combined with credentials"):
        create_app(settings_for(tiny_model_dir, cors_origins=["*"], cors_allow_credentials=True))


async def test_playground_is_off_by_default(tiny_model_dir: Path) -> None:
    async with client_for(settings_for(tiny_model_dir)) as c:
        assert (await c.get("/playground")).status_code == 404
        assert (await c.get("/playground/sample")).status_code == 404
        assert (await c.get("/healthz")).status_code == 200


async def test_playground_on_serves_the_page_and_a_sample(tiny_model_dir: Path) -> None:
    async with client_for(settings_for(tiny_model_dir, playground_enabled=True)) as c:
        page = await c.get("/playground")
        assert page.status_code == 200 and "playground.js" in page.text
        sample = await c.get("/playground/sample?users=3&items=4")
        assert sample.status_code == 200
        assert len(sample.json()["users"]) == 3 and len(sample.json()["items"]) == 4
        bad = await c.get("/playground/sample?items=100000")
        assert bad.status_code == 422 and "items" in bad.text


async def test_real_app_preflight_and_post_from_an_allowed_origin(tiny_model_dir: Path) -> None:
    async with client_for(settings_for(tiny_model_dir, cors_origins=[ORIGIN])) as c:
        pre = await c.options("/rank", headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-api-key,x-request-id",
        })  # fmt: skip
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == ORIGIN
        other = await c.options("/rank", headers={
            "Origin": "http://elsewhere.test",
            "Access-Control-Request-Method": "POST",
        })  # fmt: skip
        assert "access-control-allow-origin" not in other.headers
        body = {"user_id": "u1", "candidates": ["i1", "i2"]}
        ok = await c.post("/rank", json=body, headers={"Origin": ORIGIN})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        # CORS is the outermost layer: a browser can read the error a bad request gets too
        bad = await c.post("/rank", json={"user_id": "u1", "candidates": []},
                           headers={"Origin": ORIGIN})
        assert bad.status_code == 422
        assert bad.headers["access-control-allow-origin"] == ORIGIN
