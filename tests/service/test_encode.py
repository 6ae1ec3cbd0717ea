"""The column-wise /rank item encoder against orjson on the per-item dicts it replaces."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from service.encode import float_texts, id_texts, ranked_items_json
from service.ranking import combine, rank_order

TASKS = ["click", "like", "share"]


def reference(ids, order, final, scores, tasks) -> bytes:
    """What the service returned before: one dict per item, serialised by orjson."""
    return orjson.dumps([
        {"id": ids[p], "score": float(final[p]),
         "scores": dict(zip(tasks, scores[p].tolist(), strict=True))}
        for p in order.tolist()])


def case(ids, seed=0, tasks=TASKS, top_k=None):
    rng = np.random.default_rng(seed)
    scores = rng.random((len(ids), len(tasks))).astype(np.float32)
    final = combine(scores, rng.random(len(tasks)) * 3)
    return ids, rank_order(final, top_k), final, scores, tasks


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 2, 17, 500])
def test_byte_identical_to_orjson_of_dicts(n, seed):
    args = case([f"item{i}" for i in range(n)], seed)
    assert ranked_items_json(*args) == reference(*args)


@pytest.mark.parametrize("ids", [
    ['a"b', "plain", 'x","y'],                 # quotes, and the separator the fast path splits on
    ["back\\slash", "tab\there", "nl\nx"],      # backslash and control characters
    ["\x00", "\x1f", "ok"],
    ["ünïcødé", "日本語", "emoji😀", "plain"],  # non-ASCII needs no escaping, only UTF-8
    ["</script>", "'single'", " "],
])
def test_ids_that_need_escaping_or_utf8(ids):
    args = case(ids, 3)
    got = ranked_items_json(*args)
    assert got == reference(*args)
    assert [item["id"] for item in json.loads(got)] == [ids[p] for p in args[1].tolist()]


def test_top_k_subset_and_other_task_names():
    tasks = ["watch_time", 'we"ird', "c"]
    args = case([f"i{i}" for i in range(50)], 7, tasks=tasks, top_k=5)
    assert ranked_items_json(*args) == reference(*args)
    assert len(json.loads(ranked_items_json(*args))) == 5


def test_single_task_and_empty():
    args = case(["a", "b", "c"], 1, tasks=["ctr"])
    assert ranked_items_json(*args) == reference(*args)
    assert ranked_items_json([], np.arange(0), np.zeros(0), np.zeros((0, 1)), ["ctr"]) == b"[]"


def test_float_texts_match_python_floats():
    values = np.array([0.1, 1 / 3, 1e-9, 0.0, 1.0, 123456.789, 5e-324], dtype=np.float64)
    assert [float(t) for t in float_texts(values)] == values.tolist()
    assert float_texts(np.float32([0.3])) == [orjson.dumps(float(np.float32(0.3)))]


def test_id_texts_round_trip():
    ids = ["a", 'q"uote', "ß"]
    assert [json.loads(b'"' + t + b'"') for t in id_texts(ids)] == ids
