"""List features (a user's recent items) through load, fetch and /rank: real redis-server, real
onnxruntime, the real app factory (issue 20)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
import redis

from ranker.examples import HISTORY_FEATURE, tiny_list_schema
from ranker.manifest import load_manifest, load_schema
from ranker.schema import FeatureSchema
from service.featurestore.keys import pointer_key, record_key_prefix
from service.featurestore.reader import FeatureStore, make_client
from service.featurestore.writer import BadListError, load_tables
from tests.service.helpers import CANDS, feature_tables, running_app
from tests.support import settings_for
from tests.tiny import MODEL_NAME, export_tiny_model

pytestmark = pytest.mark.asyncio

HISTORIES: list[list[str] | None] = [
    ["i3", "i7", "i9"],  # x0
    ["i3", "i7", "i9"],  # x1: the same history as x0
    [],  # x2: an empty history (a new user)
    None,  # x3: no history at all (null)
    ["i1", "nope", "i2"],  # x4: one id the model does not know (dropped like padding)
    ["i10"] * 6,  # x5: exactly the cap
]


@pytest.fixture(scope="module")
def list_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("list_models")
    export_tiny_model(repo, name=MODEL_NAME, schema=tiny_list_schema(max_len=6))
    return repo


def schema_of(repo: Path) -> FeatureSchema:
    vdir = repo / MODEL_NAME / "1"
    return load_schema(vdir, load_manifest(vdir))


def users_with_history(histories: list[list[str] | None] = HISTORIES) -> pa.Table:
    # users x0..: ids outside the vocabulary and the same raw features, so that only their
    # histories can tell them apart
    n = len(histories)
    return pa.table({
        "user_id": [f"x{k}" for k in range(n)],
        "country": ["us"] * n,
        "activity": [3.0] * n,
        HISTORY_FEATURE: pa.array(histories, pa.list_(pa.string())),
    })


def load(url: str, schema: FeatureSchema, users: pa.Table, **kw: object):  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return load_tables(client, schema, users, feature_tables()[1], **kw)  # type: ignore[arg-type]
    finally:
        client.close()


@pytest.fixture
async def client(list_repo: Path, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    report = load(redis_url, schema_of(list_repo), users_with_history())
    assert report.list_ids == 3 + 3 + 0 + 0 + 3 + 6  # present ids ("nope" among them)
    assert report.list_unknown_ids == 1
    async with running_app(settings_for(list_repo, redis_url)) as c:
        yield c


async def rank(client: httpx.AsyncClient, user: str, cands: list[str] = CANDS) -> dict:
    r = await client.post("/rank", json={"user_id": user, "candidates": cands})
    assert r.status_code == 200, r.text
    return r.json()


def scores(body: dict) -> dict[str, float]:
    return {it["id"]: it["scores"]["click"] for it in body["items"]}


async def test_rank_uses_the_history_and_a_user_without_one_is_served(client) -> None:
    with_history, twin = await rank(client, "x0"), await rank(client, "x1")
    empty, null, unknown = await rank(client, "x2"), await rank(client, "x3"), await rank(
        client, "nobody")
    assert scores(with_history) == scores(twin)  # same features, same history
    assert scores(empty) == scores(null)  # an empty and a missing history are the same default
    assert scores(with_history) != scores(empty)  # the history reaches the model
    for body in (with_history, empty, null):
        assert body["defaulted"] == {"user": 0, "items": 0, "stale": 0}
    assert unknown["defaulted"]["user"] == 1  # an unknown user: every feature default
    assert len(unknown["items"]) == len(CANDS)
    r = await client.get("/model")
    assert r.status_code == 200
    specs = {i["name"]: i for i in r.json()["inputs"]}
    assert specs["user_list"]["shape"] == ["user_batch", 6]


async def test_fetched_lists_are_the_encoded_histories_and_score_as_onnxruntime_does(
        list_repo: Path, redis_url: str) -> None:
    schema = schema_of(list_repo)
    load(redis_url, schema, users_with_history())
    store = FeatureStore(make_client(redis_url, socket_timeout_s=1.0, connect_timeout_s=1.0),
                         schema)
    try:
        got = {u: (await store.fetch(u, ["i1", "i2"])).inputs["user_list"]
               for u in ("x0", "x2", "x3", "x4", "x5", "nobody")}
    finally:
        await store.aclose()
    np.testing.assert_array_equal(got["x0"], [[4, 8, 10, 0, 0, 0]])
    for u in ("x2", "x3", "nobody"):
        np.testing.assert_array_equal(got[u], np.zeros((1, 6)))
    np.testing.assert_array_equal(got["x4"], [[2, 0, 3, 0, 0, 0]])
    np.testing.assert_array_equal(got["x5"], [[11] * 6])
    assert got["x0"].dtype == np.int64 and got["x0"].flags.c_contiguous
    # the same inputs through onnxruntime directly: the service's scores, not another path
    sess = ort.InferenceSession(str(list_repo / MODEL_NAME / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    store = FeatureStore(make_client(redis_url, socket_timeout_s=1.0, connect_timeout_s=1.0),
                         schema)
    try:
        res = await store.fetch("x0", CANDS)
    finally:
        await store.aclose()
    inputs = {**res.inputs, **schema.context_inputs(None)}
    (click,) = sess.run(["click"], inputs)
    async with running_app(settings_for(list_repo, redis_url)) as c:
        body = await rank(c, "x0")
    served = scores(body)
    np.testing.assert_allclose([served[i] for i in CANDS], click, rtol=1e-6)


async def test_a_list_over_the_cap_is_refused_and_nothing_is_written(
        list_repo: Path, redis_url: str) -> None:
    schema = schema_of(list_repo)
    with pytest.raises(BadListError, match=r"recent_items: 1 row\(s\) hold more than max_len"):
        load(redis_url, schema, users_with_history([["i1"], ["i2"] * 7]))
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()


async def test_histories_of_ids_the_model_does_not_know_are_refused(
        list_repo: Path, redis_url: str) -> None:
    schema = schema_of(list_repo)
    wrong_spelling = [["3", "7"], ["9"], []]  # item numbers without the "i": none is known
    with pytest.raises(BadListError, match=r"3 of the 3 ids .* unknown"):
        load(redis_url, schema, users_with_history(wrong_spelling))  # type: ignore[arg-type]
    with pytest.raises(BadListError, match="must be a list of ids"):
        load(redis_url, schema, users_with_history().set_column(
            3, HISTORY_FEATURE, pa.array(["i1"] * 6)))
    # allowed explicitly: loaded, the unknown ids counted
    report = load(redis_url, schema, users_with_history(wrong_spelling),  # type: ignore[arg-type]
                  max_unknown_list_share=1.0)
    assert (report.list_ids, report.list_unknown_ids) == (3, 3)


async def test_a_record_with_list_ids_out_of_range_is_defaulted_not_ranked(
        list_repo: Path, redis_url: str) -> None:
    schema = schema_of(list_repo)
    report = load(redis_url, schema, users_with_history())
    user = schema.group("user")
    assert user is not None
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        lid = client.get(pointer_key("rk", schema.version, "user")).decode()
        assert lid == report.load_id
        key = record_key_prefix("rk", schema.version, lid, "user") + "x0"
        rec = np.frombuffer(client.get(key), user.record_dtype()).copy()
        rec["list"][0, 1] = 10_000  # beyond the item vocabulary: a foreign or corrupt writer
        client.set(key, rec.tobytes())
    finally:
        client.close()
    async with running_app(settings_for(list_repo, redis_url)) as c:
        body = await rank(c, "x0")
        metrics = (await c.get("/metrics")).text
    assert body["defaulted"]["user"] == 1  # the whole record defaulted, counted
    assert 'reason="corrupt"' in metrics and 'entity="user"' in metrics
