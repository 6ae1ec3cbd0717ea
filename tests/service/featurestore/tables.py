"""Small raw user and item tables for the tiny schema, with every kind of awkward value."""

from __future__ import annotations

import pyarrow as pa


def users_table(activity_scale: float = 1.0) -> pa.Table:
    """u0..u9; country has an OOV value and a null; activity has a null (-> its default)."""
    countries = ["us", "de", "br", "in", "fr", None, "us", "de", "br", "in"]
    activity = [float(i) * activity_scale for i in range(10)]
    activity[4] = None  # type: ignore[call-overload]
    return pa.table(
        {
            "user_id": [f"u{i}" for i in range(10)],
            "country": countries,
            "activity": pa.array(activity, type=pa.float64()),
            "not_a_feature": list(range(10)),  # extra columns are ignored
        }
    )


def items_table() -> pa.Table:
    """i0..i29; category has an OOV value; duration has a null."""
    n = 30
    category = [f"c{i % 8}" for i in range(n)]
    category[3] = "c99"
    duration: list[float | None] = [10.0 * i for i in range(n)]
    duration[5] = None
    return pa.table(
        {
            "item_id": [f"i{i}" for i in range(n)],
            "category": category,
            "age_days": pa.array([float(i) for i in range(n)], type=pa.float64()),
            "duration": pa.array(duration, type=pa.float64()),
        }
    )
