"""Service test fixtures: model versions with a twist (tests/service/variants.py), exported once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import MODEL_NAME


@pytest.fixture(scope="session")
def brittle_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository whose mmoe/1 passes every check but fails warm-up above 4 candidates."""
    from tests.service.variants import export_brittle_version

    repo = tmp_path_factory.mktemp("brittle_models")
    export_brittle_version(repo, 1)
    assert (repo / MODEL_NAME / "1").is_dir()
    return repo


@pytest.fixture(scope="session")
def dense_context_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository whose mmoe/1 has a dense context feature (`temperature`)."""
    from tests.service.variants import export_dense_context_version

    repo = tmp_path_factory.mktemp("dense_context_models")
    export_dense_context_version(repo, 1)
    return repo
