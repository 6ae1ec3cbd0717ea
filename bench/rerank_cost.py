"""The re-rank stage's cost: the whole /rank pipeline in-process with rules on vs off.

    python -m bench.rerank_cost --candidates 500 --requests 300 --runs 3

Needs the `train` extra (the default-size MMoE of bench.measure, exported with torch) and
starts a private redis-server. Each request runs the ranking pipeline's public stage methods
in order (validate, fetch, filter, decode, infer, combine, rerank, encode), as
`RankingPipeline.rank` does and `bench/floors.py:stages_in_process` times them (the filter has
its own column here; the service's stage metric counts it in decode); "off" and "on" requests
alternate in the same run, so drift on a shared machine hits both alike. "on" is diversity (at
most 1 item of a category in any 3 consecutive positions) plus filters (10 excluded ids and the
user's seen set of 50 ids, read in the same round trip as the features; the filtered
candidates are dropped before scoring, as the service does).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("validate", "fetch", "filter", "decode", "inference", "combine", "rerank",
          "serialize")
RULES_ON: dict[str, Any] = {
    "diversity": {"attribute": "category", "max_per_window": 1, "window": 3},
    "filters": {"seen": True},
}


def write_seen_sets(url: str, n_users: int, n_items: int, per_user: int = 50) -> None:
    import redis

    from service.featurestore.keys import DEFAULT_PREFIX, seen_key

    rng = np.random.default_rng(2)
    client = redis.Redis.from_url(url)
    try:
        for u in range(n_users):
            ids = rng.choice(n_items, per_user, replace=False)
            client.sadd(seen_key(DEFAULT_PREFIX, f"u{u}"), *[f"i{i}" for i in ids])
    finally:
        client.close()


async def one_run(model: Any, url: str, n: int, requests: int, top_k: int | None,
                  seed: int, depth: int | None = None) -> dict[str, float]:
    from service.featurestore.reader import FeatureStore, make_client
    from service.pipeline import RankingPipeline, Serving
    from service.schemas import RankRequest
    from service.settings import Settings

    settings = Settings()
    client = make_client(url, socket_timeout_s=5.0, connect_timeout_s=5.0)
    executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="infer")
    pipeline = RankingPipeline(settings, executor)
    serving = pipeline.serving = Serving(model, FeatureStore(client, model.schema))
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(seed)
    n_items = 1000

    def request(on: bool) -> RankRequest:
        cands = [f"i{i}" for i in rng.choice(n_items, n, replace=False)]
        body: dict[str, Any] = {"user_id": f"u{rng.integers(1000)}", "candidates": cands,
                                "preset": "engagement", "top_k": top_k}
        if on:
            diversity = {**RULES_ON["diversity"], **({"depth": depth} if depth else {})}
            body["rerank"] = {"diversity": diversity,
                              "filters": {"seen": True, "exclude": cands[:10]}}
        return RankRequest.model_validate(body)

    async def timed(req: RankRequest) -> list[float]:
        """Seconds of each stage, then the process CPU seconds of the whole request."""
        c0 = time.process_time()
        t = [time.perf_counter()]
        scoring = pipeline.validate(model, req)
        t.append(time.perf_counter())
        seen = scoring.rerank is not None and scoring.rerank.seen
        feats = await pipeline.fetch(serving, req, loop.time() + 60.0, seen=seen)
        t.append(time.perf_counter())
        req, feats = pipeline.filter(model, req, scoring, feats)
        t.append(time.perf_counter())
        inputs = pipeline.decode(model, req, feats)
        t.append(time.perf_counter())
        scores, gates = await pipeline.infer(model, inputs, len(req.candidates),
                                             loop.time() + 60.0)
        t.append(time.perf_counter())
        ranking = pipeline.combine(model, scoring, scores, gates, req.top_k)
        t.append(time.perf_counter())
        ranking = pipeline.rerank(model, req, scoring, ranking, feats)
        t.append(time.perf_counter())
        pipeline.encode(req, model, "x" * 32, scoring, ranking, feats)
        t.append(time.perf_counter())
        return [*np.diff(t).tolist(), t[-1] - t[0], time.process_time() - c0]

    times: dict[bool, list[list[float]]] = {False: [], True: []}
    rerank_alone: list[float] = []
    try:
        for i in range(requests + 20):
            on = bool(i % 2)
            dt = await timed(request(on))
            if i >= 20:
                times[on].append(dt)
        for _ in range(100):  # the rerank stage alone on one "on" request
            req = request(True)
            scoring = pipeline.validate(model, req)
            feats = await pipeline.fetch(serving, req, loop.time() + 60.0, seen=True)
            req, feats = pipeline.filter(model, req, scoring, feats)
            inputs = pipeline.decode(model, req, feats)
            scores, gates = await pipeline.infer(model, inputs, len(req.candidates),
                                                 loop.time() + 60.0)
            ranking = pipeline.combine(model, scoring, scores, gates, req.top_k)
            t0 = time.perf_counter()
            pipeline.rerank(model, req, scoring, ranking, feats)
            rerank_alone.append(time.perf_counter() - t0)
    finally:
        executor.shutdown(wait=True)
        await client.aclose()
    off = np.median(np.array(times[False]), axis=0) * 1e3
    on_ = np.median(np.array(times[True]), axis=0) * 1e3
    out = {"off_p50_ms": float(off[-2]), "on_p50_ms": float(on_[-2]),
           "ratio": float(on_[-2] / off[-2]),
           "off_cpu_ms": float(off[-1]), "on_cpu_ms": float(on_[-1]),
           "cpu_ratio": float(on_[-1] / off[-1]),
           "stage_sum_ratio": float(on_[:-2].sum() / off[:-2].sum()),
           "rerank_stage_p50_ms": float(np.median(rerank_alone) * 1e3)}
    for j, name in enumerate(STAGES):
        out[f"{name}_off_ms"], out[f"{name}_on_ms"] = float(off[j]), float(on_[j])
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.measure import export_model, load_features
    from launch.local_redis import RedisServer
    from service.registry import load_version, time_runs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--requests", type=int, default=300, help="per run, on and off together")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None,
                    help="diversity depth (default: the setting rerank_diversity_depth)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as rs:
        version_dir = export_model(Path(tmp) / "models", 1000)
        load_features(rs.url, version_dir, 1000)
        write_seen_sets(rs.url, 1000, 1000)
        model = load_version(version_dir)
        model = dataclasses.replace(model, timing=time_runs(model, 1000))
        rows = [asyncio.run(one_run(model, rs.url, args.candidates, args.requests, args.top_k,
                                    seed, args.depth)) for seed in range(args.runs)]
    for i, r in enumerate(rows):
        print(f"run {i + 1}: wall p50 off {r['off_p50_ms']:.3f} / on {r['on_p50_ms']:.3f} ms "
              f"(ratio {r['ratio']:.3f}); CPU p50 off {r['off_cpu_ms']:.3f} / on "
              f"{r['on_cpu_ms']:.3f} ms (ratio {r['cpu_ratio']:.3f}); sum of stage p50s ratio "
              f"{r['stage_sum_ratio']:.3f}; rerank stage alone p50 "
              f"{r['rerank_stage_p50_ms']:.3f} ms")
        print("   stage p50 off/on ms: " + ", ".join(
            f"{s} {r[f'{s}_off_ms']:.3f}/{r[f'{s}_on_ms']:.3f}" for s in STAGES))
    for key in ("ratio", "cpu_ratio", "stage_sum_ratio"):
        v = [r[key] for r in rows]
        print(f"{key} on/off: median {np.median(v):.3f}, min {min(v):.3f}, max {max(v):.3f} "
              f"over {len(rows)} runs (N={args.candidates}, top_k={args.top_k}, "
              f"depth={args.depth or 'default'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
