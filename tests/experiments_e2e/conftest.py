"""Fixtures of the experiment proofs: the small synthetic world, a trained and an untrained
MMoE on its schema, a real redis-server with the world's features, a real uvicorn."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from training.synthetic import SyntheticConfig, write_dataset


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the small world with more users: the report's bootstrap is over users, so its intervals
    # narrow with their number, not with requests per user
    out = tmp_path_factory.mktemp("world")
    write_dataset(SyntheticConfig.small(n_users=1000), out)
    return out


@pytest.fixture(scope="session")
def ab_models(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mmoe/1: the default model trained (short run) on the world; mmoe/2: the same
    architecture untrained (random weights): a clearly worse ranker on the same schema."""
    import torch

    from ranker.examples import golden_inputs
    from ranker.manifest import load_manifest, load_schema
    from training.export import export_model
    from training.model import ModelConfig, MultiTaskModel, inputs_from_schema
    from training.pipeline import ensure_default_model

    repo = tmp_path_factory.mktemp("ab_models")
    v1 = ensure_default_model(repo, world_dir, small=True)
    schema = load_schema(v1, load_manifest(v1))
    torch.manual_seed(7)
    model = MultiTaskModel(ModelConfig(inputs=inputs_from_schema(schema)))
    staging = repo / ".untrained"
    out = export_model(model, schema, staging, "mmoe", golden_inputs(schema), version=2)
    out.rename(repo / "mmoe" / "2")
    shutil.rmtree(staging, ignore_errors=True)
    return repo
