"""A real service for browser tests: features in the real Redis, a real uvicorn process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ranker.schema import FeatureSchema
from tests.support import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; never `playwright install`
# Without the background-networking flags Chromium's own connections fail on a closed network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
FACTORY = "service.app:create_app_from_env"


def feature_tables(schema: FeatureSchema, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """Raw user and item tables for every id in the model's vocabularies, with varied features."""
    rng = np.random.default_rng(seed)
    vocab = schema.vocabularies()
    users = vocab["user.user_id"]
    items = vocab["item.item_id"]
    user_t = pa.table({
        "user_id": users,
        "country": rng.choice(vocab["user.country"], len(users)).tolist(),
        "activity": rng.exponential(3.0, len(users)),
    })
    item_t = pa.table({
        "item_id": items,
        "category": rng.choice(vocab["item.category"], len(items)).tolist(),
        "age_days": rng.uniform(0, 90, len(items)),
        "duration": rng.uniform(5, 300, len(items)),
    })
    return user_t, item_t


def load_features(redis_url: str, schema: FeatureSchema) -> None:
    """Write the tables with the real feature-store writer (as `ranker features load` does)."""
    from service.featurestore.writer import load_tables, make_sync_client

    users, items = feature_tables(schema)
    client = make_sync_client(redis_url, cluster=False)
    try:
        load_tables(client, schema, users, items)
    finally:
        client.close()


@contextlib.contextmanager
def run_service(
    model_dir: Path, redis_url: str, factory: str = FACTORY, port: int | None = None, **env: str
) -> Iterator[str]:
    """`uvicorn` serving the app factory on a (free) loopback port; yields its base URL."""
    environ = {
        "RANKER_MODEL_REPO": str(model_dir.parent.parent),
        "RANKER_MODEL_NAME": model_dir.parent.name,
        "RANKER_REDIS_URL": redis_url,
        "RANKER_WARMUP_BATCH_SIZES": "[1]",
        "RANKER_PLAYGROUND_ENABLED": "true",
        **env,
    }
    with ServerProcess(environ, app=factory, port=port, ready_timeout_s=READY_TIMEOUT_S,
                       stop_timeout_s=STOP_TIMEOUT_S) as server:
        yield server.url
