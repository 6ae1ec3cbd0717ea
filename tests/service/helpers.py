"""Helpers for the service tests: feature tables, Redis command counts, metric samples.

Test settings are `tests.support.settings_for`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import redis
from asgi_lifespan import LifespanManager
from prometheus_client import REGISTRY

from ranker.manifest import load_manifest, load_schema
from service.app import create_app
from service.featurestore.writer import load_tables
from service.settings import Settings
from tests.support import redis_command_calls

N_USERS = 10
N_ITEMS = 60
# items loaded with identical features and ids outside the vocabulary: they score exactly alike
TWINS = ["twin_a", "twin_b", "twin_c"]
CANDS = [f"i{i}" for i in range(40)]  # the candidate list of the /rank tests


def feature_tables(seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """Users u0..u9 and items i0..i59 (plus TWINS) with random raw features."""
    rng = np.random.default_rng(seed)
    users = pa.table({
        "user_id": [f"u{i}" for i in range(N_USERS)],
        "country": rng.choice(["us", "de", "br", "in"], N_USERS).tolist(),
        "activity": rng.uniform(0, 20, N_USERS),
    })
    ids = [f"i{i}" for i in range(N_ITEMS)] + TWINS
    n = len(ids)
    category = rng.choice([f"c{i}" for i in range(8)], n).tolist()
    age = rng.uniform(0, 90, n)
    duration = rng.uniform(5, 200, n)
    for j in range(N_ITEMS, n):  # twins: same category, age and duration as the first twin
        category[j], age[j], duration[j] = category[N_ITEMS], age[N_ITEMS], duration[N_ITEMS]
    items = pa.table({"item_id": ids, "category": category, "age_days": age,
                      "duration": duration})
    return users, items


def load_features(redis_url: str, version_dir: Path) -> None:
    """Write the test tables into Redis with the real writer, for this model's schema."""
    schema = load_schema(version_dir, load_manifest(version_dir))
    users, items = feature_tables()
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        load_tables(client, schema, users, items)
    finally:
        client.close()


def mget_calls(redis_url: str) -> int:
    """How many MGETs the server has executed."""
    return redis_command_calls(redis_url, "mget")


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of one sample in this process's registry (0 if absent)."""
    value = REGISTRY.get_sample_value(name, labels or {})
    return float(value) if value is not None else 0.0


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app factory with its lifespan, behind an in-process HTTP client."""
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
