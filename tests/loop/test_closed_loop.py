"""The loop, end to end, on the small world: model v1 served with the served log at 100 % ->
`ranker simulate` -> `ranker logs export` -> `ranker train --from-logs` -> `ranker export` ->
`POST /admin/reload` -> v2 served -> `ranker simulate` on the same requests -> export again.

Real redis-server, one real `ranker serve` (uvicorn) process, the real commands (`bench.loop`
calls each with its argv). The counts must add up through every step: a record lost or written
twice, a broken join, a label on the wrong task or v2 not served fails one of them. Quality is
only asked to be better than random here (small worlds are noisy); the strong claims are in the
report of `python -m bench.loop` at the default size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.loop import LoopConfig, run_loop

TASKS = ("click", "like", "share")


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("loop")
    cfg = LoopConfig(workdir=work, data_dir=work / "data", small=True, train_requests=600,
                     eval_requests=150, eval_seeds=2, candidates=40, top_k=8, concurrency=3,
                     max_seconds=120.0, epochs=2, explore_rate=0.2,
                     model_args=("--init-from", "{v1_run}", "--with-data", "{data_dir}"))
    # exploring training traffic: the restart and IPS paths run too; v2 warm-starts from v1's
    # checkpoint (kept in WORKDIR/runs/v1) and trains on the log plus v1's offline data
    return run_loop(cfg)


def failed(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in result["checks"] if not c["ok"]]


def test_every_count_adds_up_through_every_step(loop: dict[str, Any]) -> None:
    assert not failed(loop), failed(loop)
    names = " | ".join(c["check"] for c in loop["checks"])
    # the checks that were made (a refactor that drops one must fail here)
    for what in ("impression rows = impressions served", "feedback rows = events sent",
                 "impressions joined = impressions served", "labels per task = events drawn",
                 "labels + unknown_task + orphan + early + late + duplicate = events",
                 "every answer names mmoe/2", "GET /model names the new version",
                 "held-out rows = the test rows", "v2's impression rows = impressions served",
                 "records dropped"):
        assert what in names, what
    train = loop["simulate"]["train"]
    exported = loop["export"]["train"]
    joined = loop["from_logs"]["counts"]
    assert train["answered"] == 600 and train["impressions"] == 600 * 8
    assert exported["impressions"]["rows"] == train["impressions"] == joined["impressions"]
    events = sum(train["events"].values())
    assert events > 0
    assert exported["feedback"]["rows"] == train["feedback"]["accepted_events"] == events
    assert joined["events"] == events and joined["labels"] == train["events"]
    assert (sum(joined["labels"].values()) + joined["unknown_task"] + joined["orphan"]
            + joined["early"] + joined["late"] + joined["duplicate"]) == joined["events"]
    assert joined["late"] == joined["orphan"] == joined["duplicate"] == 0
    assert sum(loop["v2_rows"].values()) == joined["impressions"]


def test_the_training_traffic_explored_and_v2_was_trained_on_its_propensities(
    loop: dict[str, Any]
) -> None:
    assert 0 < loop["explored_requests"] < 600
    ips = loop["from_logs"]["ips"]
    # the greedy top 8 of 40: 0.8 + 0.2 * 8/40; an item only the exploring 20 % shows: 0.04
    assert ips["applied"] == 1.0 and ips["propensity_min"] == pytest.approx(0.04)
    assert 0 < ips["effective_rows"] < loop["v2_rows"]["train"]


def test_v2_warm_started_from_v1_and_trained_on_the_union(loop: dict[str, Any]) -> None:
    work = Path(loop["config"]["workdir"])
    f = loop["from_logs"]
    assert f["init_from"]["checkpoint"] == str(work / "runs" / "v1" / "model.pt")
    assert f["init_from"]["training_data"] == "synthetic"
    offline = f["with_data"]["rows"]
    assert f["with_data"]["data_dir"] == loop["config"]["data_dir"] and offline["train"] > 0
    rows = json.loads((work / "runs" / "v2" / "report.json").read_text())["training_data"]
    # the log's train split is resampled (IPS) to its own size: the union adds the offline rows
    assert rows["trained_on"] == {"train": loop["v2_rows"]["train"] + offline["train"],
                                  "val": loop["v2_rows"]["val"] + offline["val"]}


def test_v2_is_served_after_the_reload(loop: dict[str, Any]) -> None:
    assert loop["versions"] == {"v1": 1, "v2": 2, "served_after_reload": 2}
    for s in loop["simulate"]["eval_v1"]:
        assert s["model_versions"] == {"mmoe/1": s["answered"]}
    for s in loop["simulate"]["eval_v2"]:
        assert s["model_versions"] == {"mmoe/2": s["answered"]} and s["answered"] == 150
    # v2's own traffic came back through the log, under its version
    assert loop["eval_auc"]["v2"]["click"]["impressions"] == 2 * 150 * 8


def test_the_online_rates_under_v2_are_computed_and_beat_random(loop: dict[str, Any]) -> None:
    on = loop["online"]
    for v in ("v1", "v2"):
        assert on[v]["impressions"] == 2 * 150 * 8
        ex = on[v]["expected"]
        for k in (*TASKS, "weighted"):
            assert ex["oracle"][k] >= ex["served"][k] > 0
            assert ex["oracle"][k] > ex["random"][k]
        for t in TASKS:
            assert on[v]["rates"][t] == on[v]["events"][t] / on[v]["impressions"]
            assert on[v]["events_sd"][t] > 0
        # a model trained from the logged feedback ranks better than a random order
        assert ex["served"]["weighted"] > ex["random"]["weighted"]
    cmp_ = on["comparison"]
    for t in TASKS:
        assert cmp_[t]["events_v2"] == on["v2"]["events"][t] and math.isfinite(cmp_[t]["sd"])
        assert len(cmp_[t]["expected_served_diff"]["per_seed"]) == 2


def test_v2_auc_on_held_out_impressions_is_reported_next_to_the_oracle(
        loop: dict[str, Any]) -> None:
    held = loop["heldout_auc"]
    assert held["rows"] == loop["v2_rows"]["test"] > 0
    click = held["per_task"]["click"]
    assert click["positives"] > 0
    for key in ("v2_auc", "v1_auc", "oracle_auc"):
        assert 0.5 < click[key] <= 1.0, (key, click)  # click has positives: defined, above chance
    assert click["v2_auc"] == loop["v2_test"]["click"]["auc"]


def test_the_report_is_written(loop: dict[str, Any], tmp_path: Path) -> None:
    from bench.loop_report import write_report

    paths = write_report(loop, tmp_path, "loop-test")
    assert [p.stat().st_size > 0 for p in paths] == [True, True, True]
    md = paths[1].read_text()
    assert "## AUC on held-out logged impressions" in md and "| weighted |" in md
