"""In-process measurements: the physical floors, the inference knobs, serialisation and parsing.

- MGET floor: one raw MGET of the request's keys (pointer, user, N items) on the same Redis,
  with a plain blocking redis-py client (hiredis parser): the round trip with no framework.
- inference floor: one onnxruntime `run` on the request's real batch, with the service's own
  session options (`service.registry.make_session`).
- knobs: threads and graph optimisation level of the session, user-once (U=1) vs tiled user
  rows (U=N) through the same graph with the max abs difference, JSON encoders and top_k.
- stages alone: each public stage method of the service's `RankingPipeline`.

Every timing is the median of many repeats after warm-up, bounded by count and by time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import redis

from ranker.schema import FeatureSchema
from service.featurestore.keys import DEFAULT_PREFIX, pointer_key, record_key_prefix

BUDGET_S = 2.0  # upper bound on any one timing loop; `ranker bench --quick` lowers it

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def time_calls(fn: Callable[[int], Any], repeats: int = 200, max_s: float = 2.0,
               warmup: int = 5) -> dict[str, float]:
    """Median/p99/mean (ms) of `fn(i)` over up to `repeats` calls or `max_s` seconds."""
    for i in range(warmup):
        fn(i)
    times = []
    deadline = time.perf_counter() + min(max_s, BUDGET_S)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline and len(times) >= 5:
            break
    return stats(times)


async def time_awaits(fn: Callable[[int], Awaitable[Any]], repeats: int = 200, max_s: float = 2.0,
                      warmup: int = 5) -> dict[str, float]:
    """`time_calls` for a coroutine function, awaited one call at a time on the running loop."""
    for i in range(warmup):
        await fn(i)
    times = []
    deadline = time.perf_counter() + min(max_s, BUDGET_S)
    for i in range(repeats):
        t0 = time.perf_counter()
        await fn(i)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline and len(times) >= 5:
            break
    return stats(times)


def stats(times: list[float]) -> dict[str, float]:
    """Median/p99/mean (ms) and count of durations in seconds."""
    ms = np.asarray(times) * 1e3
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": int(ms.size)}


def store_keys(schema: FeatureSchema, load_id: str, user_id: str, item_ids: list[str],
               prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The keys the service's single MGET asks for: pointers, user record, item records."""
    v = schema.version
    user = record_key_prefix(prefix, v, load_id, "user") + user_id
    item = record_key_prefix(prefix, v, load_id, "item")
    pointers = [pointer_key(prefix, v, "user"), pointer_key(prefix, v, "item")]
    return [*pointers, user, *[item + i for i in item_ids]]


def mget_floor(url: str, key_lists: list[list[str]], repeats: int = 300) -> dict[str, float]:
    """One raw MGET per call over the request mix's key lists; checks every key exists."""
    client = redis.Redis.from_url(url)
    try:
        missing = sum(v is None for v in client.mget(key_lists[0]))
        if missing:
            raise RuntimeError(f"{missing} of the floor's MGET keys are missing from Redis")
        return time_calls(lambda i: client.execute_command("MGET", *key_lists[i % len(key_lists)]),
                          repeats)
    finally:
        client.close()


def fetch_inputs(url: str, schema: FeatureSchema, requests: list[dict[str, Any]],
                 context_inputs: Callable[[dict[str, Any] | None], dict[str, np.ndarray]]
                 ) -> list[dict[str, np.ndarray]]:
    """The model inputs the service would build for each request (through the real reader)."""
    from service.featurestore.reader import FeatureStore, make_client

    async def go() -> list[dict[str, np.ndarray]]:
        client = make_client(url, socket_timeout_s=5.0, connect_timeout_s=5.0)
        store = FeatureStore(client, schema)
        try:
            out = []
            for req in requests:
                res = await store.fetch(req["user_id"], req["candidates"])
                out.append({**res.inputs, **context_inputs(req.get("context"))})
            return out
        finally:
            await client.aclose()

    return asyncio.run(go())


