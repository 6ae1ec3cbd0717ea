"""Census-Income through the same spec path (skipped when the data file is not on this machine)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from training.data import RawData, build_schema, encode_split, load_raw
from training.model import ModelConfig, inputs_from_schema
from training.spec import load_spec
from training.train import TrainConfig, evaluate, fit

SPEC = load_spec("census_income")
pytestmark = pytest.mark.skipif(
    not SPEC.csv_path().is_file(),
    reason=f"census data not found at {SPEC.csv_path()} (set CENSUS_INCOME_PATH to override)",
)


@pytest.fixture(scope="module")
def raw() -> RawData:
    return load_raw(SPEC)


def test_seeded_60_20_20_split(raw: RawData) -> None:
    counts = raw.row_counts()
    assert sum(counts.values()) == 99_762  # every row of the file, in exactly one split
    assert counts["train"] == round(0.6 * 99_762) and counts["val"] == round(0.2 * 99_762)
    again = load_raw(SPEC)
    assert again.splits["test"].equals(raw.splits["test"])


def test_labels_and_schema(raw: RawData) -> None:
    schema = build_schema(SPEC, raw)
    assert [g.entity for g in schema.groups] == ["context"]
    enc = encode_split(SPEC, schema, raw, "test")
    income, marital = enc.labels.mean(axis=0)
    assert 0.05 < income < 0.08 and 0.40 < marital < 0.46  # README: 6.2 % and 43.2 %
    assert enc.inputs["context_cat"].shape[1] == sum(
        1 for f in SPEC.features if f.type == "categorical"
    )
    assert np.isfinite(enc.inputs["context_dense"]).all()


def test_a_short_training_learns_both_tasks(raw: RawData) -> None:
    spec = SPEC
    small = dataclasses.replace(raw, splits={**raw.splits, "train": raw.splits["train"][:8000]})
    schema = build_schema(spec, small)  # fitted on the 8000 train rows only
    train, val, test = (encode_split(spec, schema, small, s) for s in ("train", "val", "test"))
    cfg = ModelConfig(inputs=inputs_from_schema(schema), tasks=spec.task_names, n_experts=4,
                      expert_hidden=[16], tower_hidden=[8])
    model, _ = fit(cfg, train, val.take(np.arange(4000)),
                   TrainConfig(epochs=3, batch_size=256, progress=False))
    ev = evaluate(model, test)
    assert ev["income"]["auc"] > 0.85 and ev["marital"]["auc"] > 0.95, ev
