"""The workers bench's bookkeeping: wrk's summary, per-worker CPU, the ratios and the bound.

The measurement itself (two uvicorn servers, wrk, Redis) is a benchmark, not a test; these are
its pure parts, which decide what the report says.
"""

from __future__ import annotations

import pytest

from bench import workers_bench as wb


def test_parse_wrk_counts_only_successes_as_throughput() -> None:
    out = (
        "Running 5s test @ http://127.0.0.1:1/rank\n"
        'WRKJSON {"requests": 1000, "duration_us": 5000000, "bytes": 1, "connect": 0, "read": 0,'
        ' "write": 0, "status": 10, "timeout": 2, "p50_us": 1500, "p90_us": 3000,'
        ' "p99_us": 9000, "mean_us": 1800.5, "max_us": 20000}\n'
    )
    got = wb.parse_wrk(out)
    assert got["ok"] == 990 and got["completed_total"] == 1000
    assert got["rps"] == pytest.approx(198.0)
    assert got["errors"] == {"status": 10, "timeout": 2}
    assert got["p50_ms"] == 1.5 and got["p99_ms"] == 9.0


def test_cpu_split_separates_the_workers_from_the_rest_of_the_group() -> None:
    before = {10: 1.0, 11: 2.0, 12: 2.0, 13: 0.0}
    after = {10: 1.1, 11: 6.0, 12: 4.0, 13: 0.0}  # supervisor 10, workers 11 and 12, tracker 13
    got = wb.cpu_split(before, after, 5.0, workers=[11, 12])
    assert got["workers_cores"] == [0.8, 0.4]
    assert got["supervisor_cores"] == pytest.approx(0.02)
    assert got["total_s"] == pytest.approx(6.1)
    one = wb.cpu_split({20: 0.0}, {20: 4.5}, 5.0, workers=[20])  # one worker: the leader serves
    assert one["workers_cores"] == [0.9] and one["supervisor_cores"] == 0.0


def point(design: str, workers: int, rps: float) -> dict[str, object]:
    return {"design": design, "workers": workers, "rps": rps, "server_cpu_ms_per_req": 1.0,
            "redis_cpu_ms_per_req": 0.2, "loadgen_cpu_ms_per_req": 0.05}


def test_ratios_pair_consecutive_runs_and_judge_the_median() -> None:
    pts = [point("wrk", 1, 800), point("wrk", 2, 1360), point("wrk", 2, 1200),
           point("wrk", 1, 800), point("py", 1, 700), point("py", 2, 900)]
    got = wb.ratios(pts)
    assert got["wrk"]["pairs"] == [1.7, 1.5]
    assert got["wrk"]["ratio"]["median"] == pytest.approx(1.6) and got["wrk"]["met"]
    assert not got["py"]["met"]


def test_the_cpu_bound_counts_redis_and_the_load_generator_on_two_cores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wb.os, "sched_getaffinity", lambda pid: {0, 1})
    two = point("wrk", 2, 1300) | {"server_cpu_ms_per_req": 1.1}  # a second process costs
    got = wb.cpu_ceiling([point("wrk", 1, 900), two])["wrk"]
    assert got["w1_bound_rps"] == pytest.approx(1000.0)  # one core: 1 / 1.0 ms
    assert got["w2_bound_rps"] == pytest.approx(2000 / 1.35)  # two cores: 2 / (1.1 + 0.25) ms
    assert got["ratio_bound"] == pytest.approx(2 / 1.35)
    assert wb.cpu_ceiling([point("wrk", 1, 900)]) == {}  # no 2-worker point, no bound
