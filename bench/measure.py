"""Measure /rank in-process: end-to-end and per-stage latency by candidate count.

    python -m bench.measure --candidates 100 500 1000 --requests 200

Needs the `train` extra (it exports a fresh default-size MMoE over the tiny test schema with
torch) and starts a private redis-server; the app, the Redis client and onnxruntime are the real
ones, the HTTP layer is httpx's in-process ASGI transport (no sockets: see bench/ for that).
Sequential requests, so the figures are service time, not throughput. The stage columns are
the ranking pipeline's stages (`service.pipeline.RankingPipeline`, one public method each), as
its stage timer records them in `ranker_stage_duration_seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def export_model(repo: Path, n_items: int) -> Path:  # needs torch (the train extra)
    """The MMoE docs/api.md measured (8 experts of 64-32, towers of 16) over the tiny schema."""
    import torch

    from ranker.examples import golden_inputs, tiny_schema
    from training.export import export_model as export
    from training.model import ModelConfig, MultiTaskModel, inputs_from_schema

    torch.manual_seed(0)
    schema = tiny_schema(n_users=1000, n_items=n_items)
    cfg = ModelConfig(inputs=inputs_from_schema(schema), expert_hidden=[64, 32])  # docs/api.md
    return export(MultiTaskModel(cfg), schema, repo, "mmoe", golden_inputs(schema))


def feature_tables(version_dir: Path, n_items: int) -> tuple[Any, Any, Any]:
    """(schema, users, items) of an exported version: 1000 users and `n_items` items of random
    features, seed 0 (every bench that loads them gets the same features)."""
    import pyarrow as pa

    from ranker.manifest import load_manifest, load_schema

    rng = np.random.default_rng(0)
    schema = load_schema(version_dir, load_manifest(version_dir))
    users = pa.table({"user_id": [f"u{i}" for i in range(1000)],
                      "country": rng.choice(["us", "de", "br", "in"], 1000).tolist(),
                      "activity": rng.uniform(0, 20, 1000)})
    items = pa.table({"item_id": [f"i{i}" for i in range(n_items)],
                      "category": rng.choice([f"c{i}" for i in range(8)], n_items).tolist(),
                      "age_days": rng.uniform(0, 90, n_items),
                      "duration": rng.uniform(5, 200, n_items)})
    return schema, users, items


def load_features(url: str, version_dir: Path, n_items: int) -> None:
    import redis

    from service.featurestore.writer import load_tables

    client = redis.Redis.from_url(url)
    try:
        load_tables(client, *feature_tables(version_dir, n_items))
    finally:
        client.close()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000.0, q))


async def run(args: argparse.Namespace, repo: Path, url: str) -> list[dict[str, Any]]:
    import httpx
    from asgi_lifespan import LifespanManager

    from service import metrics
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(model_repo=repo, model_name="mmoe", redis_url=url, request_timeout_s=5.0,
                        max_candidates=max(args.candidates))
    app = create_app(settings)
    rows = []
    rng = np.random.default_rng(1)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
            for n in args.candidates:
                stage_times: dict[str, list[float]] = {s: [] for s in metrics.STAGES}
                e2e: list[float] = []
                server: list[float] = []
                for i in range(args.warmup + args.requests):
                    cands = [f"i{j}" for j in rng.choice(args.items, n, replace=False)]
                    body = {"user_id": f"u{i % 1000}", "candidates": cands,
                            "preset": "engagement"}
                    before = {s: _stage_sum(s) for s in metrics.STAGES}
                    before_server = _server_sum()
                    t0 = time.perf_counter()
                    r = await client.post("/rank", json=body)
                    dt = time.perf_counter() - t0
                    assert r.status_code == 200, r.text
                    if i >= args.warmup:
                        e2e.append(dt)
                        server.append(_server_sum() - before_server)
                        for s in metrics.STAGES:
                            stage_times[s].append(_stage_sum(s) - before[s])
                row: dict[str, Any] = {"candidates": n, "p50_ms": pct(e2e, 50),
                                       "p99_ms": pct(e2e, 99), "server_p50_ms": pct(server, 50),
                                       "server_p99_ms": pct(server, 99)}
                row.update({f"{s}_p50_ms": pct(v, 50) for s, v in stage_times.items()})
                rows.append(row)
    return rows


def _server_sum() -> float:
    from prometheus_client import REGISTRY

    v = REGISTRY.get_sample_value("ranker_request_duration_seconds_sum", {"route": "/rank"})
    return float(v or 0.0)


def _stage_sum(stage: str) -> float:
    from prometheus_client import REGISTRY

    v = REGISTRY.get_sample_value("ranker_stage_duration_seconds_sum", {"stage": stage})
    return float(v or 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.measure")
    p.add_argument("--candidates", type=int, nargs="+", default=[100, 500, 1000])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--items", type=int, default=5000)
    args = p.parse_args(argv)

    from launch.local_redis import RedisServer

    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        repo = Path(tmp)
        vdir = export_model(repo, args.items)
        load_features(server.url, vdir, args.items)
        rows = asyncio.run(run(args, repo, server.url))
    from service.metrics import STAGES

    cols = ["candidates", "p50_ms", "p99_ms", "server_p50_ms", "server_p99_ms",
            *[f"{s}_p50_ms" for s in STAGES]]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c])
                                for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
