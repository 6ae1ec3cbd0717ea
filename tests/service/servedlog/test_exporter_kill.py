"""Exactly-once output under real crashes: the exporter runs as its own process, is SIGKILLed
(at seeded random moments while a producer writes, and right between the two renames of a batch
that spans two hours), restarted, and every stream entry is in the Parquet output exactly once."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from ranker.servedlog import FeedbackEvent, feedback_stream, served_stream
from tests.service.servedlog.helpers import (
    HOUR0,
    PREFIX,
    REPO_ROOT,
    parts,
    served,
    stream_id_counts,
    subprocess_env,
    xadd_feedback,
    xadd_served,
)


def exporter_cmd(url: str, out: Path, *extra: str, entry: str = "launch.logs") -> list[str]:
    """`python -m launch.logs export ...`, or with entry="launch.cli logs" the ranker command."""
    return [sys.executable, "-m", *entry.split(), "export", "--out", str(out), "--redis-url", url,
            "--batch", "7", "--block-ms", "20", *extra]


def drain(url: str, out: Path) -> dict:
    """A last run to the end of both streams; its JSON summary."""
    res = subprocess.run(exporter_cmd(url, out, "--until-empty"), capture_output=True, text=True,
                         timeout=120, env=subprocess_env(), cwd=REPO_ROOT, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def assert_exactly_once(out: Path, served_ids: dict[str, int], feedback_ids: list[str]) -> None:
    imp = stream_id_counts(out, "impressions")
    want = {f"{sid}#{p}" for sid, k in served_ids.items() for p in range(k)}
    assert set(imp) == want, (sorted(want - set(imp))[:5], sorted(set(imp) - want)[:5])
    assert max(imp.values(), default=1) == 1, [k for k, v in imp.items() if v > 1][:5]
    fb = stream_id_counts(out, "feedback")
    assert set(fb) == set(feedback_ids) and max(fb.values(), default=1) == 1
    assert not list(out.rglob(".tmp-*"))


def test_a_crash_between_the_two_renames_of_a_batch_loses_and_duplicates_nothing(
    redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    # 7 records (one batch): 4 in the 07 hour, 3 in the 08 hour
    recs = [served(i, HOUR0 - 40 + 10 * i) for i in range(7)]
    ids = {xadd_served(client, r): len(r.item_ids) for r in recs}
    cmd = [sys.executable, "-m", "tests.service.servedlog.crashing", "1", "export", "--out",
           str(tmp_path), "--redis-url", redis_url, "--batch", "7", "--until-empty"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=subprocess_env(),
                         cwd=REPO_ROOT, check=False)
    assert res.returncode == -9, res.stderr[-2000:]  # SIGKILLed after its first rename
    committed = parts(tmp_path, "impressions")
    assert [f.parent.name for f in committed] == ["hour=2026-12-01T07"]
    assert client.xpending(served_stream(PREFIX), "exporter")["pending"] == 7  # never acked
    rep = drain(redis_url, tmp_path)
    assert rep["impressions"]["already_written"] == 4  # the 07 file's entries, recognised
    assert rep["impressions"]["entries"] == 7 and rep["impressions"]["files"] == 1
    assert_exactly_once(tmp_path, ids, [])
    assert client.xpending(served_stream(PREFIX), "exporter")["pending"] == 0


def test_sigkilled_at_random_moments_and_restarted_nothing_is_lost_or_twice(
    redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    rng = random.Random(15)
    served_ids: dict[str, int] = {}
    feedback_ids: list[str] = []
    producing = threading.Event()
    producing.set()
    producer_client = redis.Redis.from_url(redis_url, socket_timeout=5.0)

    def produce() -> None:  # records every 50 s of log time, written while the exporter dies
        i = 0
        while producing.is_set() and i < 5000:
            rec = served(i, HOUR0 + 50.0 * i)
            served_ids[xadd_served(producer_client, rec)] = len(rec.item_ids)
            feedback_ids.append(xadd_feedback(producer_client, FeedbackEvent(
                f"r{i}", f"i{i}-0", "click", rec.ts + 1)))
            i += 1
            time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    pending_after_kill: list[int] = []  # entries delivered to a killed run and not acked
    try:
        for _ in range(6):  # the producer runs until the last kill: every run has work
            before = len(list(tmp_path.rglob("part-*.parquet")))
            proc = subprocess.Popen(exporter_cmd(redis_url, tmp_path, entry="launch.cli logs"),
                                    env=subprocess_env(), cwd=REPO_ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 60
                # wait until this run has committed something, then kill it a moment later
                while len(list(tmp_path.rglob("part-*.parquet"))) <= before:
                    assert proc.poll() is None, "the exporter exited by itself"
                    assert time.monotonic() < deadline, "the exporter committed nothing in 60 s"
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.08))
            finally:
                proc.kill()
                proc.wait(timeout=30)
            pending_after_kill.append(sum(client.xpending(k, "exporter")["pending"]
                                          for k in (served_stream(PREFIX),
                                                    feedback_stream(PREFIX))))
    finally:
        producing.clear()
        producer.join(timeout=60)
        producer_client.close()
    rep = drain(redis_url, tmp_path)
    # kills that caught a batch delivered and not acked: the case at-least-once replays
    assert any(pending_after_kill), pending_after_kill
    assert_exactly_once(tmp_path, served_ids, feedback_ids)
    for key in (served_stream(PREFIX), feedback_stream(PREFIX)):
        assert client.xpending(key, "exporter")["pending"] == 0
    assert len({f.parent.name for f in parts(tmp_path, "impressions")}) >= 2  # 72 records/hour
    assert rep["impressions"]["dead_letter"] == 0


def test_sigterm_finishes_the_batch_in_hand_and_reports(
    redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    ids = {xadd_served(client, r): len(r.item_ids) for r in (served(i, HOUR0) for i in range(30))}
    proc = subprocess.Popen(exporter_cmd(redis_url, tmp_path, "--block-ms", "100"),
                            env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(stream_id_counts(tmp_path, "impressions")) < sum(ids.values()) or client.xpending(
                served_stream(PREFIX), "exporter")["pending"]:  # all written, and acked
            assert proc.poll() is None and time.monotonic() < deadline, "no export in 60 s"
            time.sleep(0.01)
        proc.terminate()  # idle now, blocked in XREADGROUP: stops within --block-ms
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["impressions"]["entries"] == 30
    assert_exactly_once(tmp_path, ids, [])
