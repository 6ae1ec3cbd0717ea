"""Issue 18's options on tiny data: PLE/CGC, the ESMM chain, position tower, gate dropout,
calibration in the graph, loss balancers -- each through export and onnxruntime."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ranker.examples import golden_inputs, tiny_schema
from ranker.manifest import GATES_LEVELS_OUTPUT, GATES_OUTPUT, load_manifest
from training.calibration import calibrate, ece, pav
from training.data import Encoded
from training.export import export_model, onnx_bytes, torch_outputs
from training.losses import pcgrad_project
from training.model import ModelConfig, MultiTaskModel, inputs_from_schema
from training.train import TrainConfig, fit

TASKS = ["click", "like", "share"]
CHAIN = {"like": "click", "share": "click"}
SIZES = [1, 37, 2048]
ATOL = 1e-5


def make(**kw: Any) -> MultiTaskModel:
    torch.manual_seed(3)
    cfg = ModelConfig(inputs=inputs_from_schema(tiny_schema()), tasks=TASKS, n_experts=4,
                      expert_hidden=[8, 6], tower_hidden=[4], **kw)
    model = MultiTaskModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model.eval()


def session(model: MultiTaskModel) -> ort.InferenceSession:
    data = onnx_bytes(model, golden_inputs(tiny_schema(), n=4))
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, x), strict=True))


def assert_parity(model: MultiTaskModel, sess: ort.InferenceSession) -> None:
    for n in SIZES:
        x = golden_inputs(tiny_schema(), n=n, seed=n)
        want, got = torch_outputs(model, x), run(sess, x)
        assert set(got) == set(want)
        for k, w in want.items():
            assert got[k].shape == w.shape, k
            err = float(np.max(np.abs(got[k] - w)))
            assert err <= ATOL, f"{k}: max abs err {err} at batch {n}"


def tiny_encoded(n: int, seed: int) -> Encoded:
    """Random encoded rows of the tiny schema with labels from a fixed random teacher."""
    x = golden_inputs(tiny_schema(), n=n, seed=seed)
    x = {k: np.ascontiguousarray(np.repeat(v, n // len(v), axis=0)) for k, v in x.items()}
    rng = np.random.default_rng(seed)
    z = x["item_dense"].sum(1).astype(np.float64) * 2.0  # (N,)
    p = 1 / (1 + np.exp(-(z - np.array([[1.0], [2.5], [3.5]]))))  # (T, N)
    click = rng.random(n) < p[0]
    labels = np.stack([click, click & (rng.random(n) < 0.3), click & (rng.random(n) < 0.1)], 1)
    return Encoded(x, labels.astype(np.float32), None)


@pytest.mark.parametrize("kw", [
    {"model_type": "ple", "levels": 2},
    {"model_type": "ple", "levels": 3, "gate_dropout": 0.1},
    {"model_type": "cgc"},
    {"model_type": "mmoe", "chain": CHAIN},
    {"model_type": "ple", "chain": CHAIN, "position_buckets": 5},
    {"model_type": "mmoe", "position_buckets": 10},
], ids=["ple2", "ple3-gatedrop", "cgc", "mmoe-esmm", "ple-esmm-pos", "mmoe-pos"])
def test_options_export_with_parity(kw: dict[str, Any]) -> None:
    model = make(**kw)
    sess = session(model)
    assert [i.name for i in sess.get_inputs()] == model.input_names()  # no position input
    assert [o.name for o in sess.get_outputs()] == model.output_names()
    assert_parity(model, sess)


def test_ple_gates_are_distributions_over_own_and_shared() -> None:
    model = make(model_type="ple", levels=3, task_experts=2, shared_experts=3)
    out = run(session(model), golden_inputs(tiny_schema(), n=9))
    assert out[GATES_OUTPUT].shape == (9, 3, 5)
    assert out[GATES_LEVELS_OUTPUT].shape == (9, 3, 3, 5)
    np.testing.assert_allclose(out[GATES_LEVELS_OUTPUT].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out[GATES_LEVELS_OUTPUT][:, -1], out[GATES_OUTPUT])


@pytest.mark.parametrize("calibration", ["none", "platt", "isotonic"])
def test_esmm_like_never_exceeds_click_in_the_onnx_graph(calibration: str) -> None:
    model = make(model_type="mmoe", chain=CHAIN)
    if calibration != "none":
        model = calibrate(model, tiny_encoded(600, 1), calibration)
    sess = session(model)
    for n in SIZES:
        for seed in range(5):
            x = golden_inputs(tiny_schema(), n=n, seed=100 * n + seed)
            out = run(sess, x)
            for child in CHAIN:
                assert (out[child] <= out["click"]).all(), (child, n, seed)


def test_gate_dropout_only_in_training() -> None:
    model = make(model_type="mmoe", gate_dropout=0.5)
    x = {k: torch.from_numpy(v) for k, v in golden_inputs(tiny_schema(), n=64).items()}
    model.train()
    g = model(x)[GATES_OUTPUT]
    torch.testing.assert_close(g.sum(-1), torch.ones(64, 3), atol=1e-5, rtol=0)
    assert (g == 0).any()
    model.eval()
    assert not (model(x)[GATES_OUTPUT] == 0).any()


@pytest.mark.parametrize("kind", ["platt", "isotonic"])
def test_calibration_is_in_the_graph_and_lowers_ece(kind: str) -> None:
    val, test = tiny_encoded(2000, 1), tiny_encoded(2000, 2)
    raw = make(model_type="mmoe")
    cal = calibrate(raw, val, kind)
    assert_parity(cal, session(cal))
    before = torch_outputs(raw, val.inputs)
    after = torch_outputs(cal, val.inputs)
    for j, t in enumerate(TASKS):
        assert ece(val.labels[:, j], after[t]) < ece(val.labels[:, j], before[t]), t
    # the checkpoint round trip: config + buffers rebuild the calibrated model
    again = MultiTaskModel(cal.config)
    again.load_state_dict(cal.state_dict())
    out = torch_outputs(again.eval(), test.inputs)
    for t in TASKS:
        np.testing.assert_array_equal(out[t], torch_outputs(cal, test.inputs)[t])


def test_pav_is_monotone_and_pools() -> None:
    x, y = pav(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.0, 1.0, 0.0, 1.0]))
    assert (np.diff(y) > 0).all()
    assert len(x) == 3


def test_pcgrad_removes_the_conflict() -> None:
    g1, g2 = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([-1.0, 1.0, 0.0])
    assert torch.dot(g1, g2) < 0
    p1, p2 = pcgrad_project([g1, g2], torch.Generator().manual_seed(0))
    assert torch.dot(p1, g2) >= -1e-6 and torch.dot(p2, g1) >= -1e-6
    # a non-conflicting pair is left alone
    q1, _ = pcgrad_project([g1, g1 * 2])
    torch.testing.assert_close(q1, g1)


@pytest.mark.parametrize("balance", ["equal", "uncertainty", "gradnorm", "pcgrad"])
def test_loss_balancers_train(balance: str) -> None:
    train, val = tiny_encoded(1024, 3), tiny_encoded(512, 4)
    cfg = ModelConfig(inputs=inputs_from_schema(tiny_schema()), tasks=TASKS, n_experts=3,
                      expert_hidden=[8, 6], tower_hidden=[4])
    _, hist = fit(cfg, train, val, TrainConfig(epochs=4, batch_size=128, lr=1e-2, patience=9,
                                              progress=False, loss_balance=balance))
    assert hist.train_loss[-1] < hist.train_loss[0], hist.train_loss
    if balance == "equal":
        assert hist.task_weights == []
    else:
        assert len(hist.task_weights) == 4
    if balance in ("uncertainty", "gradnorm"):
        first, last = hist.task_weights[0], hist.task_weights[-1]
        assert any(abs(first[t] - 1.0) > 1e-3 for t in TASKS), first
        assert first != last


def test_ple_export_writes_a_servable_version(tmp_path: Path) -> None:
    model = make(model_type="ple", chain=CHAIN)
    path = export_model(model, tiny_schema(), tmp_path, "ple", golden_inputs(tiny_schema(), n=3))
    m = load_manifest(path)
    assert m.model_type == "ple" and m.n_experts == 4 and m.has_gates
    assert {o.name for o in m.outputs} == {*TASKS, GATES_OUTPUT, GATES_LEVELS_OUTPUT}
    from service.registry import load_version

    loaded = load_version(path, warmup_sizes=(1, 7))
    scores, gates = loaded.run(loaded.synthetic_inputs(7))
    assert scores.shape == (7, 3) and gates is not None and gates.shape == (7, 3, 4)
    assert dataclasses.asdict(model.config) == m.config


def test_polarised_gate_flag() -> None:
    from training.report import gate_health

    g = np.zeros((10, 2, 3))
    g[:, 0] = [0.95, 0.03, 0.02]
    g[:, 1] = [0.4, 0.3, 0.3]
    h = gate_health(g, ["click", "like"])
    assert h["click"]["polarised"] and h["click"]["rows_polarised"] == 1.0
    assert not h["like"]["polarised"]
    assert 0 < h["like"]["entropy_norm"] <= 1


def test_position_tower_debiases_a_position_biased_log(tmp_path: Path) -> None:
    """Seeded single comparison (the multi-seed NDCG@10 page is in docs/experiments/): on a
    log where promoted items sit high and are clicked for it, the model with the position tower
    ranks items closer to their true relevance than the same model without it."""
    from training.data import build_schema, encode_split, load_raw
    from training.model import POSITION_INPUT
    from training.spec import load_spec
    from training.synthetic import SyntheticConfig, write_dataset
    from training.train import predict

    write_dataset(SyntheticConfig.small(position_bias=2.0, promotion=3.0), tmp_path)
    spec = load_spec("synthetic")
    raw = load_raw(spec, tmp_path)
    schema = build_schema(spec, raw)
    enc = {s: encode_split(spec, schema, raw, s) for s in ("train", "val", "test")}
    assert all(POSITION_INPUT in e.inputs for e in enc.values())  # encode_split reads it
    test = enc["test"]
    assert test.oracle is not None
    items = test.inputs["item_cat"][:, 0]

    def item_rank_corr(p: np.ndarray) -> float:
        ids = np.unique(items)
        mp = np.array([p[items == i].mean() for i in ids])
        mo = np.array([test.oracle[items == i, 0].mean() for i in ids])
        return float(np.corrcoef(np.argsort(np.argsort(mp)), np.argsort(np.argsort(mo)))[0, 1])

    corr = {}
    for buckets in (0, 10):
        cfg = ModelConfig(inputs=inputs_from_schema(schema), n_experts=4, expert_hidden=[16, 8],
                          tower_hidden=[8], position_buckets=buckets)
        model, _ = fit(cfg, enc["train"], enc["val"],
                       TrainConfig(epochs=8, batch_size=256, progress=False, seed=0))
        corr[buckets] = item_rank_corr(predict(model, test)["click"])  # eval: no position
    assert corr[10] > corr[0], corr


@pytest.mark.parametrize("model_type", ["ple", "cgc"])
def test_ple_user_broadcast_equals_tiled(model_type: str) -> None:
    model = make(model_type=model_type, chain=CHAIN, position_buckets=4)
    x = golden_inputs(tiny_schema(), n=9)
    tiled = {k: np.ascontiguousarray(np.repeat(v, 9 // len(v), axis=0)) for k, v in x.items()}
    a, b = torch_outputs(model, x), torch_outputs(model, tiled)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=0)
