"""The re-rank rules as pure functions: what users rely on, several properties by hypothesis."""

from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import rerank as rr
from service.ranking import rank_order
from tests.tiny import tiny_schema

ATTRS = rr.attributes(tiny_schema())
BOUNDS = rr.Bounds(max_pinned_share=0.5)
CATEGORY = ATTRS["category"].column  # column of item_cat; codes 1..8 are c0..c7, 0 is unknown


def cands(n: int) -> list[str]:
    return [f"i{i}" for i in range(n)]


def inputs_for(codes: list[int], age: list[float] | None = None) -> dict[str, np.ndarray]:
    n = len(codes)
    cat = np.zeros((n, 2), dtype=np.int64)
    cat[:, CATEGORY] = codes
    dense = np.zeros((n, 2), dtype=np.float32)
    if age is not None:
        a = ATTRS["age_days"]
        dense[:, a.column] = (np.asarray(age) - a.mean) / a.std
    return {"item_cat": cat, "item_dense": dense}


def rules_of(spec: dict[str, Any], n: int, top_k: int | None = None,
             bounds: rr.Bounds = BOUNDS) -> rr.Rules | None:
    return rr.resolve(spec, {}, None, ATTRS, cands(n), top_k, bounds)


def filtered_apply(rules: rr.Rules, final: np.ndarray, candidates: list[str],
                   inputs: dict[str, np.ndarray], seen: list[bytes] | None,
                   top_k: int | None, explain: bool = False) -> tuple[rr.Outcome, np.ndarray]:
    """What the pipeline does: the filters drop candidates before scoring, `apply` re-ranks
    the kept ones; the outcome and its served order as positions of `candidates`."""
    f = rr.filter_candidates(rules, candidates, seen)
    keep = np.arange(len(candidates)) if f.keep is None else f.keep
    out = rr.apply(rules, final[keep], [candidates[i] for i in keep], ATTRS,
                   {k: v[keep] for k, v in inputs.items()}, top_k, filtered=f, explain=explain)
    return out, keep[out.order]


def diversity(k: int, w: int, depth: int | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"attribute": "category", "max_per_window": k, "window": w}
    if depth is not None:
        d["depth"] = depth
    return {"diversity": d}


@cache
def feasible(counts: tuple[int, ...], free: int, k: int, w: int, slots: int,
             recent: tuple[int, ...] = ()) -> bool:
    """Brute force: can `slots` positions be filled from these value counts (plus `free`
    unconstrained items) with at most k of a value in any w consecutive positions?"""
    if slots == 0:
        return True
    if free and feasible(counts, free - 1, k, w, slots - 1, ((*recent, -1))[-(w - 1):]):
        return True
    for v, c in enumerate(counts):
        if c and recent.count(v) < k:
            rest = (*counts[:v], c - 1, *counts[v + 1:])
            if feasible(rest, free, k, w, slots - 1, ((*recent, v))[-(w - 1):]):
                return True
    return False


instances = st.integers(2, 9).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 3), min_size=n, max_size=n),  # category codes (0 = unknown)
    st.lists(st.integers(0, 4), min_size=n, max_size=n),  # scores with many ties
    st.integers(1, 2),  # k
    st.integers(2, 4),  # w
    st.integers(1, n),  # top_k
))


class Case(NamedTuple):
    """A generated instance whose "k in any w" rule fits in its top_k, with that rule."""

    codes: list[int]
    scores: np.ndarray
    k: int
    w: int
    top_k: int
    rules: rr.Rules


def _case(inst: tuple[list[int], list[int], int, int, int]) -> Case:
    codes, scores, k, w, top_k = inst
    rules = rules_of(diversity(k, w), len(codes), top_k)
    assert rules is not None
    return Case(codes, np.asarray(scores, float), k, w, top_k, rules)


# the window no longer than the list, and k below w
diversity_cases = instances.filter(lambda i: i[3] <= i[4] and i[2] < i[3]).map(_case)


# ---- no rules ----------------------------------------------------------------------------


@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=60),
       st.one_of(st.none(), st.integers(1, 60)))
