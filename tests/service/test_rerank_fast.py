"""The re-rank stage's fast path equals its slow reference, by hypothesis: the pin-free
diversity fill (the stream read only as far as it gets, a tight loop while nothing is held
back) against the general fill that pins use."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service import rerank as rr


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
