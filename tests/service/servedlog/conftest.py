"""Served-log test fixtures: a plain Redis client on the session's emptied server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    yield c
    c.close()
