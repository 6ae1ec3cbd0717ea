"""A small example feature schema and inputs of its shape: for tests and the in-process benchmark.

The schema has the kinds of features the real data has (ids, a few categoricals, log1p and plain
dense values, a context group); its ids are `u<k>` and `i<k>`, as the synthetic world's.
"""

from __future__ import annotations

import numpy as np

from ranker.schema import (
    CANDIDATE_ENTITY,
    CategoricalFeature,
    DenseFeature,
    FeatureSchema,
    GroupSchema,
    ListFeature,
    ListPooling,
    Vocabulary,
)

HISTORY_FEATURE = "recent_items"  # the example list feature: a user's recent item ids


def tiny_schema(n_users: int = 50, n_items: int = 200) -> FeatureSchema:
    """Users u0..u{n-1}, items i0..i{n-1}, plus the kinds of features the real data has."""
    user = GroupSchema(
        "user",
        "user_id",
        (
            CategoricalFeature("user_id", Vocabulary(tuple(f"u{i}" for i in range(n_users))), 4),
            CategoricalFeature("country", Vocabulary(("us", "de", "br", "in")), 3),
        ),
        (DenseFeature("activity", mean=1.5, std=0.8, default=0.0, log1p=True),),
    )
    item = GroupSchema(
        "item",
        "item_id",
        (
            CategoricalFeature("item_id", Vocabulary(tuple(f"i{i}" for i in range(n_items))), 4),
            CategoricalFeature("category", Vocabulary(tuple(f"c{i}" for i in range(8))), 3),
        ),
        (
            DenseFeature("age_days", mean=30.0, std=20.0, default=30.0),
            DenseFeature("duration", mean=60.0, std=30.0, default=60.0),
        ),
    )
    context = GroupSchema(
        "context",
        None,
        (
            CategoricalFeature("hour", Vocabulary(tuple(str(h) for h in range(24))), 3),
            CategoricalFeature("surface", Vocabulary(("home", "search", "related")), 2),
        ),
        (),
    )
    return FeatureSchema((user, item, context))


def tiny_list_schema(n_users: int = 50, n_items: int = 200, max_len: int = 6,
                     pooling: ListPooling = "mean") -> FeatureSchema:
    """`tiny_schema` plus a user list feature: the user's recent item ids (`HISTORY_FEATURE`),
    up to `max_len`, sharing the item id's vocabulary and embedding table."""
    base = tiny_schema(n_users, n_items)
    user, item, context = base.groups
    history = ListFeature(HISTORY_FEATURE, max_len, "item.item_id", item.categorical[0].vocab,
                          pooling)
    user = GroupSchema(user.entity, user.key, user.categorical, user.dense, (history,))
    return FeatureSchema((user, item, context))


def golden_inputs(schema: FeatureSchema, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """One user and context row broadcast over n random candidates, as the service sends them."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for g in schema.groups:
        rows = n if g.entity == CANDIDATE_ENTITY else 1
        cat = np.zeros((rows, 0), np.int64)
        dense = np.zeros((rows, 0), np.float32)
        if g.n_cat:
            cat = np.stack(
                [rng.integers(0, f.vocab_size, rows) for f in g.categorical], axis=1
            ).astype(np.int64)
        if g.n_dense:
            dense = rng.normal(size=(rows, g.n_dense)).astype(np.float32)
        lists = None
        if g.lists:  # ids of the list's table, the tail padding (a part-filled history)
            lists = np.zeros((rows, g.list_width), np.int64)
            for f, cols in zip(g.lists, g.list_slices(), strict=True):
                filled = rng.integers(0, f.max_len + 1, rows)  # (rows,) 0 = empty history
                ids = rng.integers(1, f.vocab.size, (rows, f.max_len))
                lists[:, cols] = np.where(np.arange(f.max_len) < filled[:, None], ids, 0)
        out.update(g.inputs(cat, dense, lists))
    return out
