"""Training from what was served: the join on a hand-built log with known labels (window edges,
orphans, duplicates, unknown tasks), the time split, the trainer fed exactly the logged inputs
(never what the feature store holds now), mixed schemas refused, and records -> exporter ->
`ranker train --from-logs` -> `ranker export` -> a model the registry loads."""

from __future__ import annotations

import asyncio
import json
import shutil
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from ranker.manifest import load_manifest, load_schema, version_dir
from ranker.schema import FeatureSchema
from ranker.servedlog import (
    FeedbackEvent,
    ServedRecord,
    encode_feedback,
    encode_served,
    feedback_stream,
    feedback_table,
    hour_partition,
    impressions_table,
    part_name,
    served_stream,
)
from service.featurestore.reader import FeatureStore, make_client
from service.featurestore.writer import load_tables, make_sync_client
from service.servedlog.exporter import Exporter
from tests.service.featurestore.tables import items_table, users_table
from tests.tiny import MODEL_NAME, TASKS, tiny_schema
from training import pipeline
from training.data import Encoded
from training.from_logs import (
    LogError,
    ips_resample,
    join_labels,
    load_served_log,
    run_training_from_logs,
)
from training.train import TrainConfig

TINY = {"n_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}
T0 = 1_796_112_000.0  # 2026-12-01T08:00:00Z


def record(rid: str, ts: float, items: Sequence[str], inputs: dict[str, np.ndarray] | None = None,
           user: str = "u1", version: int = 1, schema: FeatureSchema | None = None) -> ServedRecord:
    k = len(items)
    if inputs is None:  # default-valued inputs of the tiny schema (the join tests ignore them)
        inputs = (schema or tiny_schema()).default_inputs(k)
    rng = np.random.default_rng(zlib.crc32(rid.encode()))
    return ServedRecord(
        ts=ts, request_id=rid, user_id=user, model_name=MODEL_NAME, model_version=version,
        scoring="weighted_sum", weights=dict.fromkeys(TASKS, 1.0), context={}, tasks=tuple(TASKS),
        item_ids=list(items), scores=rng.random((k, 3)).astype(np.float32), final=rng.random(k),
        inputs=inputs,
    )


def write_log(out: Path, records: Sequence[ServedRecord],
              events: Sequence[FeedbackEvent] = ()) -> Path:
    """A log as the exporter lays it out: one file per hour per kind, made-up stream ids."""
    by_hour: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for i, r in enumerate(records):
        by_hour[f"impressions/{hour_partition(r.ts)}"].append((f"{int(r.ts * 1000)}-{i}", r))
    for i, e in enumerate(events):
        by_hour[f"feedback/{hour_partition(e.ts)}"].append((f"{int(e.ts * 1000)}-{i}", e))
    for part, items in by_hour.items():
        table = (impressions_table if part.startswith("imp") else feedback_table)(items)
        (out / part).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / part / part_name(items[0][0], items[-1][0]))
    return out


def ev(rid: str, item: str, event: str, ts: float) -> FeedbackEvent:
    return FeedbackEvent(rid, item, event, ts)


# r1 at 1000 (a, b, c), r2 at 2000 (a, d); window 100 s
JOIN_RECORDS = [record("r1", T0 + 1000, ["a", "b", "c"]), record("r2", T0 + 2000, ["a", "d"])]
JOIN_EVENTS = [
    ev("r1", "a", "click", T0 + 1000),  # at the impression: label
    ev("r1", "a", "click", T0 + 1050),  # a second click: duplicate
    ev("r1", "b", "like", T0 + 1100),  # exactly at the window's end: label
    ev("r1", "c", "share", T0 + 1100.5),  # after the window: late
    ev("r1", "c", "click", T0 + 999),  # before the impression: early
    ev("r2", "a", "share", T0 + 2010),  # label
    ev("r3", "a", "click", T0 + 3000),  # request never served: orphan
    ev("r2", "b", "click", T0 + 2001),  # item not served in r2: orphan
    ev("r2", "d", "purchase", T0 + 2001),  # not a task of the model: unknown
    ev("r2", "d", "click", T0 + 2001),  # label ...
    ev("r2", "d", "click", T0 + 2001),  # ... and the transport's duplicate of it
]


