"""Reliability fixtures: two real exported model versions, a feature-loaded redis-server, and
the expected scores of every (user, item) pair computed directly with onnxruntime."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from launch.local_redis import RedisServer
from tests.reliability.oracle import Oracle
from tests.tiny import MODEL_NAME

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` tests here (soak, long fuzzing) run only when asked: `-m slow` or RANKER_SLOW=1."""
    if "slow" in (config.getoption("-m") or "") or os.environ.get("RANKER_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with `pytest -m slow tests/reliability`")
    for item in items:
        if "slow" in item.keywords and HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def oracle(pristine_models: Path) -> Oracle:
    """Expected scores of every (version, user, item), computed without the service."""
    return Oracle.build(pristine_models / MODEL_NAME, versions=(1, 2))


@pytest.fixture(scope="session")
def feature_redis(pristine_models: Path) -> Iterator[RedisServer]:
    """A private redis-server with the test feature tables loaded (tests may kill/restart it)."""
    from tests.service.helpers import load_features

    with RedisServer() as server:
        load_features(server.url, pristine_models / MODEL_NAME / "1")
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            client.save()  # dump.rdb in its directory: a restart on the same dir reloads the data
        finally:
            client.close()
        yield server


@pytest.fixture
def live_redis(feature_redis: RedisServer) -> RedisServer:
    """The feature server, running (restarted if an earlier test left it down)."""
    if not feature_redis.running:
        feature_redis.start()
    return feature_redis


def rank_body(i: int, n: int = 20, n_users: int = 10, n_items: int = 60) -> dict[str, Any]:
    """Request i: user u{i % n_users}, n distinct items chosen by i (deterministic)."""
    rng = np.random.default_rng(i)
    items = rng.choice(n_items, size=min(n, n_items), replace=False)
    return {"user_id": f"u{i % n_users}", "candidates": [f"i{j}" for j in items]}


class SentBodies(dict[int, dict[str, Any]]):
    """The `rank_body(i)` of every request sent, by i: called as a load's `body_of`, so the
    check of an answer can read the request it answers."""

    def __call__(self, i: int) -> dict[str, Any]:
        self[i] = rank_body(i)
        return self[i]
