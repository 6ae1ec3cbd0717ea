"""Pure ranking functions: resolve the weights, combine per-task scores, order and cut.

No I/O and no framework here, so every rule users rely on is tested without a server.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

# Floor for probabilities in the product formula: log(0) would make one zero task score wipe out
# every other task's contribution, and ties at exactly 0 would lose the other tasks' order.
PRODUCT_EPS = 1e-7


class InvalidWeights(ValueError):
    """A per-request weight or preset the service refuses; `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def resolve_weights(
    tasks: Sequence[str],
    requested: Mapping[str, float] | None,
    preset: str | None,
    *,
    defaults: Mapping[str, float],
    presets: Mapping[str, Mapping[str, float]],
    bounds: tuple[float, float],
) -> dict[str, float]:
    """Weights per task: defaults, overlaid by the preset, overlaid by the request's own weights.

    A task without a configured default takes 1.0. Unknown tasks, unknown presets and weights
    that are not finite or are outside `bounds` raise InvalidWeights.
    """
    lo, hi = bounds
    weights = {t: float(defaults.get(t, 1.0)) for t in tasks}
    if preset is not None:
        if preset not in presets:
            known = ", ".join(sorted(presets)) or "none configured"
            raise InvalidWeights("preset", f"unknown preset {preset!r} (known: {known})")
        for t, w in presets[preset].items():
            if t in weights:  # a preset written for a model with more tasks still applies
                weights[t] = float(w)
    for t, w in (requested or {}).items():
        field = f"weights.{t}" if len(t) <= 64 else "weights"
        if t not in weights:
            raise InvalidWeights(field, f"unknown task (model tasks: {', '.join(tasks)})")
        if not math.isfinite(w):
            raise InvalidWeights(field, "weight must be a finite number")
        if not lo <= w <= hi:
            raise InvalidWeights(field, f"weight must be between {lo:g} and {hi:g}")
        weights[t] = float(w)
    return weights


def combine(scores: np.ndarray, weights: np.ndarray, formula: str = "weighted_sum") -> np.ndarray:
    """Final scores [N] from per-task scores [N, T] and weights [T].

    weighted_sum:     sum_t w_t * p_t              (YouTube's multitask ranker)
    weighted_product: prod_t max(p_t, eps) ** w_t  (a zero weight makes the task drop out)
    """
    s = np.asarray(scores, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if formula == "weighted_sum":
        return s @ w
    if formula == "weighted_product":
        return np.exp(np.log(np.maximum(s, PRODUCT_EPS)) @ w)
    raise ValueError(f"unknown scoring formula {formula!r}")


def rank_order(final: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """Candidate positions by final score descending, ties by input position ascending."""
    final = np.asarray(final)
    positions = np.arange(final.shape[0])
    order = np.lexsort((positions, -final))  # last key is primary
    return order if top_k is None else order[:top_k]


def sample_positions(n: int, k: int) -> np.ndarray:
    """A bounded, deterministic subset of candidate positions (evenly spaced) for histograms."""
    if n <= k:
        return np.arange(n)
    return np.linspace(0, n - 1, num=k).astype(np.int64)


def unit_hash(salt: str, user_id: str) -> float:
    """A stable hash of (salt, user id) in [0, 1): the first 64 bits of sha256, over 2**64.

    The salt is length-prefixed, so no (salt, user id) pair collides with another by
    concatenation ("ab" + "c" vs "a" + "bc")."""
    digest = hashlib.sha256(f"{len(salt)}:{salt}{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


EXPLORE_SALT = "explore"  # of `unit_hash`: independent of the log sampling's and the arms'


def explores(request_id: str, rate: float) -> bool:
    """Whether a request explores: a share `rate` of request ids, the same on every worker."""
    return rate > 0.0 and unit_hash(EXPLORE_SALT, request_id) < rate


def explore_order(request_id: str, n: int, k: int, rate: float) -> np.ndarray | None:
    """The served order of an exploring request: `k` of the `n` candidate positions drawn
    uniformly without replacement, in a random order; None for a request that does not explore
    (a share `rate` does, by its id). Seeded by the id: a retried request gets the same list."""
    if not explores(request_id, rate):
        return None
    seed = int(unit_hash(EXPLORE_SALT + "-order", request_id) * 2.0**53)
    return np.random.default_rng(seed).permutation(n)[:k]


def propensities(greedy: np.ndarray, order: np.ndarray, n: int, rate: float) -> np.ndarray:
    """P(the logging policy puts each served item in the top k), in served order: the greedy
    top k (`greedy`, candidate positions) with probability 1 - rate, any k of n uniformly with
    probability rate. What inverse-propensity weighting divides by (training/from_logs.py)."""
    k = order.shape[0]
    in_greedy = np.zeros(n, dtype=bool)
    in_greedy[greedy] = True
    return (1.0 - rate) * in_greedy[order] + rate * (k / n)
