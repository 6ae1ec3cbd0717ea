"""Model lifecycle without a server: load, check, refuse bad versions, swap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.registry import LoadedModel, ModelRegistry, NoModelError, load_version
from tests.tiny import MODEL_NAME, flip_byte, install_version

FAST = (1, 10)


def cur(reg: ModelRegistry) -> LoadedModel:
    model = reg.current
    assert model is not None
    return model


def registry(repo: Path, **kw) -> ModelRegistry:
    return ModelRegistry(repo, MODEL_NAME, warmup_sizes=FAST, **kw)


def test_loads_newest_and_runs_a_broadcast_batch(model_repo, pristine_models):
    install_version(pristine_models, model_repo, 2)
    reg = registry(model_repo)
    res = reg.reload()
    assert res.result == "success" and res.version == 2
    model = reg.current
    assert model is not None and model.version == 2
    inputs = model.synthetic_inputs(7)
    assert inputs["user_cat"].shape[0] == 1 and inputs["item_cat"].shape[0] == 7
    scores, gates = model.run(inputs)
    assert scores.shape == (7, 3)
    assert gates is not None and gates.shape == (7, 3, 4)
    np.testing.assert_allclose(gates.sum(axis=-1), 1.0, atol=1e-5)
    assert reg.reload().result == "unchanged"


def test_empty_repo_raises(tmp_path):
    with pytest.raises(NoModelError):
        registry(tmp_path).reload()


def test_swap_keeps_old_object_intact(model_repo, pristine_models):
    swaps = []
    reg = registry(model_repo, on_swap=lambda old, new: swaps.append((old, new)))
    reg.reload()
    held = cur(reg)  # a request in flight holds this
    install_version(pristine_models, model_repo, 2)
    assert reg.reload().result == "success"
    assert reg.current is not held and cur(reg).version == 2
    assert held.version == 1
    held.run(held.synthetic_inputs(3))  # still usable after the swap
    assert [(o.version if o else None, n.version) for o, n in swaps] == [(None, 1), (1, 2)]
    # the two versions really are different models
    x = held.synthetic_inputs(3)
    assert not np.allclose(held.run(x)[0], cur(reg).run(x)[0])


def test_corrupt_file_refused_old_keeps_serving(model_repo, pristine_models):
    failures = []
    reg = registry(model_repo, on_failure=lambda v, why: failures.append((v, why)))
    reg.reload()
    bad = install_version(pristine_models, model_repo, 2)
    flip_byte(bad / "model.onnx")
    res = reg.reload()
    assert res.result == "failure" and "sha256" in res.detail
    assert cur(reg).version == 1
    assert failures and failures[0][0] == 2
    # a watcher does not retry it forever; an explicit reload does
    assert reg.reload(retry_failed=False).result == "unchanged"
    assert reg.reload().result == "failure"
    # ... and the watcher does retry once the files change (the copy is fixed)
    flip_byte(bad / "model.onnx")
    assert reg.reload(retry_failed=False).result == "success"
    assert cur(reg).version == 2 and reg.failed_versions == {}


def test_schema_mismatch_refused(model_repo, pristine_models):
    reg = registry(model_repo)
    reg.reload()
    bad = install_version(pristine_models, model_repo, 2)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["inputs"][1]["shape"] = ["user_batch", 5]  # user_dense width 1 -> 5
    (bad / "manifest.json").write_text(json.dumps(manifest))
    res = reg.reload()
    assert res.result == "failure" and "inputs" in res.detail
    assert cur(reg).version == 1


def test_golden_mismatch_refused(model_repo, pristine_models):
    bad = install_version(pristine_models, model_repo, 2)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["golden"]["outputs"]["click"][0] += 0.01
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="golden output 'click'"):
        load_version(bad, warmup_sizes=FAST)


def test_graph_from_another_version_refused(model_repo, pristine_models):
    """A model.onnx whose manifest hashes were rewritten to match still fails the golden check."""
    from ranker.manifest import file_entry

    bad = install_version(pristine_models, model_repo, 2)
    (bad / "model.onnx").write_bytes((model_repo / MODEL_NAME / "1" / "model.onnx").read_bytes())
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = file_entry(bad / "model.onnx").model_dump()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="golden"):
        load_version(bad, warmup_sizes=FAST)


def test_context_encoding_is_batch_one(model_repo):
    reg = registry(model_repo)
    reg.reload()
    ctx = cur(reg).context_inputs({"hour": 7, "surface": "search"})
    assert ctx["context_cat"].shape == (1, 2) and ctx["context_cat"].dtype == np.int64
    assert ctx["context_cat"].tolist() == [[8, 2]]
    assert cur(reg).context_inputs(None)["context_cat"].tolist() == [[0, 0]]


def test_model_without_gates_loads_and_runs(tmp_path):
    from tests.tiny import export_tiny_model

    export_tiny_model(tmp_path, name=MODEL_NAME, model_type="shared_bottom", bottom_hidden=[8])
    reg = registry(tmp_path)
    assert reg.reload().result == "success"
    model = cur(reg)
    assert not model.has_gates and model.output_names == ["click", "like", "share"]
    scores, gates = model.run(model.synthetic_inputs(5))
    assert scores.shape == (5, 3) and gates is None


def test_unwarmed_model_is_never_estimated_fast(model_repo):
    """Without warm-up there is no timing, so no request may be run inline."""
    cold = load_version(model_repo / "mmoe" / "1", warmup_sizes=())
    assert cold.timing is None and cold.estimated_run_s(1) == float("inf")
    warm = load_version(model_repo / "mmoe" / "1", warmup_sizes=(1, 8))
    assert warm.timing is not None and warm.timing[0] == 8
    assert 0 < warm.estimated_run_s(4) < warm.estimated_run_s(16) < 1.0
