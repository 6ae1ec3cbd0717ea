"""The re-rank stage's fast paths equal their slow references, by hypothesis: the pin-free
diversity fill (the stream read only as far as it gets, a tight loop while nothing is held
back) against the general fill that pins use, and the resolved-rules cache against
resolving every request."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import rerank as rr
from service.errors import InvalidRequest
from service.rerank_rules import RulesConfig
from service.schemas import RankRequest
from service.settings import Settings
from service.validation import check_rerank
from tests.tiny import tiny_schema


def reference(order: np.ndarray, codes: np.ndarray, k: int, w: int, full: int,
              depth: int | None) -> tuple[list[int], list[int]]:
    """The general best-first fill (`_fill`, the one pins use) over the first `depth`
    positions, then the items it did not place in order."""
    length = full if depth is None else min(depth, full)
    head, stuck = rr._fill(order.tolist(), codes.tolist(), k, w, length, {}, relax=True)
    rest = [i for i in order.tolist() if i not in set(head)]
    return (head + rest)[:full], stuck


fills = st.integers(1, 90).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 6), min_size=n, max_size=n),  # codes (0 = out of vocabulary)
    st.permutations(list(range(n))),  # today's order
    st.integers(1, 3),  # k
    st.integers(1, 5),  # w - k
    st.integers(1, n),  # the list's length
    st.one_of(st.none(), st.integers(2, 40)),  # depth
    st.booleans(),  # clump the codes (long runs: the fill holds many back)
))


@settings(max_examples=500, deadline=None)
@given(fills)
def test_the_pin_free_fill_equals_the_general_fill(case: Any) -> None:
    codes_, order_, k, dw, full, depth, clump = case
    codes = np.asarray(sorted(codes_) if clump else codes_, dtype=np.int64)
    order = np.asarray(order_, dtype=np.int64)
    w = k + dw
    length = full if depth is None else min(depth, full)
    served, stuck = reference(order, codes, k, w, full, depth)
    scode = codes[order].tolist()
    taken, stuck_fast, i, left = rr._fill_fast(scode, k, w, length)
    assert order[taken].tolist() == served[:len(taken)] and stuck_fast == stuck
    assert sorted([*taken, *left]) == list(range(i))  # every item read is taken or left
    if not stuck:  # with stuck positions the search may re-arrange (the same code after)
        got, got_stuck, changed = rr.diversify(order, codes, k, w, full, {}, depth)
        assert got.tolist() == served and got_stuck == []
        assert changed == (served != order[:full].tolist())


# ---- the resolved-rules cache --------------------------------------------------------------

BOUNDS = rr.Bounds(max_pinned_share=0.5, max_exclude=6)
SETTINGS = Settings()
SCHEMA = tiny_schema()
N = 12
ATTR = st.sampled_from(["category", "age_days", "colour"])
diversity_spec = st.fixed_dictionaries(
    {"attribute": ATTR, "window": st.integers(2, 14)},
    optional={"max_per_window": st.integers(1, 4),
              "depth": st.one_of(st.none(), st.integers(2, 20))})
filters_spec = st.fixed_dictionaries({}, optional={
    "exclude": st.lists(st.sampled_from([f"i{i}" for i in range(N + 3)]), max_size=8,
                        unique=True),
    "seen": st.booleans()})
mmr_spec = st.fixed_dictionaries({"attribute": ATTR},
                                 optional={"lambda": st.sampled_from([0, 0.5, 1, 1.0])})
boost_spec = st.one_of(
    st.fixed_dictionaries({"attribute": st.just("category"),
                           "values": st.dictionaries(st.sampled_from(["c0", "c1", "zz"]),
                                                     st.sampled_from([0.05, 1, 2.0, 20]),
                                                     max_size=2)}),
    st.fixed_dictionaries({"attribute": st.just("age_days"),
                           "edges": st.sampled_from([[7], [7, 30], [30, 7]]),
                           "factors": st.sampled_from([[1.2, 1.0], [1.2, 1.0, 0.8]])}))
pin_spec = st.lists(st.fixed_dictionaries({"id": st.sampled_from(["i1", "i2", "zz"]),
                                           "position": st.integers(0, 14)}), max_size=2)
rerank_spec = st.fixed_dictionaries({}, optional={
    "preset": st.one_of(st.none(), st.sampled_from(["feed", "pinned", "boosted", "nope"])),
    "diversity": st.one_of(st.none(), diversity_spec),
    "filters": st.one_of(st.none(), filters_spec),
    "mmr": st.one_of(st.none(), mmr_spec),
    "boosts": st.one_of(st.none(), st.lists(boost_spec, max_size=2)),
    "pins": st.one_of(st.none(), pin_spec),
})
CONFIGS = [
    RulesConfig({"feed": {"diversity": {"attribute": "category", "window": 20},
                          "filters": {"exclude": ["i3"], "seen": True}},
                 "pinned": {"pins": [{"id": "i2", "position": 0}]},
                 "boosted": {"boosts": [{"attribute": "category", "values": {"c1": 2.0}}]}},
                "feed"),
    RulesConfig({"feed": {"mmr": {"attribute": "category", "lambda": 0.3}}}, None),
]


def outcome(req: RankRequest, config: RulesConfig, cache: rr.ResolvedCache | None) -> Any:
    try:
        return check_rerank(req, SETTINGS, SCHEMA, config, BOUNDS, cache)
    except InvalidRequest as e:
        return ("invalid", e.detail)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), rerank_spec), st.sampled_from([None, 3, 8, 20]),
                          st.integers(0, 1)), min_size=1, max_size=6))
def test_cached_rules_equal_the_rules_resolved_per_request(
        requests: list[tuple[dict[str, Any] | None, int | None, int]]) -> None:
    cache = rr.ResolvedCache(size=4)  # small: entries are dropped on the way too
    for spec, top_k, c in requests * 2:  # each request twice: the second from the cache
        body: dict[str, Any] = {"user_id": "u", "candidates": [f"i{i}" for i in range(N)],
                                "top_k": top_k}
        if spec is not None:
            body["rerank"] = spec
        try:
            req = RankRequest.model_validate(body)
        except ValueError:
            continue  # the schema refuses it before any rule is resolved
        assert outcome(req, CONFIGS[c], cache) == outcome(req, CONFIGS[c], None), spec


def test_the_cache_keeps_each_requests_own_exclude() -> None:
    cache = rr.ResolvedCache()
    config = RulesConfig()

    def check(rerank: dict[str, Any]) -> rr.Rules | None:
        req = RankRequest.model_validate({"user_id": "u", "rerank": rerank,
                                          "candidates": [f"i{i}" for i in range(N)]})
        return check_rerank(req, SETTINGS, SCHEMA, config, BOUNDS, cache)

    div = {"attribute": "category", "window": 3}
    a = check({"diversity": div, "filters": {"exclude": ["i1"]}})
    b = check({"diversity": div, "filters": {"exclude": ["i2", "i4"]}})
    assert a is not None and b is not None and a.exclude == ("i1",)
    assert b.exclude == ("i2", "i4") and b.diversity == a.diversity
    assert check({"filters": {"exclude": []}}) is None
    hit = check({"filters": {"exclude": ["i5"]}})
    assert hit is not None and hit.exclude == ("i5",)
    with pytest.raises(InvalidRequest) as e:  # the bound on exclude holds on a cache hit too
        check({"filters": {"exclude": [f"i{i}" for i in range(7)]}})
    assert e.value.detail is not None and e.value.detail[0]["field"] == "rerank.filters.exclude"


def test_the_cache_serves_two_rules_versions_apart() -> None:
    cache = rr.ResolvedCache()
    old = RulesConfig({"feed": {"diversity": {"attribute": "category", "window": 3}}}, "feed")
    new = RulesConfig({"feed": {"diversity": {"attribute": "category", "window": 4}}}, "feed")
    req = RankRequest.model_validate({"user_id": "u", "candidates": [f"i{i}" for i in range(N)]})
    for _ in range(2):  # e.g. two arms' models, or a reload: each answer from its own version
        for config, window in ((old, 3), (new, 4)):
            rules = check_rerank(req, SETTINGS, SCHEMA, config, BOUNDS, cache)
            assert rules is not None and rules.diversity is not None
            assert rules.diversity.window == window