def test_no_rules_is_exactly_todays_order(scores: list[float], top_k: int | None) -> None:
    n = len(scores)
    assert rules_of({}, n, top_k) is None
    final = np.asarray(scores)
    out = rr.apply(rr.Rules(), final, cands(n), ATTRS, inputs_for([1] * n), top_k)
    np.testing.assert_array_equal(out.order, rank_order(final, top_k))
    assert out.applied == [] and out.relaxed == []


def test_a_section_set_to_null_turns_the_preset_off() -> None:
    presets = {"feed": {**diversity(1, 3), "filters": {"exclude": ["i1"]}}}
    r = rr.resolve({"preset": "feed", "diversity": None}, presets, None, ATTRS, cands(9),
                   None, BOUNDS)
    assert r is not None and r.diversity is None and r.exclude == ("i1",)
    assert rr.resolve({"preset": "feed", "diversity": None, "filters": None}, presets, None,
                      ATTRS, cands(9), None, BOUNDS) is None
    # the file's default preset applies unless the request names none explicitly
    assert rr.resolve(None, presets, "feed", ATTRS, cands(9), None, BOUNDS) is not None
    assert rr.resolve({"preset": None}, presets, "feed", ATTRS, cands(9), None, BOUNDS) is None


# ---- diversity ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(diversity_cases)
def test_diversity_holds_whenever_the_candidates_allow_it(case: Case) -> None:
    codes, k, w, top_k = case.codes, case.k, case.w, case.top_k
    out = rr.apply(case.rules, case.scores, cands(len(codes)), ATTRS, inputs_for(codes),
                   top_k)
    served = [codes[i] for i in out.order.tolist()]
    assert len(set(out.order.tolist())) == len(served) == top_k
    counts = tuple(codes.count(v) for v in (1, 2, 3))
    possible = feasible(counts, codes.count(0), k, w, top_k)
    if possible:
        assert rr.violations(served, k, w) == [], (served, out.relaxed)
        assert out.relaxed == []
    else:  # it relaxes, and says where
        assert out.relaxed and out.relaxed[0]["rule"] == "diversity"
        assert "diversity_relaxed" in out.applied
        assert rr.violations(served, k, w)


@settings(max_examples=200, deadline=None)
@given(diversity_cases)
def test_diversity_keeps_the_score_order_within_a_value_and_is_deterministic(case: Case) -> None:
    codes, final, n = case.codes, case.scores, len(case.codes)
    a = rr.apply(case.rules, final, cands(n), ATTRS, inputs_for(codes), case.top_k)
    b = rr.apply(case.rules, final.copy(), cands(n), ATTRS, inputs_for(codes), case.top_k)
    np.testing.assert_array_equal(a.order, b.order)
    today = rank_order(final).tolist()
    for v in set(codes) - {0}:
        mine = [i for i in a.order.tolist() if codes[i] == v]
        assert mine == [i for i in today if codes[i] == v][:len(mine)]


def test_diversity_on_a_long_list_uses_the_items_below_the_cut() -> None:
    # scores descending, categories c0 c0 c0 c1 c1 c1 c2 c2 c2 ...: the top 6 of a
    # "1 in any 3" list must come from three categories
    codes = [1, 1, 1, 2, 2, 2, 3, 3, 3]
    final = np.linspace(1, 0, 9)
    rules = rules_of(diversity(1, 3), 9, top_k=6)
    assert rules is not None
    out = rr.apply(rules, final, cands(9), ATTRS, inputs_for(codes), 6)
    assert [codes[i] for i in out.order] == [1, 2, 3, 1, 2, 3]
    assert out.order.tolist() == [0, 3, 6, 1, 4, 7]
    assert out.applied == ["diversity"]


def test_diversity_searches_when_best_first_gets_stuck() -> None:
    # best first takes B, A, then only A is left: A B A is the arrangement that fits
    codes, final = [2, 1, 1], np.array([3.0, 2.0, 1.0])
    rules = rules_of(diversity(1, 2), 3)
    assert rules is not None
    out = rr.apply(rules, final, cands(3), ATTRS, inputs_for(codes), None)
    assert out.order.tolist() == [1, 0, 2] and out.relaxed == []


