"""Export: onnxruntime reproduces PyTorch at batch 1, an odd size and the largest supported size,
with the user broadcast (U = 1) and tiled (U = N); the manifest describes the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ranker.examples import golden_inputs, tiny_schema
from ranker.manifest import load_manifest, load_schema, verify_files
from training.export import export_model, onnx_bytes, torch_outputs
from training.model import ModelConfig, ModelType, MultiTaskModel, inputs_from_schema

MAX_BATCH = 2048  # the largest candidate batch the service sends (its request limit)
ATOL = 1e-5
TASKS = ["click", "like", "share"]


def trained_like_model(model_type: ModelType, interaction_dim: int = 0,
                       wide: bool = False, **kw: Any) -> MultiTaskModel:
    """A model with weights far from init (scaled up) so parity is tested on non-trivial values;
    cross tables (zero at init in wide mode) get random values."""
    torch.manual_seed(7)
    cfg = ModelConfig(inputs=inputs_from_schema(tiny_schema()), tasks=TASKS,
                      model_type=model_type, n_experts=4, expert_hidden=[16, 8],
                      bottom_hidden=[16, 8], tower_hidden=[8], interaction_dim=interaction_dim,
                      wide=wide, **kw)
    model = MultiTaskModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
        for name, p in model.named_parameters():
            if name.startswith("cross_tables."):
                p.add_(torch.randn_like(p))
    return model.eval()


# cross features: a wide logit table (one hashed, one a user x context pair) and an embedding
CROSSES = {"crosses": ["country:category", "user_id:item_id", "country:hour"],
           "cross_buckets": 101}
EMBEDDED = {"crosses": ["country:category"], "cross_mode": "embedding", "cross_dim": 4}


@pytest.fixture(scope="module", params=[("mmoe", 0, False, {}), ("shared_bottom", 0, False, {}),
                                        ("mmoe", 6, True, {}), ("shared_bottom", 6, False, {}),
                                        ("mmoe", 0, False, CROSSES),
                                        ("shared_bottom", 0, True, EMBEDDED)],
                ids=lambda p: f"{p[0]}-int{p[1]}{'-wide' if p[2] else ''}"
                              f"{'-' + p[3].get('cross_mode', 'wide') + '-cross' if p[3] else ''}")
def exported(request: pytest.FixtureRequest) -> tuple[MultiTaskModel, ort.InferenceSession]:
    model_type, interaction_dim, wide, kw = request.param
    model = trained_like_model(model_type, interaction_dim, wide, **kw)
    data = onnx_bytes(model, golden_inputs(tiny_schema(), n=4))
    return model, ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("n", [1, 37, MAX_BATCH])
@pytest.mark.parametrize("user_rows", ["broadcast", "tiled"])
def test_parity(exported: tuple[MultiTaskModel, ort.InferenceSession], n: int,
                user_rows: str) -> None:
    model, session = exported
    x = golden_inputs(tiny_schema(), n=n, seed=n)
    if user_rows == "tiled":
        x = {k: np.ascontiguousarray(np.repeat(v, n // len(v), axis=0)) for k, v in x.items()}
    want = torch_outputs(model, x)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, x), strict=True))
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].shape == w.shape, k
        err = float(np.max(np.abs(got[k] - w)))
        assert err <= ATOL, f"{k}: max abs err {err} at batch {n} ({user_rows})"


def test_graph_is_named_and_self_contained(
    exported: tuple[MultiTaskModel, ort.InferenceSession],
) -> None:
    model, session = exported
    assert [i.name for i in session.get_inputs()] == model.input_names()
    assert [o.name for o in session.get_outputs()] == model.output_names()
    item = next(i for i in session.get_inputs() if i.name == "item_cat")
    assert isinstance(item.shape[0], str)  # dynamic batch axis


def test_export_writes_a_complete_version(tmp_path: Path) -> None:
    model = trained_like_model("mmoe")
    schema = tiny_schema()
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    vdir = export_model(
        model, schema, tmp_path / "repo", "mmoe", golden_inputs(schema),
        metrics={"test": {"click": {"auc": 0.7}}},
        training_data={"dataset": "tiny", "sha256": "ab" * 32, "rows": {"train": 1}},
        extra_files={"report.md": report},
    )
    assert vdir == tmp_path / "repo" / "mmoe" / "1"
    m = load_manifest(vdir)
    verify_files(vdir, m)
    assert load_schema(vdir, m).version == schema.version
    assert m.tasks == TASKS and m.model_type == "mmoe" and m.n_experts == 4
    assert [o.name for o in m.outputs] == [*TASKS, "gates"]
    assert m.metrics["test"]["click"]["auc"] == 0.7
    assert m.training_data["sha256"] == "ab" * 32
    assert {"model.onnx", "vocab.json", "report.md"} <= set(m.files)
    assert not list((tmp_path / "repo" / "mmoe").glob(".staging-*"))
    # the golden sample reproduces through onnxruntime from the file alone
    sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {k: np.asarray(v, dtype=np.int64 if k.endswith("_cat") else np.float32)
             for k, v in m.golden.inputs.items()}
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    for k, v in m.golden.outputs.items():
        np.testing.assert_allclose(got[k], np.asarray(v), atol=m.golden.atol, rtol=0)
    assert json.loads((vdir / "vocab.json").read_text()) == schema.vocabularies()


def test_export_flushes_subnormal_weights_to_zero() -> None:
    import torch

    from training.export import flush_subnormals

    layer = torch.nn.Embedding(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1e-39, 0.5], [0.0, -1e-40], [1e-30, 2.0], [3.0, 4.0]]))
    assert flush_subnormals(layer) == 2
    assert layer.weight.tolist()[0][0] == 0.0 and layer.weight.tolist()[1][1] == 0.0
    assert layer.weight.tolist()[2][0] == pytest.approx(1e-30)  # normal: kept
