"""The int8 knob: onnxruntime dynamic quantisation of the served graph, its speed and AUC change.

Dynamic quantisation stores MatMul (and Gather, i.e. embedding) weights as int8 and quantises
activations on the fly; it needs no calibration data. The AUC of both graphs is measured on the
test split of the dataset the model was trained on, encoded with the model's own schema.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench import floors
from ranker.manifest import MODEL_FILE, load_manifest, load_schema

MAX_EVAL_ROWS = 50_000  # bounded: a few seconds of inference on 2 cores
CHUNK = 4096


def quantise(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation of `src` into `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def predict(session: ort.InferenceSession, inputs: dict[str, np.ndarray],
            tasks: list[str]) -> np.ndarray:
    """(rows, T) scores in chunks (every group tiled to the rows, as in training)."""
    n = len(next(iter(inputs.values())))
    out = []
    for lo in range(0, n, CHUNK):
        part = {k: v[lo:lo + CHUNK] for k, v in inputs.items()}
        out.append(np.stack(session.run(tasks, part), axis=1))
    return np.concatenate(out)


def test_split_auc(version_dir: Path, data_dir: Path,
                   sessions: dict[str, ort.InferenceSession]) -> dict[str, Any]:
    """AUC per task of each session on (up to MAX_EVAL_ROWS of) the test split."""
    from training.data import encode_split, load_raw
    from training.metrics import auc
    from training.spec import load_spec

    manifest = load_manifest(version_dir)
    schema = load_schema(version_dir, manifest)
    spec = load_spec(manifest.training_data.get("dataset", "synthetic"))
    raw = load_raw(spec, data_dir)
    enc = encode_split(spec, schema, raw, "test")
    rows = np.arange(min(len(enc), MAX_EVAL_ROWS))
    enc = enc.take(rows)
    tasks = list(manifest.tasks)
    # the data directory may have been regenerated since the model was trained
    out: dict[str, Any] = {"rows": len(enc),
                           "same_data_as_training": raw.sha256 == manifest.training_data.get(
                               "sha256")}
    for name, sess in sessions.items():
        scores = predict(sess, enc.inputs, tasks)
        out[name] = {t: auc(enc.labels[:, j], scores[:, j]) for j, t in enumerate(tasks)}
    return out


def int8_knob(version_dir: Path, data_dir: Path | None,
              batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Speed of fp32 vs int8 on the bench batches; AUC of both when the test split is there."""
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        q = quantise(version_dir / MODEL_FILE, Path(tmp) / "model.int8.onnx")
        sessions = {"fp32": floors.make_session(version_dir / MODEL_FILE),
                    "int8": floors.make_session(q)}
        out: dict[str, Any] = {
            "bytes": {"fp32": (version_dir / MODEL_FILE).stat().st_size,
                      "int8": q.stat().st_size},
            "inference": {k: floors.ort_time(s, batches) for k, s in sessions.items()},
        }
        names = [o.name for o in sessions["fp32"].get_outputs()]
        diffs = [np.max(np.abs(a - b)) for batch in batches[:5]
                 for a, b in zip(sessions["fp32"].run(names, batch),
                                 sessions["int8"].run(names, batch), strict=True)]
        out["max_abs_diff"] = float(max(diffs))
        if data_dir is not None:
            try:
                out["auc"] = test_split_auc(version_dir, data_dir, sessions)
            except (FileNotFoundError, KeyError, ValueError, ImportError) as e:
                out["auc_error"] = f"{type(e).__name__}: {e}"
        return out