def test_diversity_search_late_in_a_long_list_keeps_the_prefix() -> None:
    # 37 items cycling over 5 values, then c6 and two c7 at the bottom: best first ends
    # "c6 c7 [stuck]"; only "c7 c6 c7" fits "1 in any 2", found by re-arranging the tail
    codes = [1 + i % 5 for i in range(37)] + [6, 7, 7]
    final = np.linspace(1, 0, 40)
    rules = rules_of(diversity(1, 2), 40)
    assert rules is not None
    out = rr.apply(rules, final, cands(40), ATTRS, inputs_for(codes), None)
    served = out.order.tolist()
    assert out.relaxed == [] and rr.violations([codes[i] for i in served], 1, 2) == []
    assert served[:37] == list(range(37)) and served[37:] == [38, 37, 39]


def test_diversity_relaxes_where_nothing_fits_and_says_where() -> None:
    codes = [1, 1, 1, 2]  # three of c0 cannot be spread over 4 positions with 1 in any 2
    rules = rules_of(diversity(1, 2), 4)
    assert rules is not None
    out = rr.apply(rules, np.array([4.0, 3, 2, 1]), cands(4), ATTRS, inputs_for(codes),
                   None)
    assert out.order.tolist() == [0, 3, 1, 2]
    assert out.relaxed == [{"rule": "diversity", "positions": [3]}]


def test_diversity_holds_over_its_depth_and_keeps_the_order_below() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(1, 5, 300).tolist()
    final = rng.random(300)
    rules = rules_of(diversity(1, 3, depth=50), 300)
    assert rules is not None and rules.diversity is not None and rules.diversity.depth == 50
    out = rr.apply(rules, final, cands(300), ATTRS, inputs_for(codes), None)
    served = out.order.tolist()
    assert sorted(served) == list(range(300))
    assert rr.violations([codes[i] for i in served[:50]], 1, 3) == []
    below = [i for i in rank_order(final).tolist() if i not in set(served[:50])]
    assert served[50:] == below
    default = rules_of(diversity(1, 3), 300)
    assert default is not None and default.diversity is not None
    assert default.diversity.depth == BOUNDS.diversity_depth


def test_unknown_values_are_not_constrained() -> None:
    codes = [0, 0, 0, 1]
    rules = rules_of(diversity(1, 2), 4)
    assert rules is not None
    out = rr.apply(rules, np.array([4.0, 3, 2, 1]), cands(4), ATTRS, inputs_for(codes),
                   None)
    assert out.order.tolist() == [0, 1, 2, 3] and out.applied == []


# ---- MMR ---------------------------------------------------------------------------------


def naive_mmr(final: np.ndarray, codes: list[int], lam: float) -> list[int]:
    """MMR as written in the paper (O(n²)), similarity 1 for the same known value."""
    s = final
    lo, hi = s.min(), s.max()
    rel = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    left, picked = list(rank_order(final).tolist()), []
    while left:
        def gain(i: int) -> float:
            sim = any(codes[j] == codes[i] and codes[i] != 0 for j in picked)
            return float(lam * rel[i] - (1 - lam) * sim)
        best = max(left, key=lambda i: (gain(i), -left.index(i)))
        picked.append(best)
        left.remove(best)
    return picked


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=12), st.data(),
       st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_mmr_equals_the_greedy_of_the_paper(codes: list[int], data: Any, lam: float) -> None:
    n = len(codes)
    final = np.asarray(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), float)
    rules = rules_of({"mmr": {"attribute": "category", "lambda": lam}}, n)
    assert rules is not None
    out = rr.apply(rules, final, cands(n), ATTRS, inputs_for(codes), None)
    assert out.order.tolist() == naive_mmr(final, codes, lam)


def test_mmr_with_lambda_one_is_no_rule() -> None:
    assert rules_of({"mmr": {"attribute": "category", "lambda": 1.0}}, 5) is None


# ---- filters, boosts, pins ---------------------------------------------------------------


