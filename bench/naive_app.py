"""The implementation a user would write first, as the baseline the service is compared with.

Deliberately straightforward, not deliberately slow (torch gets one thread per worker, see
`create_app`): a FastAPI endpoint that reads the user's
and each candidate's features with one HGETALL per entity, encodes them feature by feature in a
Python loop with the same schema functions, stacks them into tensors, runs the same weights in
eager PyTorch, and returns plain dicts through FastAPI's default serialisation.

    NAIVE_MODEL_DIR=models/mmoe/1 NAIVE_REDIS_URL=redis://127.0.0.1:6379/0 \
        uvicorn --factory bench.naive_app:create_app
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import redis
import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field

from bench.data import naive_key
from bench.eager import load_eager
from ranker.manifest import load_manifest, load_schema

TORCH_DTYPES = {"int64": torch.int64, "float32": torch.float32}


class RankRequest(BaseModel):
    user_id: str
    candidates: list[str] = Field(min_length=1, max_length=1000)
    weights: dict[str, float] | None = None
    context: dict[str, Any] | None = None
    top_k: int | None = None


def create_app() -> FastAPI:
    """The naive app for the model version in NAIVE_MODEL_DIR and the Redis at NAIVE_REDIS_URL."""
    version_dir = Path(os.environ["NAIVE_MODEL_DIR"])
    # One intra-op thread per worker, the service's onnxruntime budget. torch's default (one
    # per core) spins OpenMP threads that, on a shared machine, measure the machine rather than
    # the design (the figure is in docs/benchmarks.md, "naive app").
    torch.set_num_threads(int(os.environ.get("NAIVE_TORCH_THREADS", "1")))
    manifest = load_manifest(version_dir)
    schema = load_schema(version_dir, manifest)
    model = load_eager(version_dir)
    tasks = list(manifest.tasks)
    specs = schema.input_specs()
    r = redis.Redis.from_url(os.environ["NAIVE_REDIS_URL"], decode_responses=True)
    app = FastAPI(title="naive ranker")

    def encode(entity: str, values: dict[str, Any]) -> tuple[list[int], list[float]]:
        g = schema.group(entity)
        if g is None:
            return [], []
        return ([f.vocab.encode_one(values.get(f.name)) for f in g.categorical],
                [f.encode_one(values.get(f.name)) for f in g.dense])

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/rank")
    def rank(req: RankRequest) -> dict[str, Any]:
        user = r.hgetall(naive_key("user", req.user_id))
        parts = {"user": encode("user", user),  # type: ignore[arg-type]
                 "context": encode("context", req.context or {})}
        rows: dict[str, list[Any]] = {s.name: [] for s in specs}
        for item_id in req.candidates:
            item = r.hgetall(naive_key("item", item_id))
            parts["item"] = encode("item", item)  # type: ignore[arg-type]
            for s in specs:  # every row of every input: user and context repeated per candidate
                rows[s.name].append(parts[s.entity][0 if s.kind == "cat" else 1])
        inputs = {s.name: torch.tensor(rows[s.name], dtype=TORCH_DTYPES[s.dtype]) for s in specs}
        with torch.no_grad():
            out = model(inputs)
        weights = {t: (req.weights or {}).get(t, 1.0) for t in tasks}
        items: list[dict[str, Any]] = []
        for i, item_id in enumerate(req.candidates):
            scores = {t: float(out[t][i]) for t in tasks}
            items.append({"item_id": item_id, "score": sum(weights[t] * scores[t] for t in tasks),
                          "scores": scores})
        items.sort(key=lambda x: x["score"], reverse=True)
        if req.top_k is not None:
            items = items[: req.top_k]
        return {"model_version": manifest.version, "items": items}

    return app
