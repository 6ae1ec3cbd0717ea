"""Export a trained model to the model repository: model.onnx + vocab.json + manifest.json.

The graph is exported with the TorchScript exporter (`dynamo=False`): user and context inputs
have their own batch axis that is 1 at serving time and N in training, and the graph broadcasts
it. `torch.export` specialises a size-1 example axis to a constant, which would freeze exactly
the axis we need to stay dynamic. Export is proven before it is published: onnxruntime must
reproduce PyTorch's outputs on the golden sample, or nothing is written to the repository.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ranker.manifest import (
    MODEL_FILE,
    VOCAB_FILE,
    Golden,
    Manifest,
    TensorSpec,
    file_entry,
    next_version,
    write_json_atomic,
    write_manifest,
)
from ranker.schema import FeatureSchema
from training.model import MultiTaskModel, PositionalWrapper

OPSET = 17
GOLDEN_ATOL = 1e-5


def onnx_bytes(model: MultiTaskModel, example: dict[str, np.ndarray]) -> bytes:
    """The model as a self-contained ONNX file with named inputs/outputs and dynamic batch axes."""
    model = model.eval()
    specs = model.config.input_specs()
    names = [s.name for s in specs]
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[n])) for n in names)
    outputs = model.output_names()
    # item inputs carry the candidate batch; user and context inputs have their own (1 or N)
    dynamic_axes: dict[str, dict[int, str]] = {s.name: {0: s.batch_axis} for s in specs}
    dynamic_axes.update({o: {0: "batch"} for o in outputs})
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            PositionalWrapper(model),
            args,
            buf,  # type: ignore[arg-type]  # a file object works; the stub says path only
            input_names=names,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return buf.getvalue()


@torch.no_grad()
def torch_outputs(model: MultiTaskModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = model.eval()
    out = model({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}


def check_parity(session: ort.InferenceSession, expected: dict[str, np.ndarray],
                 inputs: dict[str, np.ndarray], atol: float) -> float:
    """Max abs difference between onnxruntime and `expected`; raises if any exceeds atol."""
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, inputs), strict=True))
    worst = 0.0
    for name, want in expected.items():
        err = float(np.max(np.abs(got[name] - want))) if want.size else 0.0
        if not err <= atol:
            raise ValueError(f"onnxruntime output {name!r} differs from PyTorch by {err} > {atol}")
        worst = max(worst, err)
    return worst


def flush_subnormals(model: torch.nn.Module) -> int:
    """Set the parameters' subnormal floats to zero, in place; returns how many there were.
    Weight decay shrinks the embedding rows of rarely seen ids below the smallest normal float
    (the production world's user-id table after one epoch: 624 k of its 6.4 M weights), and
    onnxruntime's CPU kernels run ~2.4x slower on such a graph (N = 500: 3.09 -> 1.30 ms); each
    weight moves by less than 1.2e-38."""
    flushed = 0
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                sub = (param != 0) & (param.abs() < torch.finfo(param.dtype).tiny)
                count = int(sub.sum())
                if count:
                    param[sub] = 0
                    flushed += count
    return flushed


def export_model(
    model: MultiTaskModel,
    schema: FeatureSchema,
    repo: Path,
    name: str,
    golden_inputs: dict[str, np.ndarray],
    *,
    metrics: dict[str, Any] | None = None,
    training_data: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    version: int | None = None,
) -> Path:
    """Write a new version of `name` into `repo` and return its directory.

    `golden_inputs` are a few encoded rows (the model's input dict); their PyTorch outputs are
    stored in the manifest for loaders to check. The version appears atomically: everything is
    written into a staging directory that is renamed into place last.
    """
    model = model.eval()
    flush_subnormals(model)
    cfg = model.config
    if schema.input_specs() != cfg.input_specs():
        raise ValueError("model inputs do not match the feature schema")
    base = Path(repo) / name
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=base, prefix=".staging-"))
    try:
        model_path = staging / MODEL_FILE
        model_path.write_bytes(onnx_bytes(model, golden_inputs))
        write_json_atomic(staging / VOCAB_FILE, schema.vocabularies())
        for fname, src in (extra_files or {}).items():
            shutil.copyfile(src, staging / fname)

        expected = torch_outputs(model, golden_inputs)
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        check_parity(session, expected, golden_inputs, GOLDEN_ATOL)

        version = version or next_version(repo, name)
        manifest = Manifest(
            name=name,
            version=version,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            model_type=cfg.model_type,
            tasks=list(cfg.tasks),
            task_kind=cfg.task_kind,
            n_experts=cfg.gate_width,
            inputs=[
                TensorSpec(name=s.name, dtype=s.dtype, shape=[s.batch_axis, s.width])
                for s in schema.input_specs()
            ],
            outputs=[
                TensorSpec(name=o.name, dtype="float32", shape=_shape(o.shape))
                for o in session.get_outputs()
            ],
            features=schema.describe(),
            config=cfg.to_dict(),
            metrics=metrics or {},
            training_data=training_data or {},
            files={
                p.name: file_entry(p)
                for p in sorted(staging.iterdir())
                if p.is_file() and not p.name.startswith(".")
            },
            golden=Golden(
                inputs={k: v.tolist() for k, v in golden_inputs.items()},
                outputs={k: v.tolist() for k, v in expected.items()},
                atol=GOLDEN_ATOL,
            ),
        )
        write_manifest(staging, manifest)
        final = base / str(version)
        os.rename(staging, final)  # fails if the version exists: versions are immutable
        return final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _shape(shape: list[Any]) -> list[str | int]:
    return [d if isinstance(d, int) else str(d) for d in shape]
