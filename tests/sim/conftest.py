"""Fixtures for the simulator tests: the world of the small synthetic dataset (`small_data`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.synthetic import World


@pytest.fixture(scope="session")
def world(small_data: Path) -> World:
    return World.load(small_data)
