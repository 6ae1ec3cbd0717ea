"""Hashed categoricals: a stable encoding in the contract, described by the manifest, served."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ranker.manifest import load_manifest
from ranker.schema import (
    HASH_FUNCTION,
    CategoricalFeature,
    FeatureSchema,
    GroupSchema,
    HashedVocabulary,
    stable_hash,
)
from service.featurestore.writer import encode_table
from service.registry import load_version
from training.data import build_schema, encode_split, load_raw
from training.pipeline import export_run, run_training
from training.spec import DATASETS_DIR, DatasetSpec, SpecError, parse_spec
from training.train import TrainConfig

TINY = {"n_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}


def hashed_spec(buckets: dict[str, int]) -> DatasetSpec:
    data = tomllib.loads((DATASETS_DIR / "synthetic.toml").read_text())
    for f in data["features"]:
        if f["name"] in buckets:
            f.pop("min_count", None)
            f["hash_buckets"] = buckets[f["name"]]
    return parse_spec(data)


def test_stable_hash_is_pinned() -> None:
    # literal values: every stage, process and release must agree on them (Python's `hash` of
    # a str changes with every process)
    assert stable_hash("u1") == 15378189911849802130
    assert stable_hash("") == 13020603013274838756
    v = HashedVocabulary(1000)
    assert [v.encode_one(k) for k in ("u1", "i42", "日本")] == [131, 519, 161]
    assert HASH_FUNCTION == "blake2b-64"


def test_vectorised_encode_equals_one_by_one() -> None:
    v = HashedVocabulary(37)
    values = [f"id{i}" for i in range(500)] + [None, "id3", ""]
    got = v.encode(values)
    assert got.dtype == np.int32
    assert got.tolist() == [v.encode_one(x) for x in values]
    assert got[500] == 0  # missing -> the OOV row
    assert set(got[:500].tolist()) <= set(range(1, 38))  # never 0 for a present value
    chunked = pa.chunked_array([values[:200], values[200:]])
    assert v.encode(chunked).tolist() == got.tolist()
    # ids read back as floats hash like their integer spelling, as a Vocabulary looks them up
    assert v.encode(np.array([7.0, np.nan])).tolist() == [v.encode_one("7"), 0]
    assert v.encode_one(7.0) == v.encode_one("7") == v.encode_one(7)
    assert v.encode([]).tolist() == []


def test_description_round_trip_and_version() -> None:
    g = GroupSchema("item", "item_id",
                    (CategoricalFeature("item_id", HashedVocabulary(64), 4),), ())
    schema = FeatureSchema((g,))
    d = schema.describe()
    fd = d["groups"][0]["categorical"][0]
    assert fd["hash_buckets"] == 64 and fd["hash"] == HASH_FUNCTION and fd["vocab_size"] == 65
    assert schema.vocabularies() == {"item.item_id": []}
    back = FeatureSchema.from_description(d, schema.vocabularies())
    assert back.version == schema.version
    assert isinstance(back.groups[0].categorical[0].vocab, HashedVocabulary)
    other = FeatureSchema((GroupSchema("item", "item_id", (
        CategoricalFeature("item_id", HashedVocabulary(65), 4),), ()),))
    assert other.version != schema.version  # the bucket count is part of the encoding
    bad = copy.deepcopy(d)
    bad["groups"][0]["categorical"][0]["hash"] = "python-hash"
    with pytest.raises(ValueError, match="unknown hash"):
        FeatureSchema.from_description(bad, schema.vocabularies())


def test_spec_validates_hash_buckets() -> None:
    data = tomllib.loads((DATASETS_DIR / "synthetic.toml").read_text())
    for bad, match in ((0, "hash_buckets"), ("8", "hash_buckets")):
        d = copy.deepcopy(data)
        d["features"][1]["hash_buckets"] = bad
        with pytest.raises(SpecError, match=match):
            parse_spec(d)
    d = copy.deepcopy(data)
    d["features"][0]["hash_buckets"] = 16  # user_id, which also has min_count = 2
    with pytest.raises(SpecError, match="do not apply to a hashed"):
        parse_spec(d)
    d = copy.deepcopy(data)
    dense = next(f for f in d["features"] if f["type"] == "dense")
    dense["hash_buckets"] = 16
    with pytest.raises(SpecError, match="categorical"):
        parse_spec(d)


def test_hashed_ids_train_export_and_serve(small_data: Path, tmp_path: Path) -> None:
    """A spec hashing user_id and item_id: the trainer, the feature loader and the service's
    model loader all encode through the manifest's description, identically."""
    spec = hashed_spec({"user_id": 128, "item_id": 64})
    raw = load_raw(spec, small_data)
    schema = build_schema(spec, raw)
    item_id = schema.group("item").categorical[0]  # type: ignore[union-attr]
    assert isinstance(item_id.vocab, HashedVocabulary) and item_id.vocab_size == 65
    enc = encode_split(spec, schema, raw, "test")
    assert enc.inputs["item_cat"][:, 0].max() <= 64 and enc.inputs["item_cat"][:, 0].min() >= 1

    run = tmp_path / "run"
    run_training(spec, run, TINY, TrainConfig(epochs=1, progress=False), raw=raw,
                 baselines=False)
    vdir = export_run(run, tmp_path / "models", "hashed")
    manifest = load_manifest(vdir)
    fd = manifest.features["groups"][1]["categorical"][0]
    assert fd["name"] == "item_id" and fd["hash_buckets"] == 64
    served = load_version(vdir, warmup_sizes=(1,))  # golden check included
    assert served.schema.version == schema.version
    # the feature loader writes the same codes the trainer trained on
    items = pq.read_table(small_data / "items.parquet")
    written = encode_table(served.schema.group("item"), items, 0.0)  # type: ignore[arg-type]
    trained, _ = schema.group("item").encode_columns(  # type: ignore[union-attr]
        {n: items[n] for n in items.column_names}, items.num_rows)
    np.testing.assert_array_equal(written.records["cat"], trained)
    scores, _ = served.run(served.synthetic_inputs(3))
    assert scores.shape == (3, 3)
