"""The app's lifespan: every shared resource opened in order on one exit stack, closed in
reverse: the inference executor, the Redis client and its pool, the served log's writer, the
model registry, the experiments (their models, watcher and shadow scorer), the model watcher
(which also follows the pin file, docs/operations.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from service import metrics
from service.arms import Arms
from service.featurestore.reader import FeatureStore, close_client
from service.featurestore.reader import make_client as make_redis_client
from service.pipeline import RankingPipeline, Serving
from service.registry import LoadedModel, ModelRegistry, NoModelError, PinFileError, ReloadResult
from service.servedlog.writer import ServedLog, make_log_client
from service.settings import Settings
from service.shadow import ShadowScorer
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


# every feature store view made in this process: stopped at shutdown, before the shared client
# is closed (a cluster view may have a topology refresh under way)
_STORES: weakref.WeakSet[FeatureStore] = weakref.WeakSet()


def make_store(settings: Settings, client: RedisClient | None,
               model: LoadedModel) -> FeatureStore | None:
    """A feature store view for this model's schema (its keys carry the schema version)."""
    if client is None:
        return None
    store = FeatureStore(client, model.schema, prefix=settings.redis_prefix,
                         max_age_s=settings.feature_max_age_s)
    _STORES.add(store)
    return store


async def stop_stores(client: RedisClient) -> None:
    """Stop the views of `client` (their background work), then close it and its pool."""
    for store in [s for s in _STORES if s.client is client]:
        await store.stop()
    await close_quietly(client)


def remember(state: AppState, res: ReloadResult) -> None:
    """Keep what the last load did (the admin answers show it) and publish the lifecycle."""
    state.last_reload = {"result": res.result, "version": res.version, "detail": res.detail,
                         "check": res.check}
    publish(state)


def publish(state: AppState) -> None:
    """The lifecycle gauges: is an older version serving because newer ones were refused."""
    try:
        fallback = state.registry.fallback()
    except PinFileError:
        fallback = False
    metrics.MODEL_FALLBACK.set(1 if fallback else 0)


async def initial_load(state: AppState) -> None:
    """Load the pinned, else the newest version that passes every check, before serving; if
    none loads (or the pinned one is refused), start unready and keep trying."""
    try:
        res = await run_in_threadpool(state.registry.load_initial)
    except (NoModelError, PinFileError) as e:
        log.error("no model to serve: %s", e)
        res = ReloadResult("failure", None, str(e), "pin" if isinstance(e, PinFileError) else "")
    remember(state, res)


def poll_once(state: AppState, follow_newest: bool, was_pinned: bool) -> bool:
    """One watcher tick (in a thread): serve the pinned version, else (when following the
    repository, or when the pin was just removed) the newest one; returns whether a pin is in
    force. An unreadable pin file moves nothing: nobody can tell what to serve."""
    registry = state.registry
    try:
        pin = registry.pin()
    except PinFileError as e:
        log.error("model watcher: %s; serving stays as it is", e)
        return was_pinned
    cur = registry.current
    if pin is not None:
        target: int | None = pin.version
    elif follow_newest or was_pinned:
        target = registry.newest_version()
    else:
        return False
    if target is None or (cur is not None and cur.version == target):
        return pin is not None
    if cur is None and pin is None:  # nothing serves: the newest version that passes
        res = registry.load_initial(retry_failed=False)
    else:
        res = registry.reload(None, retry_failed=False)
    if res.result != "unchanged":
        remember(state, res)
    return pin is not None


def tick(state: AppState, follow_newest: bool, was_pinned: bool) -> bool:
    """`poll_once`, then the lifecycle gauges (a refused version may have been removed)."""
    try:
        return poll_once(state, follow_newest, was_pinned)
    finally:
        publish(state)


async def watch_models(state: AppState, interval_s: float, follow_newest: bool) -> None:
    """Poll the pin file (and, when following, the repository) every `interval_s`; a load runs
    in a thread and is swapped in only if it passes every check. A refused version is not
    retried until its files change."""
    was_pinned = state.registry.pinned_setting is not None
    with contextlib.suppress(PinFileError):
        was_pinned = state.registry.pin() is not None
    while True:
        await asyncio.sleep(interval_s)
        try:
            was_pinned = await run_in_threadpool(tick, state, follow_newest, was_pinned)
        except NoModelError:
            pass  # the repository emptied: keep serving what serves
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
            stack.push_async_callback(stop_stores, client)
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
            if new.memory_bytes is not None:
                metrics.MODEL_MEMORY.labels(new.name, str(new.version)).set(new.memory_bytes)
            metrics.MODEL_RELOADS.labels("success").inc()

        def on_failure(version: int, why: str) -> None:
            metrics.MODEL_RELOADS.labels("failure").inc()

        registry = ModelRegistry(
            settings.model_repo,
            settings.model_name,
            intra_op=settings.ort_intra_op_threads,
            inter_op=settings.ort_inter_op_threads,
            warmup_sizes=tuple(settings.warmup_batch_sizes),
            pinned=settings.model_version,
            on_swap=on_swap,
            on_failure=on_failure,
        )
        stack.callback(registry.close)
        state = AppState(settings, registry, executor, pipeline, client)
        await initial_load(state)
        await open_experiments(state, stack)
        # with the watcher off, each worker still follows the pin file (a pin made through one
        # worker must reach every other)
        follow = settings.model_watch_interval_s > 0
        interval = settings.model_watch_interval_s if follow else settings.model_pin_poll_s
        if interval > 0:
            watcher = asyncio.create_task(watch_models(state, interval, follow))
            stack.push_async_callback(stop_task, watcher)
        yield state


async def watch_experiments(arms: Arms, interval_s: float) -> None:
    """Poll the experiments file (and the canary's rollback file) every `interval_s`."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await run_in_threadpool(arms.tick)
        except Exception:  # the watcher must survive anything; the failure is logged
            log.exception("experiments watcher iteration failed")


async def open_experiments(state: AppState, stack: contextlib.AsyncExitStack) -> None:
    """The experiments file, its models loaded and warmed, its watcher and the shadow scorer.
    A refused file at start-up raises: the service does not start (like a bad setting)."""
    settings, pipeline = state.settings, state.pipeline
    if settings.experiments_file is None:
        return
    arms = Arms(settings, state.registry)
    await run_in_threadpool(arms.start)  # ExperimentsError: refuse to start
    state.arms = pipeline.arms = arms
    pipeline.store_for = lambda m: make_store(settings, state.client, m)
    shadow = ShadowScorer(settings.shadow_queue_size,
                          None if pipeline.log is None else pipeline.log.offer_served)
    shadow.start()
    stack.push_async_callback(shadow.aclose)
    pipeline.shadow = shadow
    arms.tick()  # the rollback file and the canary gauges
    interval = settings.experiments_poll_s
    if interval > 0:
        task = asyncio.create_task(watch_experiments(arms, interval))
        stack.push_async_callback(stop_task, task)


def lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: `open_state(settings)`, published as `app.state.ranker`."""

    @contextlib.asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        async with open_state(settings) as state:
            app.state.ranker = state
            yield

    return run
