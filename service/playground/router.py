"""The ranking playground: a static page at /playground and a JSON sample of real ids.

The page is plain HTML/CSS/JS shipped in this package (no build step, no CDN), so it works
offline. Ids for the page's pickers come from the serving model's vocabularies, never from the
request, so the endpoint cannot be used to probe what else is stored.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from service.errors import error_response, request_id_of

STATIC_DIR = Path(__file__).resolve().parent
STATIC_FILES = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}
# Only our own origin: proves (and enforces, in the browser test) that nothing comes from a CDN.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
MAX_SAMPLE_USERS = 200
MAX_SAMPLE_ITEMS = 1000
MAX_CONTEXT_CHOICES = 64  # context features with bigger vocabularies are left to free text

router = APIRouter(tags=["playground"])


@lru_cache(maxsize=8)
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


def _headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }


def _serving_model(request: Request) -> Any:
    """The model the service is serving now (a LoadedModel), or a 503 if there is none yet."""
    state = getattr(request.app.state, "ranker", None)
    serving = getattr(state, "serving", None)  # the model /rank uses right now
    model = getattr(serving, "model", None)
    if model is None:
        raise HTTPException(status_code=503, detail="no model loaded yet")
    return model


def _max_candidates(request: Request) -> int:
    state = getattr(request.app.state, "ranker", None)
    return int(getattr(getattr(state, "settings", None), "max_candidates", MAX_SAMPLE_ITEMS))


def _invalid(request: Request, field: str, message: str) -> Response:
    """The service's 422 answer: the field and the limit."""
    return error_response(422, "invalid_request", f"{field}: {message}",
                          detail=[{"field": field, "message": message}],
                          request_id=request_id_of(request.scope))


@router.get("/playground", include_in_schema=False)
def playground_page() -> Response:
    """The playground's HTML page."""
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=_headers())


@router.get("/playground/sample")
async def playground_sample(
    request: Request,
    users: Annotated[int, Query(ge=1, le=MAX_SAMPLE_USERS)] = 20,
    items: Annotated[int, Query(ge=1, le=MAX_SAMPLE_ITEMS)] = 50,
    seed: Annotated[int | None, Query(ge=0, le=2**32 - 1)] = None,
) -> Response:
    """Random user ids and item ids from the serving model's vocabularies, plus context choices."""
    limit = _max_candidates(request)
    if items > limit:
        return _invalid(request, "items", f"at most {limit} items (the service's max_candidates)")
    model = _serving_model(request)
    schema = model.schema
    rng = random.Random(seed)
    out: dict[str, Any] = {
        "model": {"name": model.name, "version": model.version},
        "users": _sample_ids(schema, "user", users, rng),
        "items": _sample_ids(schema, "item", items, rng),
        "context": _context_choices(schema),
    }
    return JSONResponse(out, headers={"Cache-Control": "no-store"})


@router.get("/playground/config")
async def playground_config(request: Request) -> JSONResponse:
    """What the page needs beyond /model: presets, default weights and their bounds."""
    settings = getattr(getattr(request.app.state, "ranker", None), "settings", None)
    out = {
        "presets": getattr(settings, "presets", {}),
        "default_weights": getattr(settings, "default_weights", {}),
        "weight_min": getattr(settings, "weight_min", 0.0),
        "weight_max": getattr(settings, "weight_max", 100.0),
        "max_candidates": _max_candidates(request),
        "rerank": _rerank_config(request),
    }
    return JSONResponse(out, headers={"Cache-Control": "no-store"})


def _rerank_config(request: Request) -> dict[str, Any]:
    """The re-rank controls: the serving model's categorical item attributes, the rules file's
    preset names and default, the pinned-share bound."""
    state = getattr(request.app.state, "ranker", None)
    serving = getattr(state, "serving", None)
    group = getattr(getattr(serving, "model", None), "schema", None)
    group = group.group("item") if group is not None else None
    key = getattr(group, "key", None)
    attrs = [f.name for f in getattr(group, "categorical", ()) if f.name != key]
    rules = getattr(getattr(state, "pipeline", None), "rules", None)
    config = rules.current() if rules is not None else None
    settings = getattr(state, "settings", None)
    return {
        "attributes": attrs,
        "presets": sorted(getattr(config, "presets", {}) or {}),
        "default_preset": getattr(config, "default_preset", None),
        "max_pinned_share": getattr(settings, "rerank_max_pinned_share", 0.2),
    }


@router.get("/playground/{name}", include_in_schema=False)
def playground_asset(name: str) -> Response:
    """The page's stylesheet and script (a fixed list: no path is ever built from the request)."""
    if name not in STATIC_FILES:
        raise HTTPException(status_code=404, detail="not found")
    return Response(_read(name), media_type=STATIC_FILES[name], headers=_headers())


def _sample_ids(schema: Any, entity: str, k: int, rng: random.Random) -> list[str]:
    """Up to k distinct ids from the vocabulary of the entity's key feature."""
    group = schema.group(entity)
    if group is None or group.key is None:
        return []
    vocab = next((f.vocab for f in group.categorical if f.name == group.key), None)
    if vocab is None:
        return []
    values = vocab.values  # a tuple: sampled in place, never copied (vocabularies can be big)
    return rng.sample(values, min(k, len(values)))


def _context_choices(schema: Any) -> dict[str, list[str]]:
    """Small categorical context vocabularies, so the page can offer them as dropdowns."""
    group = schema.group("context")
    if group is None:
        return {}
    return {
        f.name: list(f.vocab.values)
        for f in group.categorical
        if len(f.vocab.values) <= MAX_CONTEXT_CHOICES
    }
