"""The FastAPI app factory and its lifespan (model registry, Redis client, inference executor)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service import metrics
from service.cors import add_cors
from service.errors import install_handlers
from service.guards.wiring import install_guards
from service.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.playground import playground_router
from service.registry import LoadedModel, ModelRegistry, NoModelError
from service.routes import ops, rank
from service.settings import Settings, get_settings
from service.state import AppState, Serving

log = logging.getLogger("ranker.app")

ROUTES = ("/rank", "/healthz", "/readyz", "/model", "/metrics", "/admin/reload")


def make_client(settings: Settings) -> Any:
    """The shared Redis client, or None when no feature store is configured."""
    if not settings.redis_url:
        return None
    from service.featurestore.reader import make_client as fs_make_client

    return fs_make_client(
        settings.redis_url,
        cluster=settings.redis_cluster,
        max_connections=settings.redis_max_connections,
        connect_timeout_s=settings.redis_connect_timeout_s,
        socket_timeout_s=settings.redis_socket_timeout_s,
        password=settings.redis_password,
    )


def make_store(state: AppState, model: LoadedModel) -> Any:
    """A feature store view for this model's schema (its keys carry the schema version)."""
    if state.client is None:
        return None
    from service.featurestore.reader import FeatureStore

    return FeatureStore(state.client, model.schema, prefix=state.settings.redis_prefix,
                        max_age_s=state.settings.feature_max_age_s)


def attach_lifecycle(state: AppState) -> None:
    """Wire the registry's swap/failure callbacks to the serving pair and the metrics."""

    def on_swap(old: LoadedModel | None, new: LoadedModel) -> None:
        state.serving = Serving(new, make_store(state, new))  # one reference assignment
        metrics.set_model_info(new.name, new.version, (old.name, old.version) if old else None)
        metrics.MODEL_RELOADS.labels("success").inc()

    def on_failure(version: int, why: str) -> None:
        metrics.MODEL_RELOADS.labels("failure").inc()

    state.registry.set_callbacks(on_swap, on_failure)


async def initial_load(state: AppState) -> None:
    """Load the newest version before serving; if none loads, start unready and keep trying."""
    try:
        res = await run_in_threadpool(state.registry.reload)
        state.last_reload = {"result": res.result, "version": res.version, "detail": res.detail}
    except NoModelError as e:
        log.error("no model to serve: %s", e)
        state.last_reload = {"result": "failure", "version": None, "detail": str(e)}


async def watch_models(state: AppState, interval_s: float) -> None:
    """Poll the repository; a newer complete version is loaded in a thread and swapped in."""
    registry = state.registry
    while True:
        await asyncio.sleep(interval_s)
        try:
            newest = await run_in_threadpool(registry.newest_version)
            cur = registry.current
            if newest is not None and (cur is None or newest != cur.version):
                res = await run_in_threadpool(registry.reload, None, retry_failed=False)
                if res.result != "unchanged":
                    state.last_reload = {"result": res.result, "version": res.version,
                                         "detail": res.detail}
        except Exception:  # the watcher must survive anything; the failure is logged
            log.exception("model watcher iteration failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; resources are created in its lifespan, not here."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = ModelRegistry(
            settings.model_repo,
            settings.model_name,
            intra_op=settings.ort_intra_op_threads,
            inter_op=settings.ort_inter_op_threads,
            warmup_sizes=tuple(settings.warmup_batch_sizes),
        )
        executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="infer")
        state = AppState(settings, registry, executor, client=make_client(settings))
        attach_lifecycle(state)
        app.state.ranker = state
        await initial_load(state)
        watcher = None
        if settings.model_watch_interval_s > 0:
            watcher = asyncio.create_task(watch_models(state, settings.model_watch_interval_s))
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if state.client is not None:
                from service.featurestore.reader import close_client

                with contextlib.suppress(Exception):
                    await close_client(state.client)  # the client and its pool
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="mmoe-ranker",
        summary="Multi-task (click, like, share) ranking with per-request task weights",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_handlers(app)
    app.include_router(rank.router)
    app.include_router(ops.router)
    # added last = outermost: the request id exists before the body limit answers
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    install_guards(app, settings)  # deadline backstop, API keys, operator port
    app.add_middleware(RequestContextMiddleware, routes=ROUTES, max_inflight=settings.max_inflight,
                       retry_after_s=settings.retry_after_s)
    if settings.playground_enabled:
        app.include_router(playground_router)
    # outermost of all: preflights are answered before limits, and 4xx/5xx carry CORS headers
    add_cors(app, settings)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` (several workers): settings from the environment."""
    return create_app(Settings())
