"""The lifespan's resources and the pipeline without HTTP: opened, used, and all closed after."""

from __future__ import annotations

import asyncio
import json
import time

import orjson
import pytest

from service.lifespan import open_state
from service.schemas import RankRequest
from tests.service.helpers import load_features
from tests.support import redis_client_ids, settings_for

pytestmark = pytest.mark.asyncio


async def wait_for(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.02)


def watchers() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__name__", "") == "watch_models"]


async def test_open_state_ranks_and_closes_everything_it_opened(model_repo, redis_url):
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, model_watch_interval_s=0.05)
    before = redis_client_ids(redis_url)  # other tests' clients may linger on the session server
    async with open_state(settings) as state:
        assert state.serving is not None and state.serving.model.version == 1
        req = RankRequest(user_id="u1", candidates=["i1", "i2", "i3"], top_k=2)
        body = json.loads(await state.pipeline.rank(req, "rid-1"))
        assert body["request_id"] == "rid-1" and len(body["items"]) == 2, body
        assert body["defaulted"] == {"user": 0, "items": 0, "stale": 0}, body
        ours = redis_client_ids(redis_url) - before
        assert ours  # the pool holds the connection it used
        assert len(watchers()) == 1
        executor = state.executor
    await wait_for(lambda: not ours & redis_client_ids(redis_url))  # the client and pool closed
    assert watchers() == []
    assert state.registry.current is None
    with pytest.raises(RuntimeError):  # shut down
        executor.submit(print)


async def test_pipeline_stages_are_the_request_path(model_repo, redis_url):
    """rank() is exactly its public stages in order: the same body from the stages by hand."""
    load_features(redis_url, model_repo / "mmoe" / "1")
    async with open_state(settings_for(model_repo, redis_url)) as state:
        pipeline, serving = state.pipeline, state.serving
        assert serving is not None
        req = RankRequest(user_id="u2", candidates=[f"i{i}" for i in range(10)],
                          weights={"like": 3.0}, top_k=5)
        whole = await pipeline.rank(req, "rid")
        model = serving.model
        loop = asyncio.get_running_loop()
        scoring = pipeline.validate(model, req)
        feats = await pipeline.fetch(serving, req, loop.time() + 5.0)
        inputs = pipeline.decode(model, req, feats)
        scores, gates = await pipeline.infer(model, inputs, len(req.candidates),
                                             loop.time() + 5.0)
        ranking = pipeline.combine(model, scoring, scores, gates, req.top_k)
        by_hand = pipeline.encode(req, model, "rid", scoring, ranking, feats)
    assert orjson.loads(by_hand) == orjson.loads(whole)
