"""Fixtures for the trainer tests: one tiny synthetic dataset and its encoded splits per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ranker.schema import FeatureSchema
from training.data import Encoded, RawData, build_schema, encode_split, load_raw
from training.spec import DatasetSpec, load_spec

# one thread: the suite runs beside other jobs on 2 cores (see training/pipeline.py)
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _untracked() -> object:
    """`ranker train` tracks in MLflow when it is installed: not from these tests, unless one
    asks (`--track`, tests/training/test_tracking.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANKER_TRACK", "0")
        yield


@pytest.fixture(scope="session")
def synthetic_spec() -> DatasetSpec:
    return load_spec("synthetic")


@pytest.fixture(scope="session")
def small_raw(synthetic_spec: DatasetSpec, small_data: Path) -> RawData:
    return load_raw(synthetic_spec, small_data)


@pytest.fixture(scope="session")
def small_schema(synthetic_spec: DatasetSpec, small_raw: RawData) -> FeatureSchema:
    return build_schema(synthetic_spec, small_raw)


@pytest.fixture(scope="session")
def small_encoded(
    synthetic_spec: DatasetSpec, small_raw: RawData, small_schema: FeatureSchema
) -> dict[str, Encoded]:
    schema = small_schema
    return {s: encode_split(synthetic_spec, schema, small_raw, s) for s in ("train", "val", "test")}
