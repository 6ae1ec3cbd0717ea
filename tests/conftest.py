"""Shared fixtures: a real redis-server for the whole session, and a tiny real exported model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from launch.local_redis import RedisServer
from tests.tiny import MODEL_NAME


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server on a free loopback port; a test that stops it must restart it."""
    with RedisServer() as server:
        yield server


def emptied_url(server: RedisServer) -> str:
    """The server's URL, running (restarted if a test stopped it) and emptied with FLUSHALL."""
    if not server.running:  # a previous test stopped it and failed before restarting
        server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=2.0)
    try:
        client.flushall()
    finally:
        client.close()
    return server.url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied so each test starts from nothing."""
    return emptied_url(redis_server)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (and its world) written by the real generator; read only."""
    from training.synthetic import SyntheticConfig, write_dataset

    out = tmp_path_factory.mktemp("synthetic")
    write_dataset(SyntheticConfig.small(), out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (untrained) tiny MMoE exported through the real exporter: its version directory."""
    from tests.tiny import export_tiny_model

    return export_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def pristine_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mmoe/1 and mmoe/2: two real tiny MMoEs (same schema, different weights); never modified."""
    from tests.tiny import export_tiny_model

    repo = tmp_path_factory.mktemp("pristine_models")
    export_tiny_model(repo, name=MODEL_NAME, seed=0)
    export_tiny_model(repo, name=MODEL_NAME, seed=1)
    return repo


@pytest.fixture
def model_repo(pristine_models: Path, tmp_path: Path) -> Path:
    """A private repository holding only version 1 (tests add more with `install_version`)."""
    repo = tmp_path / "models"
    (repo / MODEL_NAME).mkdir(parents=True)
    shutil.copytree(pristine_models / MODEL_NAME / "1", repo / MODEL_NAME / "1")
    return repo
