"""A tiny real feature schema and a tiny real exported model, for tests that need one quickly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ranker.examples import golden_inputs, tiny_schema
from ranker.schema import FeatureSchema

TASKS = ["click", "like", "share"]
MODEL_NAME = "mmoe"


def export_tiny_model(repo: Path, name: str = "ranker", seed: int = 0,
                      schema: FeatureSchema | None = None, **config: object) -> Path:
    """An untrained but real MMoE, exported through the real exporter; returns its version dir.
    `schema`: another feature schema than `tiny_schema()` (e.g. `tiny_list_schema()`)."""
    import torch

    from training.export import export_model
    from training.model import ModelConfig, MultiTaskModel, inputs_from_schema

    torch.manual_seed(seed)
    schema = tiny_schema() if schema is None else schema
    cfg = ModelConfig(
        inputs=inputs_from_schema(schema),
        tasks=TASKS,
        n_experts=4,
        expert_hidden=[8],
        tower_hidden=[4],
        **config,  # type: ignore[arg-type]
    )
    return export_model(MultiTaskModel(cfg), schema, repo, name, golden_inputs(schema))


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Corrupt a file in place by inverting one byte (in the middle unless told)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def install_version(pristine: Path, repo: Path, version: int, source: int = 2,
                    corrupt: str | None = None) -> Path:
    """Copy pristine version `source` into `repo` as `version`, atomically (aside, then rename).

    corrupt="byte" flips one byte of model.onnx; corrupt="schema" widens an input in the manifest.
    """
    tmp = repo / MODEL_NAME / f".incoming-{version}"
    shutil.copytree(pristine / MODEL_NAME / str(source), tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = version
    if corrupt == "schema":
        manifest["inputs"][1]["shape"] = [manifest["inputs"][1]["shape"][0], 5]
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if corrupt == "byte":
        flip_byte(tmp / "model.onnx")
    dst = repo / MODEL_NAME / str(version)
    os.rename(tmp, dst)
    return dst
