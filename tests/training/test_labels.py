"""Labels from a rule declared in the spec: a set of positive raw values, or a threshold."""

from __future__ import annotations

import copy
import tomllib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from training.data import labels_of, load_raw
from training.spec import DATASETS_DIR, DatasetSpec, SpecError, load_spec, parse_spec

BASE = tomllib.loads((DATASETS_DIR / "census_income.toml").read_text())
CENSUS = load_spec("census_income")


def spec_with(tasks: list[object]) -> DatasetSpec:
    d = copy.deepcopy(BASE)
    d["tasks"] = tasks
    d["features"] = [{"name": "age", "entity": "context", "type": "dense"}]  # no label leaks
    return parse_spec(d)


def test_positive_values_threshold_and_plain_column() -> None:
    spec = spec_with([
        {"name": "edu", "column": "education", "positive": ["Masters", "Doctorate"]},
        {"name": "high_wage", "column": "wage_per_hour", "above": 1000},
        {"name": "full_year", "column": "weeks_worked", "at_least": 52},
        {"name": "year95", "column": "year", "positive": 95},  # a bare number is its spelling
        "flag",
    ])
    log = pa.table({
        "education": ["Masters", "Bachelors", None, "Doctorate"],
        "wage_per_hour": ["0", "1000", "1200", None],
        "weeks_worked": ["52", "51", "0", "52"],
        "year": ["95", "94", "95", None],
        "flag": [1, 0, 0, 1],
    })
    got = labels_of(spec, log)
    assert got.dtype == np.float32
    assert got.T.tolist() == [
        [1, 0, 0, 1],  # any of the values; missing -> 0
        [0, 0, 1, 0],  # > 1000 strictly; missing -> 0
        [1, 0, 0, 1],  # >= 52
        [1, 0, 1, 0],
        [1, 0, 0, 1],  # no rule: the 0/1 column
    ]
    rules = [t.rule for t in spec.tasks]
    assert rules == ["education in ['Masters', 'Doctorate']", "wage_per_hour > 1000",
                     "weeks_worked >= 52", "year in ['95']", "flag (0/1)"]


def test_a_threshold_on_text_names_the_task() -> None:
    spec = spec_with([{"name": "x", "column": "education", "at_least": 3}])
    with pytest.raises(SpecError, match="task x: education is not numeric"):
        labels_of(spec, pa.table({"education": ["Masters"]}))


@pytest.mark.parametrize(("task", "match"), [
    ({"name": "x", "positive": "a", "above": 1}, "one rule"),
    ({"name": "x", "positive": []}, "non-empty"),
    ({"name": "x", "above": "high"}, "a number"),
    ({"name": "x", "at_least": True}, "a number"),
    ({"name": "x", "equals": "a"}, "unknown fields"),
])
def test_bad_rules_name_the_field(task: dict[str, object], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        spec_with([task])


@pytest.mark.skipif(not CENSUS.csv_path().is_file(),
                    reason=f"census data not found at {CENSUS.csv_path()} "
                           "(set CENSUS_INCOME_PATH to override)")
def test_census_labels_are_those_of_the_old_equality_rule() -> None:
    """census-income's tasks in the new form (`positive = [value]`) label every row exactly as
    the former `column == positive` did."""
    raw = load_raw(CENSUS)
    for split, log in raw.splits.items():
        got = labels_of(CENSUS, log)
        for j, (column, value) in enumerate([("income_50k", "50000+."),
                                             ("marital_stat", "Never married")]):
            old = np.asarray(pc.fill_null(pc.equal(log[column], value), False), np.float32)
            np.testing.assert_array_equal(got[:, j], old, err_msg=f"{split} {column}")
            assert 0 < old.sum() < len(old)
