"""The Feast comparison's pure parts (feast itself is not installed here, nor in CI).

What Feast is given must be what our records hold, the references must name the views Feast
is given, the ratios over runs must be computed per run, and without feast the entry point must
say why it measured nothing and exit 0.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from bench import feast_compare as fc
from bench.featurestore_bench import bench_schema
from service.featurestore.writer import encode_table


def small_tables() -> tuple[pa.Table, pa.Table]:
    schema = bench_schema()
    rng = np.random.default_rng(3)
    out = []
    for entity in ("user", "item"):
        g = schema.group(entity)
        assert g is not None and g.key is not None
        cols: dict[str, object] = {g.key: [f"{entity[0]}{i}" for i in range(7)]}
        cols |= {f.name: rng.integers(0, 120, 7).astype(str) for f in g.categorical}
        cols |= {d.name: rng.exponential(3.0, 7) for d in g.dense}
        out.append(pa.table(cols))
    return out[0], out[1]


def test_feast_gets_exactly_the_encoded_values_our_records_hold() -> None:
    schema = bench_schema()
    users, items = small_tables()
    for entity, table in (("user", users), ("item", items)):
        g = schema.group(entity)
        assert g is not None and g.key is not None
        cols = fc.encoded_columns(g, table)
        assert list(cols) == [g.key, *g.feature_names]
        records = encode_table(g, table, time.time()).records
        cat = np.stack([cols[f.name].to_numpy() for f in g.categorical], axis=1)
        dense = np.stack([cols[d.name].to_numpy() for d in g.dense], axis=1)
        assert cat.dtype == np.int64 and dense.dtype == np.float32
        np.testing.assert_array_equal(cat, records["cat"])
        np.testing.assert_array_equal(dense, records["dense"])


def test_feature_refs_name_both_views_and_narrow_the_items() -> None:
    schema = bench_schema()
    full = fc.feature_refs(schema)
    assert len(full) == 12 + 18
    assert full[0] == "user_features:uc0" and full[-1] == "item_features:id11"
    narrow = fc.feature_refs(schema, 3)
    assert narrow[:12] == full[:12]
    assert narrow[12:] == ["item_features:ic0", "item_features:ic1", "item_features:ic2"]


def stats(median: float) -> dict[str, float]:
    return {"p10_ms": median * 0.9, "median_ms": median, "p99_ms": median * 2}


def test_headline_ratios_are_per_run_then_spread() -> None:
    runs = [
        {"500": {"ours": stats(1.0), "feast": stats(30.0), "feast_3": stats(15.0),
                 "feast_full": stats(60.0)}},
        {"500": {"ours": stats(2.0), "feast": stats(40.0), "feast_3": stats(20.0),
                 "feast_full": stats(80.0)}},
        {"500": {"ours": stats(1.0), "feast": stats(25.0), "feast_3": stats(14.0),
                 "feast_full": stats(50.0)}},
    ]
    h = fc.headline(runs)["500"]
    assert h["feast_over_ours"] == {"median": 25.0, "min": 20.0, "max": 30.0}
    assert h["ours_median_ms"]["median"] == 1.0
    report = {"date": "2026-12-01", "command": "python -m bench.feast_compare", "machine": "m",
              "python": "3.11", "feast": "0.67.0", "redis_py": "7.4.1", "loadavg_start": 1.0,
              "loadavg_end": 1.0, "records": {"users": 2, "items": 3}, "reps": 5,
              "feast_load_s": {"apply": 0.1, "materialize": 2.0}, "ours_load_s": 0.5,
              "runs": runs, "headline": fc.headline(runs)}
    text = fc.markdown(report)
    assert "**25.0× [20.0, 30.0]**" in text
    assert text.count("\n| 500 |") == 1 and "| 3 | 500 |" in text  # headline row, run rows


def test_without_feast_it_says_why_and_measures_nothing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "feast", None)  # import feast -> ImportError
    msg = fc.feast_missing()
    assert msg is not None and "feast is not importable" in msg and "nothing was measured" in msg
    assert fc.main(["--runs", "1"]) == 0
    err = capsys.readouterr().err
    assert "Feast comparison is skipped" in err and "pip install 'feast[redis]>=0.67'" in err
