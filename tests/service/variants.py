"""Real tiny model versions with a twist, exported through the real exporter.

- `export_brittle_version`: passes every load check but fails during warm-up.
- `export_dense_context_version`: has a dense context feature (`temperature`), whose request
  values the encoder turns into a float input.

`BrittleMMoE` is the tiny MMoE plus a term that is zero for every batch of at most
`max_batch` candidates and that onnxruntime cannot compute for a larger one: it gathers
`zeros(max_batch)` at the positions `0..N-1`, so its ONNX graph holds a Gather whose indices run
out of bounds above `max_batch`. The exporter's parity check and the manifest's golden sample
(4 candidates) pass; a warm-up at 8 candidates raises inside onnxruntime, as a graph with a
frozen shape or an op that breaks at a large batch does in real life.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor

from ranker.schema import DenseFeature, FeatureSchema, GroupSchema
from tests.tiny import MODEL_NAME, TASKS, golden_inputs, tiny_schema

DENSE_CONTEXT = "temperature"


def export_brittle_version(repo: Path, version: int, max_batch: int = 4, seed: int = 3) -> Path:
    """Export a brittle MMoE as `repo/mmoe/<version>` through the real exporter."""
    from training.export import export_model
    from training.model import ModelConfig, MultiTaskModel, inputs_from_schema

    class BrittleMMoE(MultiTaskModel):
        def __init__(self, cfg: ModelConfig) -> None:
            super().__init__(cfg)
            self.register_buffer("bound", torch.zeros(max_batch))

        def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
            out = super().forward(inputs)
            # positions 0..N-1 computed from the data, so the export keeps them dynamic
            positions = torch.cumsum(torch.ones_like(inputs["item_cat"][:, 0]), 0) - 1
            pad = self.bound[positions]  # a Gather out of bounds above max_batch
            first = self.config.tasks[0]
            out[first] = out[first] + pad.reshape(out[first].shape)
            return out

    torch.manual_seed(seed)
    schema = tiny_schema()
    cfg = ModelConfig(inputs=inputs_from_schema(schema), tasks=TASKS, n_experts=4,
                      expert_hidden=[8], tower_hidden=[4])
    staging = repo / f".brittle-{version}"
    out = export_model(BrittleMMoE(cfg), schema, staging, MODEL_NAME, golden_inputs(schema),
                       version=version)
    dst = repo / MODEL_NAME / str(version)
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.rename(dst)
    shutil.rmtree(staging, ignore_errors=True)
    return dst


def dense_context_schema() -> FeatureSchema:
    """The tiny schema with a dense `temperature` in the context group."""
    groups = []
    for g in tiny_schema().groups:
        if g.entity == "context":
            g = GroupSchema(g.entity, g.key, g.categorical,
                            (DenseFeature(DENSE_CONTEXT, mean=20.0, std=8.0, default=20.0),))
        groups.append(g)
    return FeatureSchema(tuple(groups))


def export_dense_context_version(repo: Path, version: int = 1, seed: int = 5) -> Path:
    """Export a tiny MMoE whose context has a dense feature as `repo/mmoe/<version>`."""
    from training.export import export_model
    from training.model import ModelConfig, MultiTaskModel, inputs_from_schema

    torch.manual_seed(seed)
    schema = dense_context_schema()
    cfg = ModelConfig(inputs=inputs_from_schema(schema), tasks=TASKS, n_experts=4,
                      expert_hidden=[8], tower_hidden=[4])
    return export_model(MultiTaskModel(cfg), schema, repo, MODEL_NAME, golden_inputs(schema),
                        version=version)
