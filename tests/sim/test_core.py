"""The pure core of the simulator: position model, plans, event draws, expected rates."""

from __future__ import annotations

import numpy as np
import pytest

from sim.core import (
    Outcome,
    Population,
    PositionModel,
    Tally,
    evaluate,
    oracle_order,
    plan_request,
)
from training.synthetic import TASKS, World

W = {"click": 1.0, "like": 4.0, "share": 8.0}


def test_position_model_is_decreasing_and_bounded_by_top_k() -> None:
    e = PositionModel(top_k=5, eta=1.0).examine(100)
    np.testing.assert_allclose(e, [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert len(PositionModel(top_k=5).examine(3)) == 3
    assert np.all(PositionModel(top_k=4, eta=0.0).examine(10) == 1.0)
    assert np.all(np.diff(PositionModel(top_k=10, eta=0.7).examine(10)) < 0)
    with pytest.raises(ValueError, match="top_k"):
        PositionModel(top_k=0)
    with pytest.raises(ValueError, match="eta"):
        PositionModel(eta=-1.0)


def test_plans_are_deterministic_per_request_and_drawn_from_the_world(world: World) -> None:
    pop = Population.draw(world, None, 0)
    a = plan_request(world, pop, 7, 0, 50)
    b = plan_request(world, pop, 7, 0, 50)
    assert (a.user, a.hour, a.surface) == (b.user, b.hour, b.surface)
    np.testing.assert_array_equal(a.candidates, b.candidates)
    assert len(set(a.candidates.tolist())) == 50  # distinct candidates
    other = plan_request(world, pop, 7, 1, 50)
    assert not np.array_equal(a.candidates, other.candidates)
    body = a.body(10, W)
    assert body["user_id"] == f"u{a.user}" and len(body["candidates"]) == 50
    assert body["context"]["surface"] in ("home", "search", "related")
    assert 0 <= body["context"]["hour"] < 24 and body["top_k"] == 10 and body["weights"] == W
    with pytest.raises(ValueError, match="candidates"):
        plan_request(world, pop, 0, 0, world.n_items + 1)


def test_population_is_activity_weighted(world: World) -> None:
    sub = Population.draw(world, 20, 0)
    assert len(set(sub.users.tolist())) == 20
    assert sub.users.tolist() == Population.draw(world, 20, 0).users.tolist()
    pop = Population.draw(world, None, 0)
    users = np.array([plan_request(world, pop, i, 0, 5).user for i in range(3000)])
    active = world.activity[users].mean()
    assert active > 1.5 * world.activity.mean()  # users who are active send more requests


def _run(world: World, seed: int, n: int, ranker: str) -> Tally:
    pop = Population.draw(world, None, seed)
    pm = PositionModel(top_k=10, eta=1.0)
    tally = Tally()
    for i in range(n):
        plan = plan_request(world, pop, i, seed, 100)
        if ranker == "oracle":
            probs = world.probabilities(plan.user, plan.candidates, plan.hour, plan.surface)
            served = plan.candidates[oracle_order(probs, W)[:10]]
        else:
            served = np.random.default_rng([seed, i]).permutation(plan.candidates)[:10]
        tally.add(evaluate(world, plan, served, W, "weighted_sum", pm, seed), W)
    return tally


@pytest.mark.parametrize("ranker", ["oracle", "random"])
def test_drawn_events_match_their_expectation_within_binomial_noise(world: World,
                                                                    ranker: str) -> None:
    """events_t is a sum of independent Bernoulli(e(p) * p_t): within 4 sd of its mean (a
    two-sided 4-sigma band: P(outside) < 1e-4 per task; the run is seeded)."""
    tally = _run(world, 3, 2000, ranker)
    s = tally.summary()
    assert s["impressions"] == 2000 * 10
    for t in TASKS:
        mean, sd = s["expected_events"][t], s["expected_events_sd"][t]
        assert sd > 0 and abs(s["events"][t] - mean) <= 4 * sd, (t, s["events"][t], mean, sd)
    # examined ~ sum of e(p) over the impressions
    e_sum = 2000 * PositionModel(10, 1.0).examine(10).sum()
    assert abs(s["examined"] - e_sum) <= 4 * np.sqrt(e_sum)


def test_oracle_beats_random_and_a_random_ranking_is_random(world: World) -> None:
    s = _run(world, 5, 600, "random").summary()
    er = s["expected_rates"]
    for t in (*TASKS, "weighted"):
        assert er["oracle"][t] > 2 * er["random"][t], t
        # a random served order: expected rate close to the exact random expectation
        assert abs(er["served"][t] - er["random"][t]) < 0.15 * er["random"][t], t


def test_oracle_maximises_the_weighted_objective_of_every_request(world: World) -> None:
    pop = Population.draw(world, None, 0)
    pm = PositionModel(top_k=5, eta=0.5)
    for i in range(50):
        plan = plan_request(world, pop, i, 0, 30)
        rng = np.random.default_rng(i)
        for _ in range(5):
            served = rng.permutation(plan.candidates)[:5]
            o = evaluate(world, plan, served, W, "weighted_sum", pm, 0)

            def value(o: Outcome, r: str) -> float:
                return sum(W[t] * o.expected[r][t] for t in TASKS)

            assert value(o, "oracle") >= value(o, "served") - 1e-12
            assert value(o, "oracle") >= value(o, "random") - 1e-12


def test_weighted_product_oracle_sorts_by_the_product(world: World) -> None:
    probs = world.probabilities(3, np.arange(40), 12, "search")
    order = oracle_order(probs, {"click": 1.0, "like": 0.5}, "weighted_product")
    prod = probs["click"] * probs["like"] ** 0.5
    np.testing.assert_array_equal(order, np.argsort(-prod, kind="stable"))
    with pytest.raises(ValueError, match="scoring"):
        oracle_order(probs, W, "max")


def test_evaluate_is_deterministic_for_a_seed_and_checks_the_items(world: World) -> None:
    pop = Population.draw(world, None, 0)
    pm = PositionModel(top_k=10, eta=0.0)
    plan = plan_request(world, pop, 11, 0, 100)
    served = plan.candidates[:10]
    runs = [evaluate(world, plan, served, W, "weighted_sum", pm, s) for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert runs[0].expected == runs[2].expected  # the draws differ, the expectation does not
    assert runs[0].examined == 10  # eta = 0: every position is examined
    with pytest.raises(ValueError, match="not candidates"):
        bad = np.setdiff1d(np.arange(world.n_items), plan.candidates)[:1]
        evaluate(world, plan, np.concatenate([served[:3], bad]), W, "weighted_sum", pm, 0)


def test_like_and_share_follow_clicks_as_in_the_generator(world: World) -> None:
    pop = Population.draw(world, None, 0)
    pm = PositionModel(top_k=10, eta=0.0)
    with_click = without = 0
    for i in range(1500):
        plan = plan_request(world, pop, i, 0, 100)
        probs = world.probabilities(plan.user, plan.candidates, plan.hour, plan.surface)
        served = plan.candidates[oracle_order(probs, W)[:10]]
        o = evaluate(world, plan, served, W, "weighted_sum", pm, 0)
        clicked = {item for item, t in o.events if t == "click"}
        for item, t in o.events:
            if t == "like":
                with_click += item in clicked
                without += item not in clicked
    assert with_click > 5 * without > 0


def test_tally_does_not_depend_on_the_order_of_adds(world: World) -> None:
    pop = Population.draw(world, None, 0)
    pm = PositionModel()
    outcomes = []
    for i in range(40):
        plan = plan_request(world, pop, i, 0, 50)
        outcomes.append(evaluate(world, plan, plan.candidates[:10], W, "weighted_sum", pm, 0))
    a, b = Tally(), Tally()
    for o in outcomes:
        a.add(o, W)
    for o in reversed(outcomes):
        b.add(o, W)
    assert a.summary() == b.summary()
