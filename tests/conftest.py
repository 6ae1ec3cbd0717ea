"""Shared fixtures: a real redis-server for the whole session, and a tiny real exported model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.featurestore.embedded import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server on a free loopback port; a test that stops it must restart it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied (FLUSHALL) so each test starts from nothing."""
    if not redis_server.running:  # a previous test stopped it and failed before restarting
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2.0)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (untrained) tiny MMoE exported through the real exporter: its version directory."""
    from tests.tiny import export_tiny_model

    return export_tiny_model(tmp_path_factory.mktemp("models"))
