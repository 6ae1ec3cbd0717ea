"""The re-rank stage through POST /rank: the real app, the tiny model, a real Redis."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service import rerank as rr
from service.featurestore.keys import seen_key
from service.rerank_rules import RulesFileError
from tests.service.helpers import (
    CANDS,
    feature_tables,
    load_features,
    metric,
    mget_calls,
    running_app,
)
from tests.support import settings_for

pytestmark = pytest.mark.asyncio

_, ITEMS = feature_tables()
CATEGORY = dict(zip(ITEMS.column("item_id").to_pylist(), ITEMS.column("category").to_pylist(),
                    strict=True))
DIVERSITY = {"attribute": "category", "max_per_window": 1, "window": 3}
RULES = """
default_preset = "feed"

[presets.feed.diversity]
attribute = "category"
max_per_window = 1
window = 3

[presets.fresh]
boosts = [{attribute = "age_days", edges = [30], factors = [2.0, 1.0]}]
"""


def command_calls(url: str, name: str) -> int:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return int(client.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))
    finally:
        client.close()


@pytest.fixture
async def client(model_repo: Path, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, max_candidates=50)
    async with running_app(settings) as c:
        yield c


async def rank(client: httpx.AsyncClient, status: int = 200, **payload: Any) -> dict[str, Any]:
    payload.setdefault("user_id", "u1")
    payload.setdefault("candidates", CANDS)
    r = await client.post("/rank", json=payload)
    assert r.status_code == status, r.text
    return dict(r.json())


def windows_ok(items: list[dict[str, Any]], k: int, w: int) -> bool:
    cats = [CATEGORY[it["id"]] for it in items]
    return all(max(cats[s:s + w].count(c) for c in cats[s:s + w]) <= k
               for s in range(len(cats) - w + 1))


async def test_without_rules_the_body_is_todays_byte_for_byte(client: httpx.AsyncClient) -> None:
    headers = {"X-Request-ID": "same-id"}
    base = {"user_id": "u1", "candidates": CANDS, "top_k": 10}
    plain = await client.post("/rank", json=base, headers=headers)
    empty = await client.post("/rank", json={**base, "rerank": {}}, headers=headers)
    off = await client.post("/rank", json={**base, "rerank": {"diversity": None}},
                            headers=headers)
    assert plain.status_code == empty.status_code == off.status_code == 200, plain.text
    assert plain.content == empty.content == off.content
    assert list(plain.json()) == ["request_id", "model", "tasks", "scoring", "weights", "items",
                                  "defaulted", "degraded", "degraded_reason"]
    scores = [it["score"] for it in plain.json()["items"]]
    assert scores == sorted(scores, reverse=True)


async def test_diversity_holds_in_every_window_and_is_counted(client: httpx.AsyncClient) -> None:
    before = metric("ranker_rerank_rules_applied_total", {"rule": "diversity"})
    plain = await rank(client)
    body = await rank(client, rerank={"diversity": DIVERSITY})
    assert not windows_ok(plain["items"], 1, 3)  # the test data needs the rule
    assert windows_ok(body["items"], 1, 3)
    assert {it["id"] for it in body["items"]} == set(CANDS)
    assert body["rerank"] == {"preset": None, "applied": ["diversity"], "filtered": 0,
                              "relaxed": [], "adjusted": []}
    assert metric("ranker_rerank_rules_applied_total", {"rule": "diversity"}) == before + 1
    again = await rank(client, rerank={"diversity": DIVERSITY})
    assert [it["id"] for it in again["items"]] == [it["id"] for it in body["items"]]


async def test_explain_says_from_where_and_by_which_rule(client: httpx.AsyncClient) -> None:
    plain = [it["id"] for it in (await rank(client))["items"]]
    body = await rank(client, explain=True, top_k=12,
                      rerank={"diversity": DIVERSITY, "filters": {"exclude": [plain[0]]}})
    items = body["items"]
    assert plain[0] not in {it["id"] for it in items} and len(items) == 12
    kept = plain[1:]  # the filters run before scoring: `from` counts the candidates kept
    for pos, it in enumerate(items):
        assert it["rerank"]["from"] == kept.index(it["id"])
        assert set(it["rerank"]["rules"]) <= {"diversity"}
        assert bool(it["rerank"]["rules"]) == (pos != it["rerank"]["from"]), it
        assert "gates" in it
    assert body["rerank"]["applied"] == ["filter", "diversity"]


async def test_a_list_the_filters_empty_is_an_empty_ranking_not_an_error(
        client: httpx.AsyncClient, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.sadd(seen_key("rk", "u2"), *CANDS[1:])
    r.close()
    scored = metric("ranker_candidates_scored_total")
    body = await rank(client, user_id="u2", explain=True,
                      rerank={"diversity": DIVERSITY, "filters": {"seen": True,
                                                                  "exclude": CANDS[:1]}})
    assert body["items"] == []
    assert body["rerank"]["applied"] == ["filter", "seen"]
    assert body["rerank"]["filtered"] == len(CANDS)
    assert metric("ranker_candidates_scored_total") == scored  # nothing was left to score


async def test_seen_set_is_read_in_the_same_round_trip(client: httpx.AsyncClient,
                                                       redis_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    r = redis.Redis.from_url(redis_url)
    r.sadd(seen_key("rk", "u1"), "i3", "i5", "i7", "i999")
    r.close()
    await rank(client)  # the reader has found its load pointers
    from redis.asyncio.connection import AbstractConnection

    writes = []
    send = AbstractConnection.send_packed_command

    async def counted(self: Any, command: Any, check_health: bool = True) -> None:
        writes.append(command)
        await send(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    mgets, smis = mget_calls(redis_url), command_calls(redis_url, "smembers")
    scored = metric("ranker_candidates_scored_total")
    body = await rank(client, rerank={"filters": {"seen": True, "exclude": ["i9"]}})
    assert len(writes) == 1  # one write: MGET and SMEMBERS together, two replies read
    assert mget_calls(redis_url) == mgets + 1
    assert command_calls(redis_url, "smembers") == smis + 1
    ids = [it["id"] for it in body["items"]]
    assert set(ids) == set(CANDS) - {"i3", "i5", "i7", "i9"}
    assert body["rerank"]["applied"] == ["filter", "seen"] and body["rerank"]["filtered"] == 4
    # the filtered candidates were never scored
    assert metric("ranker_candidates_scored_total") == scored + len(CANDS) - 4
    # no seen rule: no SMEMBERS
    await rank(client, rerank={"diversity": DIVERSITY})
    assert command_calls(redis_url, "smembers") == smis + 1


async def test_boost_and_pins_through_the_api(client: httpx.AsyncClient) -> None:
    plain = [it["id"] for it in (await rank(client, top_k=10))["items"]]
    last = plain[-1]
    body = await rank(client, top_k=10, rerank={"pins": [{"id": last, "position": 0},
                                                         {"id": "i39", "position": 1}]})
    ids = [it["id"] for it in body["items"]]
    assert ids[:2] == [last, "i39"] and len(ids) == 10
    assert "pin" in body["rerank"]["applied"]
    boosted = await rank(client, rerank={"boosts": [
        {"attribute": "category", "values": {CATEGORY[plain[-1]]: 10.0}}]})
    scores = {it["id"]: it["score"] for it in boosted["items"]}
    unboosted = {it["id"]: it["score"] for it in (await rank(client))["items"]}
    assert scores[plain[-1]] == pytest.approx(10 * unboosted[plain[-1]], rel=1e-6)


@pytest.mark.parametrize(("rerank", "field"), [
    ({"diversity": {"attribute": "colour", "window": 3}}, "rerank.diversity.attribute"),
    ({"diversity": {"attribute": "category", "max_per_window": 0, "window": 3}},
     "rerank.diversity.max_per_window"),
    ({"diversity": {"attribute": "category", "window": 41}}, "rerank.diversity.window"),
    ({"boosts": [{"attribute": "category", "values": {"c1": 11.0}}]},
     "rerank.boosts[0].values.c1"),
    ({"pins": [{"id": f"i{i}", "position": i} for i in range(9)]}, "rerank.pins"),
    ({"pins": [{"id": "i1", "position": -1}]}, "rerank.pins[0].position"),
    ({"mmr": {"attribute": "category", "lambda": 2}}, "rerank.mmr.lambda"),
    ({"colour": 1}, "rerank.colour"),
    ({"preset": "nope"}, "rerank.preset"),
])
async def test_invalid_rules_are_422_naming_the_field_before_redis(
        client: httpx.AsyncClient, redis_url: str, rerank: dict[str, Any], field: str) -> None:
    await rank(client)
    mgets = mget_calls(redis_url)
    body = await rank(client, status=422, rerank=rerank)
    assert body["error"] == "invalid_request"
    assert body["detail"][0]["field"] == field, body
    assert mget_calls(redis_url) == mgets


async def test_rules_file_presets_default_reload_and_refusal(
        model_repo: Path, redis_url: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    settings = settings_for(model_repo, redis_url, rerank_rules_file=rules,
                            rerank_rules_poll_s=0.0)
    async with running_app(settings) as client:
        body = await rank(client)  # the default preset
        assert body["rerank"]["preset"] == "feed" and windows_ok(body["items"], 1, 3)
        assert "rerank" not in await rank(client, rerank={"preset": None})
        fresh = await rank(client, rerank={"preset": "fresh"})
        assert fresh["rerank"]["applied"] == ["boost"]

        rules.write_text(RULES.replace('default_preset = "feed"\n', ""))
        assert "rerank" not in await rank(client)  # reloaded: no default any more

        failures = metric("ranker_rerank_rules_reloads_total", {"result": "failure"})
        with caplog.at_level(logging.ERROR, logger="ranker.rerank"):
            rules.write_text(RULES + "\n[presets.bad.diversity]\nattribute = 1\nwindow = 0\n")
            await rank(client)
        assert metric("ranker_rerank_rules_reloads_total",
                      {"result": "failure"}) == failures + 1
        assert "refused" in caplog.text and "presets.bad.diversity" in caplog.text
        fresh = await rank(client, rerank={"preset": "fresh"})  # the old rules still serve
        assert fresh["rerank"]["preset"] == "fresh"
        await rank(client, status=422, rerank={"preset": "bad"})

    rules.write_text("presets = 3")
    with pytest.raises(RulesFileError):
        async with running_app(settings):
            pass


async def test_a_preset_with_an_attribute_the_model_lacks_is_422(
        model_repo: Path, redis_url: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[presets.x.diversity]\nattribute = "creator"\nwindow = 3\n')
    async with running_app(settings_for(model_repo, redis_url, rerank_rules_file=rules)) as c:
        body = await rank(c, status=422, rerank={"preset": "x"})
        assert body["detail"][0]["field"] == "rerank.preset(x).diversity.attribute"


async def test_rule_names_are_a_fixed_set() -> None:
    assert set(rr.RULES) == {"boost", "filter", "seen", "mmr", "pin", "diversity",
                             "diversity_relaxed"}
    json.dumps(rr.RULES)
