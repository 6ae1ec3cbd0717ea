"""The pure ranking rules, without a server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.ranking import (
    InvalidWeights,
    combine,
    rank_order,
    resolve_weights,
    sample_positions,
)
from service.settings import Settings

TASKS = ["click", "like", "share"]
DEFAULTS = {"click": 1.0, "like": 2.0, "share": 3.0}
PRESETS = {"engagement": {"click": 1.0, "like": 4.0, "share": 8.0}, "clicky": {"click": 5.0}}


def resolve(requested=None, preset=None):
    return resolve_weights(
        TASKS, requested, preset, defaults=DEFAULTS, presets=PRESETS, bounds=(0.0, 100.0)
    )


def test_missing_tasks_take_defaults():
    assert resolve({"like": 7.0}) == {"click": 1.0, "like": 7.0, "share": 3.0}
    assert resolve() == DEFAULTS


def test_task_without_configured_default_takes_one():
    w = resolve_weights(["click", "dwell"], None, None, defaults={"click": 2.0}, presets={},
                        bounds=(0, 10))
    assert w == {"click": 2.0, "dwell": 1.0}


def test_preset_then_explicit_weights_override():
    assert resolve(preset="engagement") == {"click": 1.0, "like": 4.0, "share": 8.0}
    assert resolve(preset="clicky") == {"click": 5.0, "like": 2.0, "share": 3.0}
    assert resolve({"share": 0.5}, preset="engagement")["share"] == 0.5


@pytest.mark.parametrize(
    ("requested", "preset", "field", "needle"),
    [
        ({"dwell": 1.0}, None, "weights.dwell", "unknown task"),
        ({"click": -1.0}, None, "weights.click", "between 0 and 100"),
        ({"click": 100.5}, None, "weights.click", "between 0 and 100"),
        ({"click": math.nan}, None, "weights.click", "finite"),
        ({"click": math.inf}, None, "weights.click", "finite"),
        (None, "nope", "preset", "unknown preset"),
    ],
)
def test_invalid_weights_name_field_and_limit(requested, preset, field, needle):
    with pytest.raises(InvalidWeights) as e:
        resolve(requested, preset)
    assert e.value.field == field
    assert needle in e.value.message


def test_weighted_sum_and_product():
    s = np.array([[0.5, 0.2, 0.1], [0.1, 0.9, 0.3]])
    w = np.array([1.0, 2.0, 0.0])
    np.testing.assert_allclose(combine(s, w), [0.9, 1.9])
    np.testing.assert_allclose(combine(s, w, "weighted_product"), [0.5 * 0.04, 0.1 * 0.81])
    with pytest.raises(ValueError):
        combine(s, w, "median")


def test_product_with_zero_weights_ranks_by_the_remaining_task():
    rng = np.random.default_rng(1)
    s = rng.uniform(size=(50, 3))
    order = rank_order(combine(s, np.array([0.0, 0.0, 2.0]), "weighted_product"))
    assert list(order) == list(rank_order(s[:, 2]))


def test_zero_weights_for_two_tasks_rank_by_the_third():
    rng = np.random.default_rng(0)
    s = rng.uniform(size=(100, 3))
    order = rank_order(combine(s, np.array([0.0, 3.0, 0.0])))
    assert list(order) == list(np.argsort(-s[:, 1], kind="stable"))


def test_ties_break_by_input_position():
    final = np.array([0.5, 0.7, 0.5, 0.7, 0.1, 0.5])
    assert list(rank_order(final)) == [1, 3, 0, 2, 5, 4]
    assert list(rank_order(final, top_k=3)) == [1, 3, 0]


def test_sample_positions_bounded_and_deterministic():
    assert list(sample_positions(5, 32)) == [0, 1, 2, 3, 4]
    p = sample_positions(1000, 32)
    assert len(p) == 32 and p[0] == 0 and p[-1] == 999
    assert list(p) == list(sample_positions(1000, 32))
    assert len(set(p.tolist())) == 32


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("RANKER_MAX_CANDIDATES", "10")
    monkeypatch.setenv("RANKER_PRESETS", '{"x": {"click": 2}}')
    monkeypatch.setenv("RANKER_REDIS_FAILURE_MODE", "degrade")
    s = Settings()
    assert s.max_candidates == 10
    assert s.presets == {"x": {"click": 2.0}}
    assert s.redis_failure_mode == "degrade"
    monkeypatch.setenv("RANKER_WEIGHT_MIN", "5")
    monkeypatch.setenv("RANKER_WEIGHT_MAX", "1")
    with pytest.raises(ValueError):
        Settings()
