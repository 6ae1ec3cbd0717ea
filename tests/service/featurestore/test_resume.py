"""A load killed midway resumes: nothing lost, nothing written twice (issue 20). A real
`ranker features load` process is SIGKILLed while it writes to a real redis-server, then run
again on the same files."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from ranker.examples import HISTORY_FEATURE, tiny_list_schema
from ranker.manifest import load_manifest, load_schema
from service.featurestore.keys import load_pattern, pointer_key, record_key_prefix
from service.featurestore.writer import encode_table, file_load_id, progress_key
from tests.tiny import export_tiny_model

N_USERS = 400_000
BATCH = 5_000


@pytest.fixture(scope="module")
def list_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("resume_models"),
                             schema=tiny_list_schema(max_len=8))


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, N_USERS)
    flat = np.char.add("i", rng.integers(0, 200, int(lengths.sum())).astype(str))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    path = tmp_path_factory.mktemp("resume_data") / "users.parquet"
    pq.write_table(pa.table({
        "user_id": np.char.add("u", np.arange(N_USERS).astype(str)),
        "country": rng.choice(["us", "de", "br", "in", "fr"], N_USERS),
        "activity": rng.uniform(0, 50, N_USERS),
        HISTORY_FEATURE: pa.ListArray.from_arrays(offsets, pa.array(flat)),
    }), path, row_group_size=50_000)
    return path


def cli(model: Path, users: Path, url: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "features", "load", "--model-dir", str(model),
            "--users", str(users), "--redis-url", url, "--batch-size", str(BATCH),
            "--no-progress"]


def test_a_killed_load_resumes_without_losing_or_repeating_a_record(
        list_model: Path, users_file: Path, redis_url: str) -> None:
    schema = load_schema(list_model, load_manifest(list_model))
    lid = file_load_id(schema, {"user": users_file})
    marker = progress_key("rk", schema.version, lid, "user")
    raw = redis.Redis.from_url(redis_url, socket_timeout=5)
    raw.config_resetstat()
    proc = subprocess.Popen(cli(list_model, users_file, redis_url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while int(raw.get(marker) or 0) < 4 * BATCH:  # a few batches in: kill it midway
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the load wrote nothing within 120 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    done = int(raw.get(marker) or 0)
    assert 0 < done < N_USERS, f"the load was not killed midway ({done} of {N_USERS})"
    assert done % BATCH == 0  # each batch and its marker were applied together
    # distinct keys: SCAN may return a key twice while Redis rehashes its growing keyspace
    written = len(set(raw.scan_iter(match=load_pattern("rk", schema.version, lid, "user"),
                                    count=10_000)))
    assert written == done, "records and the progress marker disagree: not atomic"
    assert raw.get(pointer_key("rk", schema.version, "user")) is None  # nothing went live

    out = subprocess.run(cli(list_model, users_file, redis_url), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"resumed after {done} rows" in out.stdout
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["load_id"] == lid
    assert (report["resumed_rows"], report["records_written"]) == (done, N_USERS - done)
    assert report["users"] == N_USERS
    # nothing twice: the two runs together sent exactly one MSET per batch of the file
    stats = raw.info("commandstats")
    assert stats["cmdstat_mset"]["calls"] == math.ceil(N_USERS / BATCH)
    # nothing lost: every user's record is there and holds its encoded features
    assert raw.get(pointer_key("rk", schema.version, "user")).decode() == lid
    assert raw.get(marker) is None  # the resume marker went with the switch
    user = schema.group("user")
    assert user is not None
    table = pq.read_table(users_file)
    want = encode_table(user, table, 0.0).records
    prefix = record_key_prefix("rk", schema.version, lid, "user")
    ids = table.column("user_id").to_pylist()
    for lo in range(0, N_USERS, 50_000):
        got = raw.mget([prefix + i for i in ids[lo : lo + 50_000]])
        assert all(v is not None for v in got), "a record is missing"
        rec = np.frombuffer(b"".join(got), user.record_dtype())
        for name in ("cat", "dense", "list"):
            np.testing.assert_array_equal(rec[name], want[name][lo : lo + 50_000])
    raw.close()


def test_a_bad_list_midway_stops_the_streamed_load_before_the_switch(
        list_model: Path, tmp_path: Path, redis_url: str) -> None:
    from service.featurestore.writer import BadListError, load_files

    schema = load_schema(list_model, load_manifest(list_model))
    histories = [["i1"]] * 30 + [["i2"] * 9]  # the last row is over the cap (8)
    path = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user_id": [f"u{k}" for k in range(31)],
                             "country": ["us"] * 31, "activity": [1.0] * 31,
                             HISTORY_FEATURE: pa.array(histories, pa.list_(pa.string()))}),
                   path)
    raw = redis.Redis.from_url(redis_url, socket_timeout=5)
    with pytest.raises(BadListError, match="max_len = 8"):
        load_files(raw, schema, path, None, batch_size=10, read_rows=10, old_load_grace_s=30)
    lid = file_load_id(schema, {"user": path})
    keys = set(raw.scan_iter(match=load_pattern("rk", schema.version, lid, "user")))
    assert len(keys) == 30  # the three good batches were written, then expire
    assert all(0 < raw.ttl(k) <= 30 for k in keys)
    assert raw.get(pointer_key("rk", schema.version, "user")) is None
    assert raw.get(progress_key("rk", schema.version, lid, "user")) is None
    raw.close()


def test_prefetched_hands_over_the_producers_error() -> None:
    from service.featurestore.writer import prefetched

    def items():  # type: ignore[no-untyped-def]
        yield 1
        yield 2
        raise RuntimeError("bad batch")

    got = []
    with pytest.raises(RuntimeError, match="bad batch"):
        for x in prefetched(items()):
            got.append(x)
    assert got == [1, 2]
    assert list(prefetched(iter(range(5)), depth=1)) == [0, 1, 2, 3, 4]


def test_a_streamed_load_counts_duplicates_within_and_across_steps(
        list_model: Path, tmp_path: Path, redis_url: str) -> None:
    from service.featurestore.writer import id_hashes, load_files

    schema = load_schema(list_model, load_manifest(list_model))
    ids = [f"u{k}" for k in range(25)] + ["u3", "u3", "u24", "a-long-user-id-of-many-bytes"] * 2
    path = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user_id": ids, "country": ["us"] * len(ids),
                             "activity": [float(k) for k in range(len(ids))],
                             HISTORY_FEATURE: pa.array([["i1"]] * len(ids),
                                                       pa.list_(pa.string()))}), path)
    raw = redis.Redis.from_url(redis_url, socket_timeout=5)
    report = load_files(raw, schema, path, None, batch_size=10, read_rows=10)
    assert report.users == 26 and report.duplicate_ids == len(ids) - 26
    user = schema.group("user")
    assert user is not None
    rec = np.frombuffer(raw.get(record_key_prefix("rk", schema.version, report.load_id, "user")
                                + "u3"), user.record_dtype())
    last = pq.read_table(path).slice(len(ids) - 3, 1)  # the last row of "u3" won
    np.testing.assert_array_equal(rec["dense"], encode_table(user, last, 0.0).records["dense"])
    hashes = id_hashes(pa.array(ids))
    assert len(set(hashes.tolist())) == 26  # equal ids, equal hashes; short ids never collide
    assert id_hashes(pa.array(["u3"]))[0] == hashes[3]  # whatever the longest id beside it
    raw.close()