def joined(tmp_path: Path, window_s: float) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    from training.from_logs import read_feedback, read_impressions

    d = write_log(tmp_path, JOIN_RECORDS, JOIN_EVENTS)
    imp = read_impressions(sorted((d / "impressions").rglob("*.parquet")))
    fb = read_feedback(sorted((d / "feedback").rglob("*.parquet")))
    assert imp["item_id"].to_pylist() == ["a", "b", "c", "a", "d"]
    labels, keep, counts = join_labels(imp, fb, TASKS, window_s)
    return labels, keep, counts.as_dict()


def test_the_join_labels_each_impression_once_within_the_window(tmp_path: Path) -> None:
    labels, keep, c = joined(tmp_path, 100.0)
    #                  click like share
    np.testing.assert_array_equal(labels, [[1, 0, 0],   # r1 a
                                           [0, 1, 0],   # r1 b: the like at the window's end
                                           [0, 0, 0],   # r1 c: late share, early click
                                           [0, 0, 1],   # r2 a
                                           [1, 0, 0]])  # r2 d: one click of two
    assert keep.all()
    assert c["labels"] == {"click": 2, "like": 1, "share": 1}
    others = ("duplicate", "late", "early", "orphan", "unknown_task")
    assert [c[k] for k in others] == [2, 1, 1, 2, 1]
    assert c["events"] == len(JOIN_EVENTS) == sum(c["labels"].values()) + sum(
        c[k] for k in others)
    assert (c["impressions"], c["requests"], c["window_s"]) == (5, 2, 100.0)


def test_the_window_is_configurable_and_its_end_is_included(tmp_path: Path) -> None:
    labels, _, c = joined(tmp_path, 99.5)  # the like at +100 s is now late
    assert labels[1, 1] == 0 and c["late"] == 2 and c["labels"]["like"] == 0
    labels, _, c = joined(tmp_path / "wide", 1e6)  # everything after its impression counts
    assert labels[2, 2] == 1 and c["late"] == 0 and c["duplicate"] == 2


def test_an_impression_logged_twice_is_trained_on_once(tmp_path: Path) -> None:
    from training.from_logs import read_feedback, read_impressions

    d = write_log(tmp_path, [*JOIN_RECORDS, record("r1", T0 + 1001, ["a"])])
    imp = read_impressions(sorted((d / "impressions").rglob("*.parquet")))
    _, keep, counts = join_labels(imp, read_feedback([]), TASKS, 100.0)
    assert counts.duplicate_impressions == 1 and keep.sum() == 5


# --- training on the logged inputs -------------------------------------------------------------


def serve_from_store(redis_url: str, schema: FeatureSchema, n_requests: int,
                     ) -> tuple[list[ServedRecord], list[FeedbackEvent], list[list[float]]]:
    """Requests served with the features Redis holds now (as the service fetches them), the
    users' clicks/likes and the expected label rows, in time order."""
    rng = np.random.default_rng(7)
    records, events, expected = [], [], []

    async def fetch_all() -> list[tuple[str, list[str], dict[str, np.ndarray]]]:
        fs = FeatureStore(make_client(redis_url, socket_timeout_s=2.0), schema)
        try:
            out = []
            for r in range(n_requests):
                user = f"u{1 + r % 9}"
                items = [f"i{j}" for j in rng.choice(30, 4, replace=False)]
                res = await fs.fetch(user, items, timeout_s=2.0)
                ctx = schema.context_inputs({"hour": r % 24, "surface": "home"})
                out.append((user, items, {**res.inputs, **ctx}))
            return out
        finally:
            await fs.aclose()

    for r, (user, items, inputs) in enumerate(asyncio.run(fetch_all())):
        ts = T0 + 60.0 * r
        records.append(record(f"q{r}", ts, items, inputs, user=user))
        for p, item in enumerate(items):
            row = [0.0, 0.0, 0.0]
            if (r + p) % 3 == 0:
                events.append(ev(f"q{r}", item, "click", ts + 5))
                row[0] = 1.0
            if (r + p) % 4 == 0:
                events.append(ev(f"q{r}", item, "like", ts + 30))
                row[1] = 1.0
            if p == 0 and r % 2:
                events.append(ev(f"q{r}", item, "share", ts + 7200))  # late for 3600 s
            expected.append(row)
    return records, events, expected


def logged_rows(records: Sequence[ServedRecord], name: str) -> np.ndarray:
    """One input of the log, one row per served item, user/context rows repeated."""
    return np.concatenate([np.repeat(r.inputs[name], len(r.item_ids), 0)
                           if r.inputs[name].shape[0] == 1 else r.inputs[name] for r in records])


