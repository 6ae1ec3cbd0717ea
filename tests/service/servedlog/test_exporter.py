"""The exporter against a real redis-server (and a real 3-master cluster): hour partitions, dead
letters, an empty stream, trimmed entries, files of two schemas in one partition."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import redis
from redis.cluster import RedisCluster

from ranker.servedlog import (
    FeedbackEvent,
    encode_served,
    feedback_stream,
    served_inputs,
    served_stream,
)
from service.servedlog.exporter import Committed, Exporter, _File, make_exporter_client
from tests.service.servedlog.helpers import (
    HOUR0,
    PREFIX,
    parts,
    read_kind,
    served,
    stream_id_counts,
    xadd,
    xadd_feedback,
    xadd_served,
)


def export(client: redis.Redis, out: Path, batch: int = 1000) -> dict:
    return Exporter(client, out, prefix=PREFIX, batch=batch, block_ms=50).run(
        until_empty=True).as_dict()


def test_empty_streams_export_nothing_and_create_the_group(client: redis.Redis,
                                                           tmp_path: Path) -> None:
    rep = export(client, tmp_path)
    assert rep["impressions"]["entries"] == rep["feedback"]["entries"] == 0
    assert not list(tmp_path.rglob("*.parquet"))
    for key in (served_stream(PREFIX), feedback_stream(PREFIX)):
        assert client.exists(key)  # MKSTREAM: the writer's XADDs land in a grouped stream
        assert [g["name"] for g in client.xinfo_groups(key)] == [b"exporter"]


def test_batches_split_by_hour_with_the_inputs_as_served(client: redis.Redis,
                                                         tmp_path: Path) -> None:
    recs = [served(i, HOUR0 - 20 + 10 * i) for i in range(5)]  # 07:59:40 .. 08:00:20
    ids = [xadd_served(client, r) for r in recs]
    fids = [xadd_feedback(client, FeedbackEvent(f"r{i}", f"i{i}-0", "click", HOUR0 - 5 + 5 * i))
            for i in range(3)]
    rep = export(client, tmp_path)
    imp = parts(tmp_path, "impressions")
    # one batch, two hours: two files, each named by its own first and last ids
    assert [(f.parent.name, f.name) for f in imp] == [
        ("hour=2026-12-01T07", f"part-{ids[0]}-{ids[1]}.parquet"),
        ("hour=2026-12-01T08", f"part-{ids[2]}-{ids[4]}.parquet"),
    ]
    assert [f.parent.name for f in parts(tmp_path, "feedback")] == [
        "hour=2026-12-01T07", "hour=2026-12-01T08"]
    assert rep["impressions"] == {"entries": 5, "rows": sum(len(r.item_ids) for r in recs),
                                  "files": 2, "already_written": 0, "dead_letter": 0,
                                  "trimmed": 0, "empty": 0}
    assert rep["feedback"]["rows"] == 3
    t = pq.read_table(imp[1])
    assert t["request_id"].to_pylist()[0] == "r2"
    inputs = served_inputs(t)
    np.testing.assert_array_equal(inputs["item_dense"][: len(recs[2].item_ids)],
                                  recs[2].inputs["item_dense"])
    fb = read_kind(tmp_path, "feedback")
    assert fb is not None and sorted(fb["stream_id"].to_pylist()) == sorted(fids)
    # everything acknowledged: nothing pending for the group
    assert client.xpending(served_stream(PREFIX), "exporter")["pending"] == 0
    # a second run finds nothing new and writes nothing
    again = export(client, tmp_path)
    assert again["impressions"]["entries"] == 0 and len(parts(tmp_path, "impressions")) == 2


def test_entries_that_do_not_decode_go_to_the_dead_letters_and_are_counted(
    client: redis.Redis, tmp_path: Path
) -> None:
    good = xadd_served(client, served(1, HOUR0))
    fields = encode_served(served(2, HOUR0))
    bad = [
        {b"junk": b"1"},  # no meta
        {**fields, b"meta": b"{not json"},
        {**fields, b"meta": orjson.dumps({"v": 99})},
        {**fields, b"scores": b"\x00"},  # truncated
        {**fields, b"meta": orjson.dumps({**orjson.loads(fields[b"meta"]), "ts": "nan"})},
        {**fields, b"meta": orjson.dumps([1, 2])},  # JSON of another shape
    ]
    bad_ids = [xadd(client, served_stream(PREFIX), f) for f in bad]
    bad_fb = xadd(client, feedback_stream(PREFIX), {b"meta": b'{"v": 1}'})
    rep = export(client, tmp_path, batch=3)
    assert rep["impressions"]["dead_letter"] == len(bad) and rep["feedback"]["dead_letter"] == 1
    assert stream_id_counts(tmp_path, "impressions") == {f"{good}#0": 1, f"{good}#1": 1}
    dead = read_kind(tmp_path, "deadletter/impressions")
    assert dead is not None and dead["stream_id"].to_pylist() == bad_ids
    assert dict(dead["fields"].to_pylist()[0]) == {b"junk": b"1"}  # the raw entry, kept
    assert "meta" in dead["error"].to_pylist()[0]
    dead_fb = read_kind(tmp_path, "deadletter/feedback")
    assert dead_fb is not None and dead_fb["stream_id"].to_pylist() == [bad_fb]
    assert client.xpending(served_stream(PREFIX), "exporter")["pending"] == 0


def test_pending_entries_trimmed_by_the_cap_are_counted(client: redis.Redis,
                                                        tmp_path: Path) -> None:
    key = served_stream(PREFIX)
    client.xgroup_create(key, "exporter", id="0", mkstream=True)
    for i in range(3):
        xadd_served(client, served(i, HOUR0))
    client.xreadgroup("exporter", "exporter-1", {key: ">"}, count=10)  # delivered, then a crash
    client.xtrim(key, maxlen=0)  # and the writer's cap removes them before the restart
    rep = export(client, tmp_path)
    assert rep["impressions"]["trimmed"] == 3 and rep["impressions"]["rows"] == 0
    assert client.xpending(key, "exporter")["pending"] == 0


def test_two_schemas_in_one_partition_write_two_files(client: redis.Redis,
                                                      tmp_path: Path) -> None:
    ids = []
    for i in range(4):  # schemas alternate A, B, A, B (a canary serving beside v1)
        r = served(i, HOUR0 + i)
        if i % 2:
            narrow = r.inputs["item_dense"][:, :1].copy()
            r = dataclasses.replace(r, model_version=2, inputs={**r.inputs, "item_dense": narrow})
        ids.append(xadd_served(client, r))
    rep = export(client, tmp_path)
    files = parts(tmp_path, "impressions")
    assert rep["impressions"]["files"] == 2
    assert sorted(f.name for f in files) == sorted(
        [f"part-{ids[0]}-{ids[2]}.parquet", f"part-{ids[1]}-{ids[3]}.parquet"])
    committed = Committed.scan(tmp_path, ["impressions"], "exporter-1")
    assert all(committed.written(f"impressions/{files[0].parent.name}", sid) for sid in ids)


def test_interleaved_ranges_are_decided_by_the_files_ids(tmp_path: Path) -> None:
    c = Committed()
    c.add("p", _File((1, 0), (3, 0), tmp_path / "a", frozenset({"1-0", "3-0"})))
    c.add("p", _File((2, 0), (4, 0), tmp_path / "b", frozenset({"2-0", "4-0"})))
    assert all(c.written("p", s) for s in ("1-0", "2-0", "3-0", "4-0"))
    assert not c.written("p", "2-5")  # inside both ranges, in neither file
    assert not c.written("p", "5-0") and not c.written("q", "1-0")


def test_exports_from_a_redis_cluster(tmp_path: Path) -> None:
    from launch.local_redis import RedisClusterServer

    with RedisClusterServer(masters=3) as cluster:
        client = make_exporter_client(cluster.url, block_ms=50)
        assert isinstance(client, RedisCluster)  # detected by itself
        try:
            slots = {client.keyslot(k) for k in (served_stream(PREFIX), feedback_stream(PREFIX))}
            assert len(slots) == 2  # two keys, two slots: never one multi-key command
            ids = [xadd_served(client, served(i, HOUR0 + 3000 * i)) for i in range(3)]
            fid = xadd_feedback(client, FeedbackEvent("r0", "i0-0", "like", HOUR0 + 1))
            rep = Exporter(client, tmp_path, prefix=PREFIX, batch=2, block_ms=50).run(
                until_empty=True).as_dict()
            assert rep["impressions"]["entries"] == 3 and rep["feedback"]["entries"] == 1
            counts = stream_id_counts(tmp_path, "impressions")
            assert {k.split("#")[0] for k in counts} == set(ids) and set(counts.values()) == {1}
            assert stream_id_counts(tmp_path, "feedback") == {fid: 1}
        finally:
            client.close()
