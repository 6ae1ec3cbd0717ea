"""Operational routes: /healthz, /readyz, /model, /metrics, and the admin calls POST
/admin/reload, /admin/pin and /admin/unpin.

Public answers (/readyz, /model) name versions and the check a refused version failed, never
a filesystem path or a load's detail; the admin answers carry the detail.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service import metrics
from service.errors import ModelUnavailable
from service.lifespan import remember
from service.registry import NoModelError, PinFileError, ReloadResult
from service.state import AppState, StateDep

router = APIRouter()

READY_PING_TIMEOUT_S = 0.25


def json_response(status: int, body: dict[str, Any]) -> Response:
    """A (non-error) JSON answer serialised with orjson."""
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and serving HTTP (no dependency is checked)."""
    return {"status": "ok"}


async def redis_ok(state: AppState) -> tuple[bool, str]:
    """Whether the feature store answers a PING quickly."""
    serving = state.serving
    if state.client is None or serving is None or serving.store is None:
        return True, "no feature store configured"
    try:
        ok = await asyncio.wait_for(serving.store.ping(), READY_PING_TIMEOUT_S)
    except Exception as e:  # any failure to answer means not ready
        return False, f"feature store unreachable: {type(e).__name__}"
    if not ok:
        return False, "feature store unreachable (no PING answer)"
    return True, "feature store reachable"


def lifecycle(state: AppState) -> dict[str, Any]:
    """Which version should serve and why (public: versions and check names, no paths)."""
    registry = state.registry
    try:
        pin = registry.pin()
        pin_body: dict[str, Any] | None = (
            {"version": pin.version, "source": pin.source} if pin else None)
        fallback = registry.fallback()
    except PinFileError:
        pin_body, fallback = {"version": None, "source": "file", "error": "unreadable"}, False
    return {"pinned": pin_body, "fallback": fallback,
            "refused": [{"version": v, "check": c} for v, c in registry.refused().items()]}


def public_last_reload(state: AppState) -> dict[str, Any]:
    last = state.last_reload
    return {"result": last.get("result"), "version": last.get("version"),
            "check": last.get("check") or None}


@router.get("/readyz")
async def readyz(state: StateDep) -> Response:
    """200 when a model is loaded and warmed and Redis answers; else 503 with the reason."""
    serving = state.serving
    life = await run_in_threadpool(lifecycle, state)  # reads the pin file and the repository
    if serving is None:
        return json_response(503, {"status": "not_ready", "reason": "no model loaded",
                                   "last_reload": public_last_reload(state), **life})
    ok, why = await redis_ok(state)
    body = {"model": {"name": serving.model.name, "version": serving.model.version}, **life}
    if not ok:
        return json_response(503, {"status": "not_ready", "reason": why, **body})
    return json_response(200, {"status": "ready", "feature_store": why, **body})


@router.get("/model")
async def model_info(state: StateDep) -> Response:
    """The serving model's manifest (without the golden sample) and when it was loaded."""
    serving = state.serving
    if serving is None:
        raise ModelUnavailable("no model loaded yet", headers={"Retry-After": "1"})
    m = serving.model
    body = m.manifest.model_dump(mode="json", exclude={"golden"})
    body["serving"] = {"loaded_at": m.loaded_at, "load_seconds": round(m.load_seconds, 4),
                       "memory_bytes": m.memory_bytes,
                       **await run_in_threadpool(lifecycle, state)}
    if state.arms is not None:  # absent without an experiments file: the body stays as it was
        body["experiments"] = state.arms.state()
        body["loaded_versions"] = [
            {"name": x.name, "version": x.version, "memory_bytes": x.memory_bytes}
            for x in [m, *state.registry.extra.values()]]
    return json_response(200, body)


@router.get("/metrics")
async def metrics_route() -> Response:
    """Prometheus exposition (all workers' metrics in multiprocess mode)."""
    data, content_type = metrics.render()
    return Response(data, media_type=content_type)


def reload_body(res: ReloadResult, state: AppState) -> dict[str, Any]:
    serving = state.serving
    return {"result": res.result, "version": res.version, "detail": res.detail,
            "check": res.check or None,
            "serving_version": serving.model.version if serving else None}


def admin_answer(state: AppState, res: ReloadResult) -> Response:
    """200 when the action took (or had nothing to do), 409 when it was refused."""
    remember(state, res)
    status = 409 if res.result in ("failure", "pinned") else 200
    return json_response(status, reload_body(res, state))


Version = Annotated[int, Query(ge=0, le=2**31 - 1)]  # orjson: 64-bit max


@router.post("/admin/reload")
async def admin_reload(
    state: StateDep,
    version: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,  # orjson: 64-bit max
) -> Response:
    """Load the pinned, else the newest (or the given) version in a worker thread and swap it
    in if it passes. In this worker only: a rollback that every worker keeps is a pin."""
    # the admin key (when configured) was checked before this runs: service.middleware.auth
    try:
        res = await run_in_threadpool(state.registry.reload, version)
    except NoModelError as e:
        res = ReloadResult("failure", version, str(e))
    except PinFileError as e:
        res = ReloadResult("failure", version, str(e), "pin")
    return admin_answer(state, res)


@router.post("/admin/pin")
async def admin_pin(state: StateDep, version: Version) -> Response:
    """Pin `version`: checked and swapped in here, then written to the pin file every worker's
    watcher reads, so no watcher moves off it until POST /admin/unpin."""
    return admin_answer(state, await run_in_threadpool(state.registry.set_pin, version))


@router.post("/admin/unpin")
async def admin_unpin(state: StateDep) -> Response:
    """Remove the pin: this worker serves the newest version (or the setting's pin) now, the
    others at their next poll."""
    try:
        res = await run_in_threadpool(state.registry.clear_pin)
    except NoModelError as e:
        res = ReloadResult("failure", None, str(e))
    except PinFileError as e:  # cannot happen after the file is gone; kept for the type
        res = ReloadResult("failure", None, str(e), "pin")
    return admin_answer(state, res)
