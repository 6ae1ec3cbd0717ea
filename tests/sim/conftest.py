"""Fixtures for the simulator tests: one small synthetic world written by the real generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.synthetic import SyntheticConfig, World, write_dataset


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_dataset(SyntheticConfig.small(), out)
    return out


@pytest.fixture(scope="session")
def world(world_dir: Path) -> World:
    return World.load(world_dir)
