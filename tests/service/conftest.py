"""Service fixtures: a model repository with two real exported versions, copied per test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

MODEL_NAME = "mmoe"


@pytest.fixture(scope="session")
def pristine_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/mmoe/1 and models/mmoe/2: two real tiny MMoEs with different weights."""
    from tests.tiny import export_tiny_model

    repo = tmp_path_factory.mktemp("pristine_models")
    export_tiny_model(repo, name=MODEL_NAME, seed=0)
    export_tiny_model(repo, name=MODEL_NAME, seed=1)
    return repo


@pytest.fixture
def model_repo(pristine_repo: Path, tmp_path: Path) -> Path:
    """A private copy holding only version 1 (tests add versions with `add_version`)."""
    repo = tmp_path / "models"
    (repo / MODEL_NAME).mkdir(parents=True)
    shutil.copytree(pristine_repo / MODEL_NAME / "1", repo / MODEL_NAME / "1")
    return repo


def add_version(pristine: Path, repo: Path, version: int, source: int = 2) -> Path:
    """Copy pristine version `source` into `repo` as `version`, fixing the manifest's number."""
    dst = repo / MODEL_NAME / str(version)
    shutil.copytree(pristine / MODEL_NAME / str(source), dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = version
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Corrupt a file in place by inverting one byte (in the middle unless told)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