def record_fits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Encoded, Encoded]]:
    """The (train, val) splits each `pipeline.fit` call of the test gets, in order."""
    seen: list[tuple[Encoded, Encoded]] = []
    fit = pipeline.fit

    def recording_fit(cfg: Any, train: Encoded, val: Encoded, tc: TrainConfig,
                      **kw: Any) -> Any:
        seen.append((train, val))
        return fit(cfg, train, val, tc, **kw)

    monkeypatch.setattr(pipeline, "fit", recording_fit)
    return seen


def test_trains_on_the_logged_inputs_never_on_the_features_written_after(
    redis_url: str, pristine_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vdir = version_dir(pristine_models, MODEL_NAME, 1)
    schema = load_schema(vdir, load_manifest(vdir))
    client = make_sync_client(redis_url)
    load_tables(client, schema, users_table(activity_scale=1.0), items_table())
    records, events, expected = serve_from_store(redis_url, schema, 30)
    log_dir = write_log(tmp_path / "log", records, events)
    # after serving, the features change: activity x5, every item ten days older
    later_items = items_table().set_column(2, "age_days", pa.array(
        [float(i) + 10.0 for i in range(30)]))
    load_tables(client, schema, users_table(activity_scale=5.0), later_items)
    client.close()
    now = asyncio.run(_fetch_now(redis_url, schema, records[0]))
    assert not np.array_equal(now["user_dense"], records[0].inputs["user_dense"])
    assert not np.array_equal(now["item_dense"], records[0].inputs["item_dense"])

    seen = record_fits(monkeypatch)
    report = run_training_from_logs(log_dir, tmp_path / "run", TINY,
                                    TrainConfig(epochs=1, progress=False), repo=pristine_models,
                                    baselines=False)
    (train, val), = seen
    n_train, n_val = 24 * 4, 3 * 4  # 80 % / 10 % of 30 requests of 4 items, in time order
    assert (len(train), len(val)) == (n_train, n_val)
    for name in schema.input_names():
        want = logged_rows(records, name)
        np.testing.assert_array_equal(train.inputs[name], want[:n_train], err_msg=name)
        np.testing.assert_array_equal(val.inputs[name], want[n_train:n_train + n_val])
    np.testing.assert_array_equal(train.labels, np.array(expected[:n_train], np.float32))
    # and not what the store holds now for the same user and items
    assert not np.array_equal(train.inputs["user_dense"][:1], now["user_dense"])
    assert not np.array_equal(train.inputs["item_dense"][:4], now["item_dense"])

    c = report["from_logs"]["counts"]
    assert c["labels"] == {t: int(np.array(expected)[:, j].sum()) for j, t in enumerate(TASKS)}
    assert c["late"] == 15 and c["orphan"] == 0 and c["impressions"] == 120
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Served log" in md and "| 120 | 30 |" in md and "window" in md
    split = report["from_logs"]["split_ts"]
    assert split["train"][1] < split["val"][0] <= split["val"][1] < split["test"][0]
    assert set(report["models"]["mmoe"]["test"]) >= set(TASKS)


async def _fetch_now(redis_url: str, schema: FeatureSchema,
                     rec: ServedRecord) -> dict[str, np.ndarray]:
    fs = FeatureStore(make_client(redis_url, socket_timeout_s=2.0), schema)
    try:
        return (await fs.fetch(rec.user_id, list(rec.item_ids), timeout_s=2.0)).inputs
    finally:
        await fs.aclose()


def test_a_log_of_two_schemas_is_refused_naming_the_versions(
    pristine_models: Path, tmp_path: Path
) -> None:
    import torch

    from tests.tiny import golden_inputs
    from training.export import export_model
    from training.model import ModelConfig, MultiTaskModel, inputs_from_schema

    repo = tmp_path / "models"
    shutil.copytree(pristine_models / MODEL_NAME / "1", repo / MODEL_NAME / "1")
    wider = tiny_schema(n_users=60)  # another vocabulary: another schema version
    torch.manual_seed(0)
    model = MultiTaskModel(ModelConfig(inputs=inputs_from_schema(wider), tasks=TASKS, **TINY))
    export_model(model, wider, repo, MODEL_NAME, golden_inputs(wider))
    log_dir = write_log(tmp_path / "log", [
        record("a", T0, ["i1"]), record("b", T0 + 1, ["i2"], version=2, schema=wider),
        record("c", T0 + 2, ["i3"])])
    with pytest.raises(LogError, match=r"mixes feature schemas.*mmoe/1.*mmoe/2"):
        load_served_log(log_dir, repo)
    with pytest.raises(LogError, match="mmoe/1"):
        load_served_log(log_dir, tmp_path / "empty-repo")


def test_the_split_is_by_time_with_validation_after_training(
    pristine_models: Path, tmp_path: Path
) -> None:
    recs = [record(f"r{i}", T0 + 10 * (19 - i), ["i1", "i2"]) for i in range(20)]  # written
    served = load_served_log(write_log(tmp_path, recs), pristine_models)     # newest first
    assert {s: len(e) for s, e in served.splits.items()} == {"train": 32, "val": 4, "test": 4}
    assert served.ts["train"] == (T0, T0 + 150) and served.ts["test"] == (T0 + 180, T0 + 190)
    assert served.counts.window_open == 40  # no feedback: every window outlasts the log
    # the served positions ride along, for --position-tower (a training-only input)
    np.testing.assert_array_equal(served.splits["test"].inputs["position"], [0, 1, 0, 1])


def test_propensities_follow_their_impressions_into_the_splits(
    pristine_models: Path, tmp_path: Path
) -> None:
    import dataclasses

    recs = [dataclasses.replace(record(f"r{i}", T0 + 10 * i, ["i1", "i2"]),
                                propensity=np.array([0.9, 0.05 + i / 100]))
            for i in range(20)]
    served = load_served_log(write_log(tmp_path / "new", recs), pristine_models)
    np.testing.assert_allclose(served.propensity["test"], [0.9, 0.23, 0.9, 0.24])
    # a log of a service that does not explore: all 1, and resampling leaves the split alone
    plain = load_served_log(write_log(tmp_path / "old", [record(f"r{i}", T0 + i, ["i1"])
                                                          for i in range(10)]), pristine_models)
    assert np.all(plain.propensity["train"] == 1.0)
    same, stats = ips_resample(plain.splits["train"], plain.propensity["train"], 10.0, 0)
    assert same is plain.splits["train"] and stats == {"applied": 0.0}


def test_a_position_tower_trains_on_the_served_positions(pristine_models: Path,
                                                         tmp_path: Path) -> None:
    import dataclasses

    recs = [dataclasses.replace(record(f"r{i}", T0 + 10 * i, ["i1", "i2", "i3"]),
                                propensity=np.array([0.9, 0.5, 0.1]))
            for i in range(30)]
    events = [ev(f"r{i}", "i1", "click", T0 + 10 * i + 1) for i in range(0, 30, 2)]
    report = run_training_from_logs(write_log(tmp_path / "log", recs, events), tmp_path / "run",
                                    {**TINY, "position_buckets": 3},
                                    TrainConfig(epochs=1, progress=False), repo=pristine_models,
                                    baselines=False)
    assert report["config"]["position_buckets"] == 3
    assert report["from_logs"]["ips"]["applied"] == 1.0
    assert (tmp_path / "run" / "model.pt").exists()


def test_ips_resampling_draws_rows_in_proportion_to_their_clipped_weights() -> None:
    n = 20_000
    data = Encoded({"x": np.arange(n)[:, None]}, np.zeros((n, 3), np.float32), None)
    # half shown by the greedy policy (p = 1), half only when exploring: p 0.05, clipped to 10
    p = np.where(np.arange(n) < n // 2, 1.0, 0.05)
    out, stats = ips_resample(data, p, 10.0, seed=3)
    assert len(out) == n and stats["clipped_share"] == 0.5 and stats["propensity_min"] == 0.05
    drawn_rare = float(np.mean(out.inputs["x"][:, 0] >= n // 2))
    assert abs(drawn_rare - 10 / 11) < 4 * (10 / 11 / 11 / n) ** 0.5  # weights 10 : 1
    assert 0 < stats["effective_rows"] < n
    unclipped, _ = ips_resample(data, p, 100.0, seed=3)  # 1/0.05 = 20 : 1
    assert abs(float(np.mean(unclipped.inputs["x"][:, 0] >= n // 2)) - 20 / 21) < 0.01
    assert ips_resample(data, p, 0.0, seed=3)[0] is data  # 0 = off


# --- end to end ----------------------------------------------------------------------------------


def test_records_exporter_train_export_serve(
    redis_url: str, model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from launch.train import export_main, train_main
    from service.registry import ModelRegistry

    schema = load_schema(version_dir(model_repo, MODEL_NAME, 1),
                         load_manifest(version_dir(model_repo, MODEL_NAME, 1)))
    client = make_sync_client(redis_url)
    load_tables(client, schema, users_table(), items_table())
    records, events, _ = serve_from_store(redis_url, schema, 40)
    for r in records:  # what the service's log writer does: XADD each record and event
        client.xadd(served_stream("rk"), encode_served(r))  # type: ignore[arg-type]
    for e in events:
        client.xadd(feedback_stream("rk"), encode_feedback(e))  # type: ignore[arg-type]
    rep = Exporter(redis.Redis.from_url(redis_url), tmp_path / "log", prefix="rk", batch=16,
                   block_ms=50).run(until_empty=True)
    client.close()
    assert rep.impressions.rows == 160 and rep.feedback.rows == len(events)

    run = tmp_path / "run"
    assert train_main(["--from-logs", str(tmp_path / "log"), "--model-repo", str(model_repo),
                       "--out", str(run), "--epochs", "2", "--no-baselines", "--no-progress",
                       "--experts", "2", "--expert-hidden", "8", "--tower-hidden", "4",
                       "--window-s", "3600"]) == 0
    assert "## Served log" in capsys.readouterr().out
    assert export_main(["--run", str(run), "--repo", str(model_repo)]) == 0
    manifest = load_manifest(version_dir(model_repo, MODEL_NAME, 2))
    assert manifest.training_data["dataset"] == "served-log"
    assert manifest.features["version"] == schema.version  # same inputs: no feature reload
    registry = ModelRegistry(model_repo, MODEL_NAME, warmup_sizes=(1,))
    result = registry.reload()
    assert result.result == "success", result
    loaded = registry.current
    assert loaded is not None and loaded.version == 2
    scores, _ = loaded.run(dict(records[-1].inputs))
    assert scores.shape == (4, 3) and np.isfinite(scores).all()
    assert json.loads((run / "report.json").read_text())["from_logs"]["counts"]["late"] > 0


# --- warm start and the union with the offline data --------------------------------------------


def _v1_checkpoint(run: Path, schema: FeatureSchema, seed: int = 5, **model_kw: Any) -> Any:
    """A run directory holding a model.pt of the serving schema (as `ranker train` writes)."""
    import torch

    from training.model import ModelConfig, MultiTaskModel, inputs_from_schema
    from training.train import save_checkpoint

    torch.manual_seed(seed)
    model = MultiTaskModel(ModelConfig(inputs=inputs_from_schema(schema), tasks=TASKS,
                                       **{**TINY, **model_kw}))
    run.mkdir(parents=True)
    save_checkpoint(run / pipeline.CHECKPOINT, model, features=schema.describe(),
                    vocab=schema.vocabularies(), model_name=MODEL_NAME,
                    training_data={"dataset": "synthetic"})
    return model.state_dict()


def _clicky_log(out: Path, n: int = 30) -> Path:
    recs = [record(f"r{i}", T0 + 10 * i, ["i1", "i2", "i3"]) for i in range(n)]
    return write_log(out, recs, [ev(f"r{i}", "i1", "click", T0 + 10 * i + 1)
                                 for i in range(0, n, 2)])


def test_init_from_warm_starts_the_model_from_the_serving_models_weights(
    pristine_models: Path, tmp_path: Path
) -> None:
    import torch

    schema = load_schema(version_dir(pristine_models, MODEL_NAME, 1),
                         load_manifest(version_dir(pristine_models, MODEL_NAME, 1)))
    v1 = _v1_checkpoint(tmp_path / "v1", schema)
    log_dir = _clicky_log(tmp_path / "log")

    def trained(out: str, lr: float, **kw: Any) -> dict[str, torch.Tensor]:
        report = run_training_from_logs(log_dir, tmp_path / out, TINY,
                                        TrainConfig(epochs=1, lr=lr, progress=False),
                                        repo=pristine_models, baselines=False, **kw)
        assert ("init_from" in report["from_logs"]) == ("init_from" in kw)
        state: dict[str, torch.Tensor] = torch.load(tmp_path / out / "model.pt",
                                                    weights_only=True)["state_dict"]
        return state

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # lr 0: training leaves the weights where they started -- v1's, when warm-started
    assert same(trained("warm0", 0.0, init_from=tmp_path / "v1"), v1)
    assert not same(trained("cold0", 0.0), v1)  # a cold start is another init
    warm = trained("warm", 2e-3, init_from=tmp_path / "v1" / "model.pt")  # the file works too
    assert not same(warm, v1)  # and it trains from there
    md = (tmp_path / "warm" / "report.md").read_text()
    assert "Warm-started from" in md and "trained on synthetic" in md


def test_init_from_refuses_another_architecture_or_schema(
    pristine_models: Path, tmp_path: Path
) -> None:
    schema = load_schema(version_dir(pristine_models, MODEL_NAME, 1),
                         load_manifest(version_dir(pristine_models, MODEL_NAME, 1)))
    _v1_checkpoint(tmp_path / "v1", schema)
    _v1_checkpoint(tmp_path / "wider", tiny_schema(n_users=60))
    log_dir = _clicky_log(tmp_path / "log")
    tc = TrainConfig(epochs=1, progress=False)
    with pytest.raises(LogError, match="do not fit the model"):
        run_training_from_logs(log_dir, tmp_path / "a", {**TINY, "n_experts": 3}, tc,
                               repo=pristine_models, baselines=False, init_from=tmp_path / "v1")
    with pytest.raises(LogError, match="feature schema"):
        run_training_from_logs(log_dir, tmp_path / "b", TINY, tc, repo=pristine_models,
                               baselines=False, init_from=tmp_path / "wider")
    with pytest.raises(LogError, match=r"no model\.pt"):
        run_training_from_logs(log_dir, tmp_path / "c", TINY, tc, repo=pristine_models,
                               baselines=False, init_from=tmp_path / "nothing")


def test_with_data_trains_on_the_log_plus_the_offline_data_encoded_with_the_serving_schema(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.tiny import export_tiny_model
    from training.data import build_schema, encode_split, load_raw
    from training.spec import load_spec

    spec = load_spec("synthetic")
    raw = load_raw(spec, small_data)
    repo = tmp_path / "models"
    export_tiny_model(repo, name=MODEL_NAME, schema=build_schema(spec, raw))
    served_schema = load_schema(version_dir(repo, MODEL_NAME, 1),
                                load_manifest(version_dir(repo, MODEL_NAME, 1)))
    users = raw.users
    assert users is not None
    uids = users["user_id"].to_pylist()[:5]
    recs = [record(f"r{i}", T0 + 10 * i, ["i1", "i2"], user=uids[i % 5], schema=served_schema)
            for i in range(20)]
    log_dir = write_log(tmp_path / "log", recs, [ev("r0", "i1", "click", T0 + 1)])

    seen = record_fits(monkeypatch)
    report = run_training_from_logs(log_dir, tmp_path / "run", TINY,
                                    TrainConfig(epochs=1, progress=False), repo=repo,
                                    baselines=False, with_data=small_data)
    (train, val), = seen
    n_off = {s: raw.splits[s].num_rows for s in ("train", "val")}
    log_rows = report["training_data"]["rows"]
    assert (log_rows["train"], log_rows["val"]) == (32, 4)  # 16 and 2 requests of 2 items
    assert len(train) == 32 + n_off["train"] and len(val) == 4 + n_off["val"]
    assert report["training_data"]["trained_on"] == {"train": len(train), "val": len(val)}
    assert report["from_logs"]["with_data"]["rows"] == n_off
    assert report["models"]["mmoe"]["test"]  # the test split is the log's: 4 rows
    # the log's rows first, as logged; then the offline rows, encoded with the served schema
    offline = encode_split(spec, served_schema, raw, "train")
    for name in served_schema.input_names():
        np.testing.assert_array_equal(train.inputs[name][:32], logged_rows(recs[:16], name))
        np.testing.assert_array_equal(train.inputs[name][32:], np.asarray(offline.inputs[name]),
                                      err_msg=name)
    np.testing.assert_array_equal(train.labels[32:], offline.labels)
    assert "position" not in train.inputs  # the offline log has no served positions
    assert "Trained on the union" in (tmp_path / "run" / "report.md").read_text()
    with pytest.raises(LogError, match="position"):
        run_training_from_logs(log_dir, tmp_path / "pos", {**TINY, "position_buckets": 3},
                               TrainConfig(epochs=1, progress=False), repo=repo,
                               baselines=False, with_data=small_data)
    # unless the offline rows are given a position: the log's positions, then theirs
    seen.clear()
    run_training_from_logs(log_dir, tmp_path / "pos0", {**TINY, "position_buckets": 3},
                           TrainConfig(epochs=1, progress=False), repo=repo, baselines=False,
                           with_data=small_data, with_data_position=0)
    (train, _), = seen
    np.testing.assert_array_equal(train.inputs["position"][:4], [0, 1, 0, 1])
    assert len(train) == 32 + n_off["train"] and not train.inputs["position"][32:].any()
