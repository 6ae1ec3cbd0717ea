"""Schema fitting on the train split only, the log/table join, and label derivation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ranker.schema import OOV_INDEX
from training.data import (
    RawData,
    build_schema,
    encode_split,
    joined_columns,
    labels_of,
)
from training.spec import DatasetSpec, load_spec


def test_vocabularies_come_from_the_train_split_only(
    synthetic_spec: DatasetSpec, small_raw: RawData
) -> None:
    # hide one user from train: it must not be in the vocabulary, and encodes to OOV in test
    test_users = small_raw.splits["test"]["user_id"]
    hidden = test_users[0].as_py()
    train = small_raw.splits["train"]
    train = train.filter(pc.not_equal(train["user_id"], hidden))
    raw = RawData({**small_raw.splits, "train": train}, small_raw.users, small_raw.items, "x")
    schema = build_schema(synthetic_spec, raw)
    user = schema.group("user")
    assert user is not None
    uid = user.categorical[0]
    assert uid.name == "user_id" and hidden not in uid.vocab.values
    enc = encode_split(synthetic_spec, schema, raw, "test")
    rows = np.asarray(pc.equal(test_users, hidden))
    assert (enc.inputs["user_cat"][rows, 0] == OOV_INDEX).all()
    # its other features still come from the user table (the join is not broken by OOV ids)
    assert (enc.inputs["user_cat"][rows, 1] != OOV_INDEX).all()


def test_min_count_sends_rare_ids_to_oov(synthetic_spec: DatasetSpec, small_raw: RawData) -> None:
    schema = build_schema(synthetic_spec, small_raw)
    counts = pc.value_counts(small_raw.splits["train"]["item_id"])
    once = [v.as_py() for v, c in zip(counts.field("values"), counts.field("counts"), strict=True)
            if c.as_py() < 2]
    item = schema.group("item")
    assert item is not None
    vocab = item.categorical[0].vocab
    assert not set(once) & set(vocab.values)
    assert all(vocab.encode_one(v) == OOV_INDEX for v in once)


def test_dense_stats_are_train_stats_after_log1p(
    synthetic_spec: DatasetSpec, small_raw: RawData
) -> None:
    schema = build_schema(synthetic_spec, small_raw)
    cols = joined_columns(synthetic_spec, small_raw, small_raw.splits["train"], "user")
    x = np.log1p(np.asarray(cols["activity_30d"].to_numpy(), dtype=np.float64))
    user = schema.group("user")
    assert user is not None
    act = next(f for f in user.dense if f.name == "activity_30d")
    assert act.log1p
    assert act.mean == pytest.approx(x.mean()) and act.std == pytest.approx(x.std())
    assert act.encoded_default == pytest.approx(0.0, abs=1e-6)  # default = the train mean
    enc = encode_split(synthetic_spec, schema, small_raw, "train")
    j = [f.name for f in user.dense].index("activity_30d")
    assert enc.inputs["user_dense"][:, j].mean() == pytest.approx(0.0, abs=1e-4)
    assert enc.inputs["user_dense"][:, j].std() == pytest.approx(1.0, abs=1e-3)


def test_unknown_user_gets_the_default_row(
    synthetic_spec: DatasetSpec, small_raw: RawData
) -> None:
    schema = build_schema(synthetic_spec, small_raw)
    test = small_raw.splits["test"]
    ids = test["user_id"].to_pylist()
    ids[0] = "u-never-seen"
    log = test.set_column(test.column_names.index("user_id"), "user_id", pa.array(ids))
    raw = RawData({**small_raw.splits, "test": log}, small_raw.users, small_raw.items, "x")
    enc = encode_split(synthetic_spec, schema, raw, "test")
    user = schema.group("user")
    assert user is not None
    cat, dense = user.default_row()
    assert enc.inputs["user_cat"][0].tolist() == cat.tolist()
    np.testing.assert_allclose(enc.inputs["user_dense"][0], dense, atol=1e-6)


def test_encoded_shapes_and_oracle(small_encoded: dict, synthetic_spec: DatasetSpec) -> None:
    test = small_encoded["test"]
    n = len(test)
    assert test.labels.shape == (n, 3) and test.oracle is not None and test.oracle.shape == (n, 3)
    assert test.inputs["user_cat"].dtype == np.int64 and test.inputs["user_cat"].shape == (n, 4)
    assert test.inputs["item_dense"].dtype == np.float32 and test.inputs["item_dense"].shape[0] == n
    assert set(np.unique(test.labels)) <= {0.0, 1.0}


def test_labels_from_positive_value() -> None:
    spec = load_spec("census_income")
    log = pa.table({"income_50k": ["- 50000.", "50000+.", None],
                    "marital_stat": ["Never married", "Divorced", "Never married"]})
    assert labels_of(spec, log).tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
