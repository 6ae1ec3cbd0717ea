"""The playground's routes: the static page and its assets, and the sample of real ids."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from service.playground import playground_router
from service.playground.router import STATIC_DIR
from service.registry import LoadedModel, load_version
from service.settings import Settings


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    """The real tiny exported model, loaded and checked as the service loads it."""
    return load_version(tiny_model_dir, warmup_sizes=(1,))


def make_app(model: LoadedModel | None, max_candidates: int = 100) -> FastAPI:
    """The router on an app whose state looks like the service's (a serving model + settings)."""
    app = FastAPI()
    app.include_router(playground_router)
    serving = SimpleNamespace(model=model, store=None) if model is not None else None
    app.state.ranker = SimpleNamespace(
        serving=serving, settings=Settings(max_candidates=max_candidates)
    )
    return app


async def get(app: FastAPI, url: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return await client.get(url)


async def test_page_and_assets_are_served_with_a_self_only_policy(tiny_model: LoadedModel) -> None:
    app = make_app(tiny_model)
    page = await get(app, "/playground")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="/playground/playground.js"' in page.text
    assert 'href="/playground/playground.css"' in page.text
    js = await get(app, "/playground/playground.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "/rank" in js.text and "/model" in js.text
    css = await get(app, "/playground/playground.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_static_files_reference_nothing_outside_the_service() -> None:
    """Works offline: no absolute URL (CDN, font, analytics) in the page, its style or script."""
    for name in ("index.html", "playground.css", "playground.js"):
        text = (STATIC_DIR / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text and "url(" not in text, name


@pytest.mark.parametrize("name", ["router.py", "__init__.py", "..%2Frouter.py", "nope.js"])
async def test_only_the_listed_assets_are_served(tiny_model: LoadedModel, name: str) -> None:
    r = await get(make_app(tiny_model), f"/playground/{name}")
    assert r.status_code == 404


async def test_sample_returns_ids_from_the_model_vocabularies(tiny_model: LoadedModel) -> None:
    r = await get(make_app(tiny_model), "/playground/sample?users=5&items=7")
    assert r.status_code == 200
    body = r.json()
    users = set(tiny_model.schema.vocabularies()["user.user_id"])
    items = set(tiny_model.schema.vocabularies()["item.item_id"])
    assert len(body["users"]) == 5 and set(body["users"]) <= users
    assert len(body["items"]) == 7 and len(set(body["items"])) == 7 and set(body["items"]) <= items
    assert body["model"] == {"name": tiny_model.name, "version": tiny_model.version}
    assert body["context"]["surface"] == ["home", "search", "related"]
    assert len(body["context"]["hour"]) == 24


async def test_sample_is_random_unless_seeded(tiny_model: LoadedModel) -> None:
    app = make_app(tiny_model)
    a = (await get(app, "/playground/sample?items=30&seed=7")).json()
    b = (await get(app, "/playground/sample?items=30&seed=7")).json()
    c = (await get(app, "/playground/sample?items=30&seed=8")).json()
    assert a == b
    assert a["items"] != c["items"]


async def test_sample_larger_than_the_vocabulary_returns_all_of_it(tiny_model: LoadedModel) -> None:
    n_users = len(tiny_model.schema.vocabularies()["user.user_id"])
    r = await get(make_app(tiny_model), f"/playground/sample?users={n_users + 50}&items=3")
    assert r.status_code == 200
    assert sorted(r.json()["users"]) == sorted(tiny_model.schema.vocabularies()["user.user_id"])


async def test_sample_over_max_candidates_is_a_422_naming_the_limit(
    tiny_model: LoadedModel,
) -> None:
    r = await get(make_app(tiny_model, max_candidates=10), "/playground/sample?items=11")
    assert r.status_code == 422
    assert r.json()["detail"] == [
        {"field": "items", "message": "at most 10 items (the service's max_candidates)"}
    ]


@pytest.mark.parametrize("query", ["users=0", "users=201", "items=0", "items=abc", "seed=-1"])
async def test_sample_out_of_bounds_is_a_422(tiny_model: LoadedModel, query: str) -> None:
    r = await get(make_app(tiny_model), f"/playground/sample?{query}")
    assert r.status_code == 422
    assert query.split("=")[0] in r.text


async def test_sample_without_a_model_is_a_503() -> None:
    r = await get(make_app(None), "/playground/sample")
    assert r.status_code == 503


async def test_config_gives_presets_defaults_and_bounds(tiny_model: LoadedModel) -> None:
    body = (await get(make_app(tiny_model, max_candidates=42), "/playground/config")).json()
    s = Settings()
    assert body["presets"] == s.presets
    assert body["default_weights"] == s.default_weights
    assert (body["weight_min"], body["weight_max"]) == (s.weight_min, s.weight_max)
    assert body["max_candidates"] == 42
