"""Exploration: a share of the requests serve K candidates drawn uniformly, and every logged
item carries its propensity (the real app, the tiny real model, a real redis-server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.ranking import explore_order, explores, propensities, rank_order
from service.servedlog.writer import sampled
from tests.service.helpers import load_features, metric, running_app
from tests.service.test_servedlog import CANDS, rank, served_records, wait_for, xlen
from tests.support import settings_for

IDS = [f"req-{i}" for i in range(20_000)]


def test_the_explored_share_follows_the_rate_and_not_the_log_sampling() -> None:
    explored = np.array([explores(i, 0.2) for i in IDS])
    logged = np.array([sampled(i, 0.2) for i in IDS])
    sd = (0.2 * 0.8 / len(IDS)) ** 0.5
    assert abs(explored.mean() - 0.2) < 4 * sd
    # independent draws: about 4 % of the ids are both, not the same 20 %
    assert abs((explored & logged).mean() - 0.04) < 4 * (0.04 * 0.96 / len(IDS)) ** 0.5


def test_an_explored_order_is_k_distinct_candidates_the_same_for_a_retried_request() -> None:
    orders = [explore_order(i, 30, 5, 1.0) for i in IDS[:3000]]
    assert all(o is not None and len(set(o.tolist())) == 5 for o in orders)
    assert np.array_equal(explore_order("req-7", 30, 5, 1.0), orders[7])  # type: ignore[arg-type]
    # uniform over the candidates: each position is drawn about 5/30 of the time
    counts = np.bincount(np.concatenate(orders), minlength=30) / 3000  # type: ignore[arg-type]
    assert np.all(np.abs(counts - 5 / 30) < 4 * (5 / 30 * 25 / 30 / 3000) ** 0.5)
    assert explore_order("req-1", 30, 5, 0.0) is None


def test_propensities_of_the_greedy_and_of_the_drawn_items() -> None:
    final = np.linspace(1, 0, 10)
    greedy = rank_order(final, 3)  # positions 0, 1, 2
    p = propensities(greedy, np.array([2, 7, 0]), 10, 0.1)
    # in the greedy top 3: 0.9 + 0.1 * 3/10; outside it only the exploring 10 % draws it
    np.testing.assert_allclose(p, [0.93, 0.03, 0.93])
    np.testing.assert_allclose(propensities(greedy, greedy, 10, 0.0), [1.0, 1.0, 1.0])


async def test_explored_responses_and_their_logged_propensities(model_repo: Path,
                                                               redis_url: str) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    settings = settings_for(model_repo, redis_url, log_sample_rate=1.0, explore_rate=0.5)
    rids = [f"req-{i}" for i in range(30)]
    exploring = {r for r in rids if explores(r, 0.5)}
    assert 0 < len(exploring) < 30
    before = metric("ranker_explored_requests_total")
    async with running_app(settings) as client:
        bodies = {rid: await rank(client, rid, top_k=4) for rid in rids}
        await wait_for(lambda: xlen(redis_url) == 30, what="the records")
    assert metric("ranker_explored_requests_total") - before == len(exploring)
    recs = {r.request_id: r for r in served_records(redis_url)}
    for rid, body in bodies.items():
        rec, finals = recs[rid], [it["score"] for it in body["items"]]
        assert rec.item_ids == [it["id"] for it in body["items"]]
        assert rec.propensity is not None
        if rid in exploring:  # the drawn order, not the scores'
            assert rec.item_ids == [CANDS[j] for j in explore_order(rid, 30, 4, 0.5)]  # type: ignore[union-attr]
        else:
            assert finals == sorted(finals, reverse=True)
            np.testing.assert_allclose(rec.propensity, 0.5 + 0.5 * 4 / 30)
        # every item: 0.5 * 4/30 from the exploring half, plus 0.5 if it is in the top 4
        assert set(np.round(rec.propensity, 9)) <= {round(0.5 * 4 / 30, 9),
                                                     round(0.5 + 0.5 * 4 / 30, 9)}


async def test_a_re_ranked_list_is_served_as_the_rules_made_it(model_repo: Path,
                                                                 redis_url: str) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    rules = {"diversity": {"attribute": "category", "max_per_window": 1, "window": 3}}
    async with running_app(settings_for(model_repo, redis_url, log_sample_rate=1.0,
                                        explore_rate=1.0)) as client:
        explored = await rank(client, "one", top_k=5)
        ruled = await rank(client, "two", top_k=5, rerank=rules)
        await wait_for(lambda: xlen(redis_url) == 2, what="the records")
    assert [it["id"] for it in explored["items"]] == [CANDS[j] for j in
                                                      explore_order("one", 30, 5, 1.0)]  # type: ignore[union-attr]
    assert ruled["rerank"]["applied"] == ["diversity"]  # the rules' list, not a random one
    recs = {r.request_id: r for r in served_records(redis_url)}
    np.testing.assert_allclose(recs["one"].propensity, 5 / 30)  # type: ignore[arg-type]
    assert recs["two"].propensity is None  # deterministic: every propensity is 1


async def test_without_exploration_no_propensity_is_logged(model_repo: Path,
                                                           redis_url: str) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    async with running_app(settings_for(model_repo, redis_url, log_sample_rate=1.0)) as client:
        await rank(client, "plain", top_k=3)
        await wait_for(lambda: xlen(redis_url) == 1, what="the record")
    [rec] = served_records(redis_url)
    assert rec.propensity is None
