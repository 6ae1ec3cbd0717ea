"""The exported model as an eager PyTorch module with the very same weights.

The manifest carries the ModelConfig and the ONNX file carries every parameter as a named
initializer (`model.<state_dict key>`), so the PyTorch model is rebuilt from the exported
version itself: no dependency on where the trainer kept its checkpoint, and the weights are
bit-identical to what the service serves (`check_same_weights` proves it on the golden sample).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ranker.manifest import MODEL_FILE, load_manifest
from training.model import ModelConfig, MultiTaskModel

PREFIX = "model."  # export wraps the model in PositionalWrapper, whose attribute is `model`


def load_eager(version_dir: Path) -> MultiTaskModel:
    """MultiTaskModel with the manifest's config and the ONNX file's initializers, in eval mode."""
    manifest = load_manifest(version_dir)
    model = MultiTaskModel(ModelConfig.from_dict(manifest.config))
    graph = onnx.load(str(Path(version_dir) / MODEL_FILE)).graph
    weights = {
        init.name[len(PREFIX):]: torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in graph.initializer
        if init.name.startswith(PREFIX)
    }
    model.load_state_dict(weights, strict=True)  # fails loudly if export renamed or folded any
    return model.eval()


@torch.no_grad()
def check_same_weights(model: MultiTaskModel, version_dir: Path) -> float:
    """Max abs difference between the eager model and the manifest's golden outputs."""
    manifest = load_manifest(version_dir)
    dtypes = {s.name: np.int64 if s.dtype == "int64" else np.float32 for s in manifest.inputs}
    inputs = {k: torch.from_numpy(np.asarray(v, dtype=dtypes[k]))
              for k, v in manifest.golden.inputs.items()}
    out = model(inputs)
    return max(
        float(np.max(np.abs(out[name].numpy() - np.asarray(want, dtype=np.float32))))
        for name, want in manifest.golden.outputs.items()
    )