def make_session(model_path: Path, intra: int = 1, inter: int = 1,
                 opt: str = "all") -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = inter
    opts.graph_optimization_level = OPT_LEVELS[opt]
    return ort.InferenceSession(str(model_path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def ort_time(session: ort.InferenceSession, batches: list[dict[str, np.ndarray]],
             repeats: int = 200) -> dict[str, float]:
    """One `run` per call over the batches (all outputs, as the service asks for)."""
    names = [o.name for o in session.get_outputs()]
    return time_calls(lambda i: session.run(names, batches[i % len(batches)]), repeats)


def user_once_vs_tiled(session: ort.InferenceSession, schema: FeatureSchema,
                       batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Latency of U=1 vs U=N through the same graph, and the max abs difference of outputs."""
    names = [o.name for o in session.get_outputs()]
    tiled = [schema.tiled_inputs(b) for b in batches]
    diff = 0.0
    for b, t in zip(batches[:10], tiled[:10], strict=True):
        for a, c in zip(session.run(names, b), session.run(names, t), strict=True):
            diff = max(diff, float(np.max(np.abs(a - c))))
    return {"user_once": ort_time(session, batches), "tiled": ort_time(session, tiled),
            "max_abs_diff": diff}


def ort_knobs(model_path: Path, batches: list[dict[str, np.ndarray]],
              threads: tuple[int, ...] = (1, 2),
              opts: tuple[str, ...] = ("disable", "basic", "all")) -> list[dict[str, Any]]:
    """Inference p50 for each (intra-op threads, optimisation level)."""
    rows = []
    for t in threads:
        for o in opts:
            rows.append({"intra_op": t, "opt": o,
                         **ort_time(make_session(model_path, t, 1, o), batches, repeats=100)})
    return rows


def response_like(n: int, tasks: list[str], seed: int = 0) -> dict[str, Any]:
    """A /rank response body of n items, shaped as the service's."""
    rng = np.random.default_rng(seed)
    s = rng.random((n, len(tasks)))
    items = [{"id": f"item{i}", "score": float(s[i].sum()),
              "scores": dict(zip(tasks, s[i].tolist(), strict=True))} for i in range(n)]
    return {"request_id": "x" * 32, "model": {"name": "mmoe", "version": 1}, "tasks": tasks,
            "scoring": "weighted_sum", "weights": dict.fromkeys(tasks, 1.0), "items": items,
            "defaulted": {"user": 0, "items": 0, "stale": 0}, "degraded": False,
            "degraded_reason": None}


def _bind(fn: Callable[[Any], Any], arg: Any) -> Callable[[int], Any]:
    return lambda _i: fn(arg)


def _fastapi_default(body: Any) -> bytes:
    """What FastAPI does with a returned dict: jsonable_encoder, then json.dumps."""
    from fastapi.encoders import jsonable_encoder

    return json.dumps(jsonable_encoder(body), ensure_ascii=False, separators=(",", ":")).encode()


def serialisation(n: int, tasks: list[str], top_ks: tuple[int, ...] = (10, 100)) -> dict[str, Any]:
    """Encoding time of a response of n items (and of its top_k cuts) with three encoders."""
    out: dict[str, Any] = {}
    for k in sorted({n, *[k for k in top_ks if k < n]}):
        body = response_like(n, tasks)
        body["items"] = body["items"][:k]
        out[str(k)] = {
            "bytes": len(orjson.dumps(body)),
            "orjson": time_calls(_bind(orjson.dumps, body), 200, 1.0),
            "json": time_calls(_bind(lambda b: json.dumps(b).encode(), body), 200, 1.0),
            "fastapi_default": time_calls(_bind(_fastapi_default, body), 100, 1.0),
        }
    return out


def parse_time(bodies: list[bytes]) -> dict[str, float]:
    """Request parsing and validation as FastAPI does it: JSON then the pydantic model."""
    from service.schemas import RankRequest

    return time_calls(lambda i: RankRequest.model_validate(json.loads(bodies[i % len(bodies)])),
                      300, 1.0)


def stages_in_process(url: str, model: Any, requests: list[dict[str, Any]],
                      bodies: list[bytes]) -> dict[str, dict[str, float]]:
    """Each /rank stage alone: the ranking pipeline's own public methods on the request mix.

    The pipeline has the default settings (those of `ranker serve`), a feature store on `url`
    and the model timed as the service's warm-up times it, so `infer` runs inline or on the
    executor exactly as in the service. `parse` (body -> RankRequest) is FastAPI's, before the
    pipeline. Async stages run on the loop the service runs on (uvloop when installed).
    """
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from service.featurestore.reader import FeatureStore, make_client
    from service.pipeline import RankingPipeline, Serving
    from service.registry import time_runs
    from service.schemas import RankRequest
    from service.settings import Settings

    settings = Settings()
    if model.timing is None:
        timing = time_runs(model, max(settings.warmup_batch_sizes))
        model = dataclasses.replace(model, timing=timing)
    reqs = [RankRequest.model_validate_json(b) for b in bodies]

    async def go() -> dict[str, dict[str, float]]:
        client = make_client(url, socket_timeout_s=5.0, connect_timeout_s=5.0)
        executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="infer")
        pipeline = RankingPipeline(settings, executor)
        serving = pipeline.serving = Serving(model, FeatureStore(client, model.schema))
        loop = asyncio.get_running_loop()

        def far() -> float:  # a deadline (event-loop clock) no stage here comes near
            return loop.time() + 60.0

        def req(i: int) -> Any:
            return reqs[i % len(reqs)]

        try:
            scorings = [pipeline.validate(model, r) for r in reqs]
            feats = [await pipeline.fetch(serving, r, far()) for r in reqs]
            inputs = [pipeline.decode(model, r, f) for r, f in zip(reqs, feats, strict=True)]
            k = min(20, len(reqs))
            outs = [await pipeline.infer(model, inputs[i], len(reqs[i].candidates), far())
                    for i in range(k)]
            ranked = [pipeline.combine(model, scorings[i], *outs[i], reqs[i].top_k)
                      for i in range(k)]
            return {
                "parse": time_calls(
                    lambda i: RankRequest.model_validate_json(bodies[i % len(bodies)])),
                "validate": time_calls(lambda i: pipeline.validate(model, req(i))),
                "fetch": await time_awaits(
                    lambda i: pipeline.fetch(serving, req(i), far()), repeats=300),
                "decode": time_calls(
                    lambda i: pipeline.decode(model, req(i), feats[i % len(feats)])),
                "inference": await time_awaits(
                    lambda i: pipeline.infer(model, inputs[i % len(inputs)],
                                             len(req(i).candidates), far())),
                "combine": time_calls(
                    lambda i: pipeline.combine(model, scorings[i % k], *outs[i % k],
                                               reqs[i % k].top_k)),
                "serialize": time_calls(
                    lambda i: pipeline.encode(reqs[i % k], model, "x" * 32, scorings[i % k],
                                              ranked[i % k], feats[i % k])),
            }
        finally:
            executor.shutdown(wait=True)
            await client.aclose()

    try:  # the loop the service runs on (uvicorn picks uvloop when installed)
        import uvloop

        return uvloop.run(go())
    except ImportError:
        return asyncio.run(go())
