"""The feature contract names and builds the model inputs, and one place declares the defaults."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ranker.examples import tiny_schema
from ranker.schema import input_name
from training.model import ModelConfig, MultiTaskModel, inputs_from_schema
from training.train import TrainConfig

DOCS = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def test_the_schema_lists_the_inputs_with_their_batch_axes() -> None:
    specs = tiny_schema().input_specs()
    assert [(s.name, s.dtype, s.width) for s in specs] == [
        ("user_cat", "int64", 2), ("user_dense", "float32", 1),
        ("item_cat", "int64", 2), ("item_dense", "float32", 2),
        ("context_cat", "int64", 2),  # the tiny context has no dense features: no input
    ]
    assert [s.batch_axis for s in specs] == ["user_batch", "user_batch", "batch", "batch",
                                             "context_batch"]
    assert all(s.name == input_name(s.entity, s.kind) for s in specs)


def test_the_model_takes_the_inputs_the_schema_lists() -> None:
    schema = tiny_schema()
    cfg = ModelConfig(inputs=inputs_from_schema(schema), n_experts=2, expert_hidden=[4])
    assert cfg.input_specs() == schema.input_specs()
    assert MultiTaskModel(cfg).input_names() == schema.input_names()


def test_default_inputs_put_the_candidates_on_the_item_rows() -> None:
    schema = tiny_schema()
    x = schema.default_inputs(6)
    assert list(x) == schema.input_names()
    assert {k: v.shape for k, v in x.items()} == {
        "user_cat": (1, 2), "user_dense": (1, 1), "item_cat": (6, 2), "item_dense": (6, 2),
        "context_cat": (1, 2)}
    assert all(v.dtype == (np.int64 if k.endswith("cat") else np.float32) for k, v in x.items())
    item_cat, item_dense = schema.groups[1].default_row()
    np.testing.assert_array_equal(x["item_cat"], np.tile(item_cat, (6, 1)))
    np.testing.assert_array_equal(x["item_dense"], np.tile(item_dense, (6, 1)))


def test_context_inputs_encode_the_raw_context_at_batch_one() -> None:
    schema = tiny_schema()
    ctx = schema.context_inputs({"hour": 7, "surface": "search"})
    assert list(ctx) == ["context_cat"] and ctx["context_cat"].dtype == np.int64
    assert ctx["context_cat"].tolist() == [[8, 2]]
    assert schema.context_inputs(None)["context_cat"].tolist() == [[0, 0]]


def test_tiled_inputs_repeat_the_user_and_context_rows() -> None:
    schema = tiny_schema()
    x = schema.default_inputs(4)
    tiled = schema.tiled_inputs(x)
    assert {v.shape[0] for v in tiled.values()} == {4}
    np.testing.assert_array_equal(tiled["user_cat"], np.repeat(x["user_cat"], 4, axis=0))
    assert tiled["item_cat"] is x["item_cat"]


def test_the_documented_defaults_are_the_dataclass_defaults() -> None:
    """docs/training.md states `ranker train`'s defaults; they are declared on the dataclasses."""
    line = re.search(r"# defaults: (.*)\n\s*# (.*)\n", DOCS.read_text())
    assert line is not None
    text = " ".join(line.groups())
    m, t = ModelConfig(inputs=[]), TrainConfig()

    def sci(x: float) -> str:
        return f"{x:.0e}".replace("e-0", "e-")  # 0.002 -> "2e-3", as the docs write it

    want = (f"{m.n_experts} experts [{','.join(map(str, m.expert_hidden))}], "
            f"towers [{','.join(map(str, m.tower_hidden))}], batch {t.batch_size}, "
            f"lr {sci(t.lr)}, wd {sci(t.weight_decay)}, patience {t.patience}, seed {t.seed}")
    assert text.strip() == want, text