@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=40), st.data())
def test_filters_drop_exactly_the_excluded_and_seen_ids(scores: list[float], data: Any) -> None:
    n = len(scores)
    excluded = data.draw(st.sets(st.integers(0, n + 5)))
    seen = data.draw(st.sets(st.integers(0, n + 5)))
    rules = rules_of({"filters": {"exclude": [f"i{i}" for i in sorted(excluded)], "seen": True}},
                     n)
    assert rules is not None
    final = np.asarray(scores)
    out, served = filtered_apply(rules, final, cands(n), inputs_for([1] * n),
                                 [f"i{i}".encode() for i in sorted(seen)], None)
    gone = {i for i in (excluded | seen) if i < n}
    assert served.tolist() == [i for i in rank_order(final).tolist() if i not in gone]
    assert out.filtered == len(gone)
    expect = [r for r, hit in (("filter", excluded), ("seen", seen)) if {i for i in hit if i < n}]
    assert out.applied == expect


def test_filters_keep_every_candidate_when_nothing_hits_and_say_a_missing_seen_set() -> None:
    rules = rules_of({"filters": {"exclude": ["i9"], "seen": True}}, 4)
    assert rules is not None
    f = rr.filter_candidates(rules, cands(4), [b"i7", b"x"])
    assert f.keep is None and f.count == 0 and f.applied == () and f.relaxed == ()
    degraded = rr.filter_candidates(rules, cands(4), None)  # the fetch degraded: no seen set
    assert degraded.keep is None
    assert degraded.relaxed == ({"rule": "seen", "reason": "unavailable"},)
    both = rr.filter_candidates(rules_of({"filters": {"exclude": ["i2"], "seen": True}}, 4)
                                or rr.Rules(), cands(4), {b"i0", b"i2"})
    assert both.keep is not None and both.keep.tolist() == [1, 3]
    assert both.count == 2 and both.applied == ("filter", "seen")


def test_boosts_multiply_the_final_score_by_value_and_by_bucket() -> None:
    codes = [1, 2, 3, 1]
    age = [1.0, 10.0, 40.0, 100.0]
    spec = {"boosts": [{"attribute": "category", "values": {"c0": 2.0}},
                       {"attribute": "age_days", "edges": [7, 30], "factors": [1.5, 1.0, 0.5]}]}
    rules = rules_of(spec, 4)
    assert rules is not None
    final = np.array([1.0, 1.0, 1.0, 1.0])
    out = rr.apply(rules, final, cands(4), ATTRS, inputs_for(codes, age), None)
    np.testing.assert_allclose(out.final, [3.0, 1.0, 0.5, 1.0], rtol=1e-5)
    assert out.order.tolist() == [0, 1, 3, 2] and out.applied == ["boost"]


def test_pins_take_their_positions_and_the_rest_keeps_its_order() -> None:
    final = np.linspace(1, 0, 10)
    rules = rules_of({"pins": [{"id": "i9", "position": 0}, {"id": "i5", "position": 3}]}, 10)
    assert rules is not None
    out = rr.apply(rules, final, cands(10), ATTRS, inputs_for([1] * 10), None,
                   explain=True)
    assert out.order.tolist() == [9, 0, 1, 5, 2, 3, 4, 6, 7, 8]
    assert out.moved_from is not None and out.moved_by is not None
    assert out.moved_from.tolist()[0] == 9 and out.moved_by[0] == ["pin"]
    assert out.moved_from.tolist() == [9, 0, 1, 5, 2, 3, 4, 6, 7, 8]  # plain order = ids here
    assert all(m == ["pin"] for m in out.moved_by)  # i9 went first, so everyone moved


def test_pins_and_diversity_together_pins_never_move() -> None:
    codes = [1, 1, 2, 2, 3, 3, 4, 4, 5, 1]
    final = np.linspace(1, 0, 10)
    rules = rules_of({**diversity(1, 3), "pins": [{"id": "i9", "position": 2}]}, 10)
    assert rules is not None
    out = rr.apply(rules, final, cands(10), ATTRS, inputs_for(codes), None)
    served = out.order.tolist()
    assert served[2] == 9
    assert rr.violations([codes[i] for i in served], 1, 3) == [] and out.relaxed == []


