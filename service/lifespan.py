"""The app's lifespan: every shared resource opened in order on one exit stack, closed in
reverse: the inference executor, the Redis client and its pool, the served log's writer, the
model registry, the model watcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from service import metrics
from service.featurestore.reader import FeatureStore, close_client
from service.featurestore.reader import make_client as make_redis_client
from service.pipeline import RankingPipeline, Serving
from service.registry import LoadedModel, ModelRegistry, NoModelError
from service.servedlog.writer import ServedLog, make_log_client
from service.settings import Settings
from service.state import AppState, RedisClient

log = logging.getLogger("ranker.app")


def make_client(settings: Settings) -> RedisClient | None:
    """The shared Redis client, or None when no feature store is configured."""
    if not settings.redis_url:
        return None
    return make_redis_client(
        settings.redis_url,
        cluster=settings.redis_cluster,
        max_connections=settings.redis_max_connections,
        connect_timeout_s=settings.redis_connect_timeout_s,
        socket_timeout_s=settings.redis_socket_timeout_s,
        password=settings.redis_password,
    )


async def close_quietly(client: RedisClient) -> None:
    """Close the client and its pool; shutting down, a dead Redis is no error."""
    with contextlib.suppress(RedisError, OSError):
        await close_client(client)


def make_store(settings: Settings, client: RedisClient | None,
               model: LoadedModel) -> FeatureStore | None:
    """A feature store view for this model's schema (its keys carry the schema version)."""
    if client is None:
        return None
    return FeatureStore(client, model.schema, prefix=settings.redis_prefix,
                        max_age_s=settings.feature_max_age_s)


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


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@contextlib.asynccontextmanager
async def open_state(settings: Settings) -> AsyncIterator[AppState]:
    """Every resource the running service holds; the newest model is loaded before it yields."""
    async with contextlib.AsyncExitStack() as stack:
        executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="infer")
        stack.callback(executor.shutdown, wait=False, cancel_futures=True)
        client = make_client(settings)
        if client is not None:
            stack.push_async_callback(close_quietly, client)
        pipeline = RankingPipeline(settings, executor)
        # the served log's writer task: flushed on exit within the graceful period, then its
        # own Redis client closed
        served_log = ServedLog(settings, make_log_client(settings),
                               busy=lambda: pipeline.active > 0)
        await served_log.start()
        stack.push_async_callback(served_log.aclose, settings.graceful_shutdown_s)
        pipeline.log = served_log

        def on_swap(old: LoadedModel | None, new: LoadedModel) -> None:
            pipeline.serving = Serving(new, make_store(settings, client, new))  # one assignment
            metrics.set_model_info(new.name, new.version, (old.name, old.version) if old else None)
            metrics.MODEL_RELOADS.labels("success").inc()

        def on_failure(version: int, why: str) -> None:
            metrics.MODEL_RELOADS.labels("failure").inc()

        registry = ModelRegistry(
            settings.model_repo,
            settings.model_name,
            intra_op=settings.ort_intra_op_threads,
            inter_op=settings.ort_inter_op_threads,
            warmup_sizes=tuple(settings.warmup_batch_sizes),
            on_swap=on_swap,
            on_failure=on_failure,
        )
        stack.callback(registry.close)
        state = AppState(settings, registry, executor, pipeline, client)
        await initial_load(state)
        if settings.model_watch_interval_s > 0:
            watcher = asyncio.create_task(watch_models(state, settings.model_watch_interval_s))
            stack.push_async_callback(stop_task, watcher)
        yield state


def lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: `open_state(settings)`, published as `app.state.ranker`."""

    @contextlib.asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        async with open_state(settings) as state:
            app.state.ranker = state
            yield

    return run
