"""AUC and log loss against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np

from training.metrics import auc, average_ranks, log_loss


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2."""
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(5, 300))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        s = rng.integers(0, 6, n).astype(float)  # many ties
        assert math.isclose(auc(y, s), brute_auc(y, s), abs_tol=1e-12)


def test_auc_extremes() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auc(y, np.zeros(4)) == 0.5
    assert math.isnan(auc(np.zeros(4), np.arange(4.0)))


def test_average_ranks_share_ties() -> None:
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_log_loss_value() -> None:
    y = np.array([1, 0])
    p = np.array([0.8, 0.4])
    assert math.isclose(log_loss(y, p), -(math.log(0.8) + math.log(0.6)) / 2, rel_tol=1e-12)
