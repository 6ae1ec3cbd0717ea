"""The served-log format: records and events round-trip, tables carry the inputs as served."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.servedlog import (
    FeedbackEvent,
    LogFormatError,
    ServedRecord,
    decode_feedback,
    decode_served,
    encode_feedback,
    encode_served,
    feedback_table,
    impressions_table,
    served_inputs,
)

TASKS = ("click", "like", "share")


def record(k: int = 3, rid: str = "r1") -> ServedRecord:
    rng = np.random.default_rng(k)
    return ServedRecord(
        ts=1_700_000_000.5, request_id=rid, user_id="u1", model_name="mmoe", model_version=2,
        scoring="weighted_sum", weights={"click": 1.0, "like": 4.0, "share": 8.0},
        context={"hour": 21, "surface": "home"}, tasks=TASKS,
        item_ids=[f"i{j}" for j in range(k)],
        scores=rng.random((k, 3)).astype(np.float32), final=rng.random(k),
        inputs={"user_cat": np.array([[3, 1]], np.int64),
                "item_cat": rng.integers(0, 9, (k, 1)).astype(np.int64),
                "item_dense": rng.normal(size=(k, 2)).astype(np.float32),
                "context_cat": np.array([[4, 2]], np.int64)},
        experiment="exp", arm="control",
    )


def test_served_record_round_trips_bit_for_bit() -> None:
    rec = record()
    back = decode_served(encode_served(rec))
    assert back.item_ids == rec.item_ids and back.weights == rec.weights
    assert (back.model_name, back.model_version, back.arm) == ("mmoe", 2, "control")
    np.testing.assert_array_equal(back.scores, rec.scores)
    np.testing.assert_array_equal(back.final, rec.final)
    for name, arr in rec.inputs.items():
        assert back.inputs[name].dtype == arr.dtype
        np.testing.assert_array_equal(back.inputs[name], arr)


def test_corrupt_records_are_format_errors() -> None:
    fields = encode_served(record())
    with pytest.raises(LogFormatError, match="scores"):
        decode_served({**fields, b"scores": fields[b"scores"][:-4]})
    with pytest.raises(LogFormatError, match="meta"):
        decode_served({b"scores": b""})
    with pytest.raises(LogFormatError, match="format"):
        decode_feedback({b"meta": b'{"v": 99}'})


def test_impressions_table_has_one_row_per_served_item_with_its_inputs() -> None:
    a, b = record(3, "r1"), record(2, "r2")
    table = impressions_table([("1-0", a), ("2-0", b)])
    assert table.num_rows == 5
    assert table["position"].to_pylist() == [0, 1, 2, 0, 1]
    assert table["request_id"].to_pylist() == ["r1"] * 3 + ["r2"] * 2
    np.testing.assert_allclose(table["score_like"].to_numpy()[:3], a.scores[:, 1])
    inputs = served_inputs(table)
    np.testing.assert_array_equal(inputs["item_dense"][3:], b.inputs["item_dense"])
    # the user's row is served once and repeated on each of the request's rows
    np.testing.assert_array_equal(inputs["user_cat"], np.tile([[3, 1]], (5, 1)))


def test_feedback_round_trips() -> None:
    ev = FeedbackEvent("r1", "i2", "like", 1_700_000_001.0)
    assert decode_feedback(encode_feedback(ev)) == ev
    assert feedback_table([("5-1", ev)])["event"].to_pylist() == ["like"]


@pytest.mark.parametrize("change", [
    {"ts": float("nan")}, {"ts": -1.0}, {"ts": 1e12}, {"context": [1, 2]}, {"weights": None},
    {"items": [1, 2, 3]}, {"request_id": 7}, {"arm": 3}, {"model": ["mmoe"]}, {"tasks": None},
    {"inputs": {"user_cat": ["<U4", [1, 2]]}}, {"inputs": {"item_cat": ["<i8", [2, 1]]}},
])
def test_any_bad_meta_is_a_format_error(change: dict) -> None:
    """Whatever the JSON holds, decoding raises LogFormatError (the exporter's dead letter)."""
    import orjson

    fields = encode_served(record())
    meta = {**orjson.loads(fields[b"meta"]), **change}
    with pytest.raises(LogFormatError):
        decode_served({**fields, b"meta": orjson.dumps(meta)})


def test_feedback_of_another_shape_is_a_format_error() -> None:
    for meta in (b"[1]", b'{"v": 1, "request_id": "r"}', b'{"v": 1, "request_id": "r", '
                 b'"item_id": "i", "event": "click", "ts": "soon"}'):
        with pytest.raises(LogFormatError):
            decode_feedback({b"meta": meta})


def test_the_parquet_layout_names() -> None:
    from ranker.servedlog import hour_partition, parse_stream_id, part_name, part_range

    assert hour_partition(1_796_115_599.9) == "hour=2026-12-01T08"  # UTC, 08:59:59.9
    assert part_range(part_name("1796115599000-0", "1796115600000-12")) == (
        (1796115599000, 0), (1796115600000, 12))
    assert part_range(".tmp-exporter-1-1-0-2-0.parquet") is None
    assert parse_stream_id("10-2") > parse_stream_id("9-30")  # numeric, not string, order


def test_propensities_round_trip_reach_the_table_and_are_checked() -> None:
    import dataclasses

    rec = dataclasses.replace(record(3), propensity=np.array([0.93, 0.03, 0.93]))
    back = decode_served(encode_served(rec))
    np.testing.assert_array_equal(back.propensity, rec.propensity)  # type: ignore[arg-type]
    assert decode_served(encode_served(record(2))).propensity is None
    table = impressions_table([("1-0", rec), ("2-0", record(2, "r2"))])
    assert table["propensity"].to_pylist() == [0.93, 0.03, 0.93, 1.0, 1.0]  # absent: 1
    fields = encode_served(rec)
    for bad in ([0.5, 0.0, 1.0], [0.5, 1.5, 1.0], [0.5, float("nan"), 1.0]):
        with pytest.raises(LogFormatError, match="propensity"):
            decode_served({**fields, b"propensity": np.array(bad, "<f8").tobytes()})
    with pytest.raises(LogFormatError, match="3 items has 2 propensity"):
        decode_served({**fields, b"propensity": np.array([0.5, 0.5], "<f8").tobytes()})
