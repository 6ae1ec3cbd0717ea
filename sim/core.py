"""The simulated users' behaviour and the expected-rate arithmetic: pure, no I/O.

One simulated request r: a user u_r (drawn from the population, activity-weighted as the
generator draws impressions), a context c_r = (hour, surface) drawn as the generator draws them,
and N candidates drawn from the world's items without replacement, popularity-weighted. The
server returns K_r = min(K, N) items in its order; the user looks at them under the
**position-based model**: position p (0-based) is examined with probability

    e(p) = (1 + p) ** -eta          (independently per position; eta = 0: every position)

and an examined item i draws, from the world's true conditionals in context c_r,

    click ~ Bernoulli(p_click),  like ~ Bernoulli(q_like * g),  share ~ Bernoulli(q_share * g),
    g = 1 if click else leak

so P(event t at p) = e(p) * p_t(u_r, i, c_r), p_t the world's true marginal (p_like =
q_like * (p_click + leak * (1 - p_click)), as in the generator).

Expected rates. Over the answered requests R, with impressions = sum_r K_r (every served item is
in the top K, so each is eligible to be examined), the **expected rate of task t of a ranking**
pi (pi_r(p) = the item it puts at position p of request r) is

    ER_t(pi) = sum_r sum_{p < K_r} e(p) * p_t(u_r, pi_r(p), c_r)  /  sum_r K_r

i.e. expected events per impression: what the measured online rate events_t / impressions
converges to. It is given for three rankings of the same candidates: **served** (the server's
order), **oracle** (the candidates sorted by their true combined score with the weights and
formula the server answered with: sum_t w_t p_t, or prod_t p_t ** w_t; best for that objective
by the rearrangement inequality, since e is decreasing) and **random** (the exact expectation
over uniformly random orders: sum_p e(p) * mean over the N candidates of p_t). `weighted` is
sum_t w_t ER_t, the objective the oracle maximises (for weighted_sum).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.synthetic import SURFACE_P, SURFACES, TASKS, World, hour_probabilities

RANKINGS = ("served", "oracle", "random")
MAX_PROBLEMS = 20
_SCALE = 10**15  # fixed-point accumulation: sums exact and independent of completion order


@dataclass(frozen=True)
class PositionModel:
    """P(examine position p) = (1 + p) ** -eta for p < top_k, independently per position."""

    top_k: int = 10
    eta: float = 1.0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not np.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"eta must be finite and >= 0, got {self.eta}")

    def examine(self, k: int) -> np.ndarray:
        """e(p) for the first min(k, top_k) positions."""
        return (1.0 + np.arange(min(k, self.top_k))) ** -self.eta

    def describe(self) -> dict[str, Any]:
        return {"form": "position-based: e(p) = (1 + p)^-eta, p = 0-based position, "
                        "independent per position", "eta": self.eta, "top_k": self.top_k,
                "examine": [round(float(x), 6) for x in self.examine(self.top_k)]}


@dataclass(frozen=True)
class Population:
    """The simulated users: world user indices and their chance to send a request."""

    users: np.ndarray
    p: np.ndarray

    @classmethod
    def draw(cls, world: World, n_users: int | None, seed: int) -> Population:
        """All users, or n_users of them drawn activity-weighted without replacement."""
        w = world.user_weights()
        if n_users is None or n_users >= world.n_users:
            users = np.arange(world.n_users)
        else:
            if n_users < 1:
                raise ValueError(f"n_users must be >= 1, got {n_users}")
            rng = np.random.default_rng([seed, 0xC0FFEE])
            users = np.sort(rng.choice(world.n_users, n_users, replace=False, p=w))
        p = w[users]
        return cls(users, p / p.sum())


@dataclass(frozen=True)
class Plan:
    """What simulated request `index` asks: user, candidates (world item indices), context."""

    index: int
    user: int
    candidates: np.ndarray
    hour: int
    surface: int

    def body(self, top_k: int, weights: dict[str, float] | None = None) -> dict[str, Any]:
        """The POST /rank body."""
        out: dict[str, Any] = {
            "user_id": f"u{self.user}",
            "candidates": [f"i{k}" for k in self.candidates.tolist()],
            "context": {"hour": self.hour, "surface": SURFACES[self.surface]},
            "top_k": top_k,
        }
        if weights is not None:
            out["weights"] = weights
        return out


def plan_request(world: World, population: Population, index: int, seed: int,
                 n_candidates: int) -> Plan:
    """Request `index` of the run with `seed`: its own random stream, so plans do not depend on
    the order in which concurrent workers take them."""
    if not 1 <= n_candidates <= world.n_items:
        raise ValueError(f"candidates must be in [1, {world.n_items}], got {n_candidates}")
    rng = np.random.default_rng([seed, index, 0])
    user = int(rng.choice(population.users, p=population.p))
    cands = rng.choice(world.n_items, n_candidates, replace=False, p=world.item_weights())
    hour = int(rng.choice(24, p=hour_probabilities()))
    surface = int(rng.choice(len(SURFACES), p=list(SURFACE_P)))
    return Plan(index, user, cands, hour, surface)


def combined(probs: dict[str, np.ndarray], weights: dict[str, float], scoring: str) -> np.ndarray:
    """The true combined score of each candidate: sum_t w_t p_t, or prod_t p_t ** w_t (as logs).

    Tasks the world does not know are ignored; world tasks without a weight weigh 0.
    """
    if scoring == "weighted_product":
        return sum((weights.get(t, 0.0) * np.log(probs[t]) for t in TASKS),
                   np.zeros_like(probs["click"]))
    if scoring != "weighted_sum":
        raise ValueError(f"unknown scoring {scoring!r}")
    return sum((weights.get(t, 0.0) * probs[t] for t in TASKS), np.zeros_like(probs["click"]))


def oracle_order(probs: dict[str, np.ndarray], weights: dict[str, float],
                 scoring: str = "weighted_sum") -> np.ndarray:
    """Candidate positions sorted by true combined score, best first (ties: earlier first)."""
    return np.argsort(-combined(probs, weights, scoring), kind="stable")


@dataclass
class Outcome:
    """What one answered request produced: impressions, draws and expected events."""

    impressions: int
    examined: int
    events: list[tuple[int, str]]  # (world item index, task), in served order
    expected: dict[str, dict[str, float]]  # ranking -> task -> expected events
    variance: dict[str, float]  # task -> variance of the served events count


def evaluate(world: World, plan: Plan, served: np.ndarray, weights: dict[str, float],
             scoring: str, position: PositionModel, seed: int) -> Outcome:
    """Expected events of the served, oracle and random rankings, and the user's draws.

    `served`: world item indices in the server's order; each must be one of the candidates.
    """
    pos_of = {int(k): j for j, k in enumerate(plan.candidates.tolist())}
    missing = [int(k) for k in served if int(k) not in pos_of]
    if missing:
        raise ValueError(f"served items that were not candidates: {missing[:5]}")
    cond = world.conditionals(plan.user, plan.candidates, plan.hour, plan.surface)
    reach = cond["click"] + world.leak * (1 - cond["click"])
    probs = {"click": cond["click"], "like": cond["like"] * reach,
             "share": cond["share"] * reach}
    e = position.examine(len(served))
    k = len(e)
    at = np.array([pos_of[int(i)] for i in served[:k]], dtype=np.int64)
    best = oracle_order(probs, weights, scoring)[:k]
    expected = {
        "served": {t: float(e @ probs[t][at]) for t in TASKS},
        "oracle": {t: float(e @ probs[t][best]) for t in TASKS},
        "random": {t: float(e.sum() * probs[t].mean()) for t in TASKS},
    }
    variance = {t: float(np.sum(e * probs[t][at] * (1 - e * probs[t][at]))) for t in TASKS}
    # the user's draws: one stream per request, every number drawn whether used or not
    rng = np.random.default_rng([seed, plan.index, 1])
    u = rng.random((4, k))
    looked = u[0] < e
    click = u[1] < cond["click"][at]
    gate = np.where(click, 1.0, world.leak)
    drawn = {"click": click, "like": u[2] < cond["like"][at] * gate,
             "share": u[3] < cond["share"][at] * gate}
    events = [(int(served[p]), t) for p in range(k) if looked[p] for t in TASKS if drawn[t][p]]
    return Outcome(k, int(looked.sum()), events, expected, variance)


def _fixed(x: float) -> int:
    return round(x * _SCALE)


@dataclass
class Tally:
    """Counts and sums of a run; order of `add` calls does not change the result."""

    requests: int = 0
    rank_status: Counter[str] = field(default_factory=Counter)  # status code or exception name
    model_versions: Counter[str] = field(default_factory=Counter)
    impressions: int = 0
    examined: int = 0
    events: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(TASKS, 0)))
    feedback_status: Counter[str] = field(default_factory=Counter)
    feedback_events: int = 0  # events in batches the server accepted (202)
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS
    problems_total: int = 0
    _expected: dict[str, dict[str, int]] = field(
        default_factory=lambda: {r: dict.fromkeys(TASKS, 0) for r in RANKINGS})
    _weighted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RANKINGS, 0))
    _variance: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TASKS, 0))

    def problem(self, message: str) -> None:
        """An answer that could not be used: counted, and the first few kept."""
        self.problems_total += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def add(self, outcome: Outcome, weights: dict[str, float]) -> None:
        self.impressions += outcome.impressions
        self.examined += outcome.examined
        for _, t in outcome.events:
            self.events[t] += 1
        for r in RANKINGS:
            for t in TASKS:
                self._expected[r][t] += _fixed(outcome.expected[r][t])
            self._weighted[r] += _fixed(sum(weights.get(t, 0.0) * outcome.expected[r][t]
                                            for t in TASKS))
        for t in TASKS:
            self._variance[t] += _fixed(outcome.variance[t])

    def expected_events(self, ranking: str, task: str) -> float:
        return self._expected[ranking][task] / _SCALE

    def summary(self) -> dict[str, Any]:
        """Counts, measured and expected rates per impression (see the module docstring)."""
        n = self.impressions

        def rate(x: float) -> float | None:
            return x / n if n else None

        return {
            "requests": self.requests,
            "rank_status": dict(sorted(self.rank_status.items())),
            "answered": sum(v for k, v in self.rank_status.items() if k == "200"),
            "model_versions": dict(sorted(self.model_versions.items())),
            "impressions": n,
            "examined": self.examined,
            "events": {t: self.events[t] for t in TASKS},
            "rates": {t: rate(self.events[t]) for t in TASKS},
            "expected_events": {t: self.expected_events("served", t) for t in TASKS},
            "expected_events_sd": {t: float(np.sqrt(self._variance[t] / _SCALE)) for t in TASKS},
            "expected_rates": {
                r: {**{t: rate(self.expected_events(r, t)) for t in TASKS},
                    "weighted": rate(self._weighted[r] / _SCALE)}
                for r in RANKINGS
            },
            "feedback": {
                "batches": sum(self.feedback_status.values()),
                "status": dict(sorted(self.feedback_status.items())),
                "accepted_events": self.feedback_events,
                "supported": "404" not in self.feedback_status,
            },
            "problems": list(self.problems),
            "problems_total": self.problems_total,
        }
