"""A tiny real feature schema and a tiny real exported model, for tests that need one quickly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ranker.schema import (
    CANDIDATE_ENTITY,
    CategoricalFeature,
    DenseFeature,
    FeatureSchema,
    GroupSchema,
    Vocabulary,
)

TASKS = ["click", "like", "share"]
MODEL_NAME = "mmoe"


def tiny_schema(n_users: int = 50, n_items: int = 200) -> FeatureSchema:
    """Users u0..u{n-1}, items i0..i{n-1}, plus the kinds of features the real data has."""
    user = GroupSchema(
        "user",
        "user_id",
        (
            CategoricalFeature("user_id", Vocabulary(tuple(f"u{i}" for i in range(n_users))), 4),
            CategoricalFeature("country", Vocabulary(("us", "de", "br", "in")), 3),
        ),
        (DenseFeature("activity", mean=1.5, std=0.8, default=0.0, log1p=True),),
    )
    item = GroupSchema(
        "item",
        "item_id",
        (
            CategoricalFeature("item_id", Vocabulary(tuple(f"i{i}" for i in range(n_items))), 4),
            CategoricalFeature("category", Vocabulary(tuple(f"c{i}" for i in range(8))), 3),
        ),
        (
            DenseFeature("age_days", mean=30.0, std=20.0, default=30.0),
            DenseFeature("duration", mean=60.0, std=30.0, default=60.0),
        ),
    )
    context = GroupSchema(
        "context",
        None,
        (
            CategoricalFeature("hour", Vocabulary(tuple(str(h) for h in range(24))), 3),
            CategoricalFeature("surface", Vocabulary(("home", "search", "related")), 2),
        ),
        (),
    )
    return FeatureSchema((user, item, context))


def golden_inputs(schema: FeatureSchema, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """One user and context row broadcast over n random candidates, as the service sends them."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for g in schema.groups:
        rows = n if g.entity == CANDIDATE_ENTITY else 1
        cat = np.zeros((rows, 0), np.int64)
        dense = np.zeros((rows, 0), np.float32)
        if g.n_cat:
            cat = np.stack(
                [rng.integers(0, f.vocab_size, rows) for f in g.categorical], axis=1
            ).astype(np.int64)
        if g.n_dense:
            dense = rng.normal(size=(rows, g.n_dense)).astype(np.float32)
        out.update(g.inputs(cat, dense))
    return out


def export_tiny_model(repo: Path, name: str = "ranker", seed: int = 0, **config: object) -> Path:
    """An untrained but real MMoE, exported through the real exporter; returns its version dir."""
    import torch

    from training.export import export_model
    from training.model import ModelConfig, MultiTaskModel, inputs_from_schema

    torch.manual_seed(seed)
    schema = tiny_schema()
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
