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
    Vocabulary,
)


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
        out.update(g.inputs(cat, dense))
    return out
