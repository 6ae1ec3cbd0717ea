"""Dataset specs: both shipped specs parse; malformed specs fail naming the field."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from training.spec import DATASETS_DIR, SpecError, load_spec, parse_spec


def test_synthetic_spec() -> None:
    spec = load_spec("synthetic")
    assert spec.task_names == ["click", "like", "share"]
    assert spec.model_name == "mmoe"
    assert spec.source.kind == "tables"
    assert spec.source.user_key == "user_id" and spec.source.item_key == "item_id"
    assert {f.entity for f in spec.features} == {"user", "item", "context"}
    assert spec.source.oracle == {"click": "p_click", "like": "p_like", "share": "p_share"}
    ids = {f.name: f for f in spec.features}
    assert ids["user_id"].type == "categorical" and ids["activity_30d"].log1p


def test_census_spec() -> None:
    spec = load_spec(DATASETS_DIR / "census_income.toml")
    assert spec.model_name == "census-mmoe"
    assert [(t.name, t.column, t.positive) for t in spec.tasks] == [
        ("income", "income_50k", ("50000+.",)),
        ("marital", "marital_stat", ("Never married",)),
    ]
    assert spec.source.separator == ", " and spec.source.na == "?"
    assert len(spec.source.columns) == 42
    names = {f.name for f in spec.features}
    # labels, task group 2's label and the sampling weight are not inputs
    assert not names & {"income_50k", "marital_stat", "education", "instance_weight"}
    assert all(f.entity == "context" for f in spec.features)
    assert (spec.source.split.train, spec.source.split.val, spec.source.split.test) == (
        0.6, 0.2, 0.2,
    )


def test_census_path_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec("census_income")
    monkeypatch.setenv("CENSUS_INCOME_PATH", "/elsewhere/census.gz")
    assert str(spec.csv_path()) == "/elsewhere/census.gz"
    monkeypatch.delenv("CENSUS_INCOME_PATH")
    assert spec.csv_path().name == "census-income.test.gz"


def _synthetic_doc() -> dict[str, Any]:
    with open(DATASETS_DIR / "synthetic.toml", "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["features"][0].update(entity="session"), "features[0].entity"),
        (lambda d: d["features"][1].update(type="text"), "features[1].type"),
        (lambda d: d["features"][0].update(colour="red"), "unknown fields"),
        (lambda d: d["features"][0].pop("name"), "features[0]: missing field 'name'"),
        (lambda d: d["source"].pop("users"), "needs source.users"),
        (lambda d: d["source"]["splits"].pop("val"), "source.splits"),
        (lambda d: d.update(tasks=[]), "spec.tasks"),
        (
            lambda d: d["features"].append({"name": "click", "entity": "context",
                                            "type": "categorical"}),
            "label columns used as features",
        ),
    ],
)
def test_bad_specs_name_the_field(mutate: Any, message: str) -> None:
    doc = _synthetic_doc()
    mutate(doc)
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(doc)