def test_a_filtered_pin_is_dropped_and_said() -> None:
    rules = rules_of({"pins": [{"id": "i1", "position": 0}], "filters": {"exclude": ["i1"]}}, 4)
    assert rules is not None
    out, served = filtered_apply(rules, np.linspace(1, 0, 4), cands(4), inputs_for([1] * 4),
                                 None, None)
    assert served.tolist() == [0, 2, 3]
    assert out.relaxed == [{"rule": "pin", "id": "i1", "reason": "filtered"}]


def test_explain_names_the_rule_that_moved_each_item() -> None:
    codes = [1, 1, 1, 2, 3]
    rules = rules_of({**diversity(1, 2), "filters": {"exclude": ["i0"]}}, 5)
    assert rules is not None
    out, served = filtered_apply(rules, np.array([5.0, 4, 3, 2, 1]), cands(5), inputs_for(codes),
                                 None, None, explain=True)
    assert served.tolist() == [1, 3, 2, 4]
    # `from` counts the candidates the filters kept (i0 never was in the list)
    assert out.moved_from is not None
    assert out.moved_from.tolist() == [0, 2, 1, 3]
    assert out.moved_by == [[], ["diversity"], ["diversity"], []]


# ---- invalid rules -----------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "top_k", "field"), [
    ({"diversity": {"attribute": "colour", "window": 3}}, None, "rerank.diversity.attribute"),
    ({"diversity": {"attribute": "age_days", "window": 3}}, None, "rerank.diversity.attribute"),
    ({"diversity": {"attribute": "category", "max_per_window": 0, "window": 3}}, None,
     "rerank.diversity.max_per_window"),
    ({"diversity": {"attribute": "category", "max_per_window": 3, "window": 3}}, None,
     "rerank.diversity.max_per_window"),
    ({"diversity": {"attribute": "category", "window": 11}}, None, "rerank.diversity.window"),
    ({"diversity": {"attribute": "category", "window": 4}}, 3, "rerank.diversity.window"),
    ({"mmr": {"attribute": "category", "lambda": 1.5}}, None, "rerank.mmr.lambda"),
    ({"boosts": [{"attribute": "category", "values": {"c1": 50.0}}]}, None,
     "rerank.boosts[0].values.c1"),
    ({"boosts": [{"attribute": "category", "values": {"nope": 2.0}}]}, None,
     "rerank.boosts[0].values.nope"),
    ({"boosts": [{"attribute": "age_days", "edges": [30, 7], "factors": [1, 1, 1]}]}, None,
     "rerank.boosts[0].edges"),
    ({"boosts": [{"attribute": "age_days", "edges": [7], "factors": [1.0]}]}, None,
     "rerank.boosts[0].factors"),
    ({"pins": [{"id": "i1", "position": 0}, {"id": "i2", "position": 1},
               {"id": "i3", "position": 2}]}, 4, "rerank.pins"),
    ({"pins": [{"id": "zz", "position": 0}]}, None, "rerank.pins[0].id"),
    ({"pins": [{"id": "i1", "position": 10}]}, None, "rerank.pins[0].position"),
    ({"preset": "nope"}, None, "rerank.preset"),
])
def test_invalid_rules_name_the_field(spec: dict[str, Any], top_k: int | None,
                                      field: str) -> None:
    with pytest.raises(rr.InvalidRules) as e:
        rules_of(spec, 10, top_k)
    assert e.value.field == field, e.value


def test_a_preset_is_fitted_to_a_short_list_and_says_so() -> None:
    presets = {"feed": {**diversity(1, 5), "pins": [{"id": "i1", "position": 0},
                                                    {"id": "zz", "position": 1}]}}
    r = rr.resolve({"preset": "feed"}, presets, None, ATTRS, cands(4), None, BOUNDS)
    assert r is not None and r.diversity is not None and r.diversity.window == 4
    assert r.pins == (rr.Pin("i1", 0),)
    assert any("window 5 -> 4" in a for a in r.adjusted)
    assert any("zz" in a for a in r.adjusted)
