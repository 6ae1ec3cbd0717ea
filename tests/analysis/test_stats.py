"""The report's statistics on per-user totals with known truth: coverage, calibration, and why
the bootstrap over users (not the naive per-impression test) is the one to trust."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.stats import UserTotals, lift, naive_p_value, naive_rate_ci, rate_ci, sample_ratio


def clustered(rng: np.random.Generator, users: int, mean: float, concentration: float,
              impressions: int = 20) -> UserTotals:
    """Users with propensity ~ Beta(mean * c, (1 - mean) * c): a small c = strong clustering."""
    p = rng.beta(mean * concentration, (1 - mean) * concentration, size=users)
    n = np.full(users, impressions)
    return UserTotals(n, rng.binomial(n, p))


def test_the_bootstrap_ci_covers_the_true_rate_in_a_seeded_run() -> None:
    rng = np.random.default_rng(7)
    t = clustered(rng, 2000, 0.1, 2.0)
    lo, hi = rate_ci(t, rng)
    assert lo < 0.1 < hi and lo < t.rate < hi


def test_bootstrap_coverage_is_near_nominal_over_seeded_runs() -> None:
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(100):
        lo, hi = rate_ci(clustered(rng, 400, 0.1, 2.0), rng, n_resamples=500)
        hits += lo <= 0.1 <= hi
    assert hits >= 88, hits  # nominal 95; binomial sd over 100 runs is about 2


def test_few_heavy_users_widen_the_bootstrap_ci_beyond_the_naive_one() -> None:
    """20 heavy users with many impressions and a high rate, 980 light ones with a low rate:
    events are concentrated in few users, so the naive interval is far too narrow."""
    rng = np.random.default_rng(3)
    n = np.concatenate([np.full(20, 500), np.full(980, 5)])
    p = np.concatenate([np.full(20, 0.5), np.full(980, 0.01)])
    t = UserTotals(n, rng.binomial(n, p))
    lo, hi = rate_ci(t, rng)
    nlo, nhi = naive_rate_ci(t)
    assert hi - lo > 3 * (nhi - nlo), ((lo, hi), (nlo, nhi))
    assert lo < t.rate < hi and nlo < t.rate < nhi


def test_aa_false_positives_are_honest_with_the_bootstrap_and_not_with_the_naive_test() -> None:
    """60 A/A pairs of clustered arms: the bootstrap over users rejects about 5 % at 0.05; the
    naive z-test, which counts impressions as independent, rejects far more."""
    rng = np.random.default_rng(5)
    boot = naive = 0
    runs = 60
    for _ in range(runs):
        a, b = clustered(rng, 300, 0.1, 1.0), clustered(rng, 300, 0.1, 1.0)
        boot += lift(b, a, rng, n_resamples=400).p_value < 0.05
        naive += naive_p_value(b, a) < 0.05
    assert boot <= 8, boot  # expected 3; P(>8 | 5 %) < 0.5 %
    assert naive >= 2 * max(boot, 4), (naive, boot)


def test_a_large_true_difference_is_significant() -> None:
    rng = np.random.default_rng(2)
    control, worse = clustered(rng, 1000, 0.10, 5.0), clustered(rng, 1000, 0.06, 5.0)
    lf = lift(worse, control, rng)
    assert lf.p_value < 0.01 and lf.naive_p_value < 0.01
    assert lf.ci[0] < lf.value < lf.ci[1] < 0
    assert lf.ci[0] < -0.4 < lf.ci[1]  # true lift 0.06 / 0.10 - 1


def test_the_bootstrap_p_value_never_reaches_zero() -> None:
    rng = np.random.default_rng(2)
    control, worse = clustered(rng, 500, 0.3, 50.0), clustered(rng, 500, 0.05, 50.0)
    p = lift(worse, control, rng, n_resamples=999).p_value
    assert p == pytest.approx(2 / 1000)


def test_sample_ratio_mismatch_is_flagged_and_a_fair_split_is_not() -> None:
    bad = sample_ratio({"control": 600, "treatment": 400}, {"control": 0.5, "treatment": 0.5})
    assert bad.mismatch and bad.p_value < 1e-9 and bad.expected == {"control": 500.0,
                                                                    "treatment": 500.0}
    ok = sample_ratio({"control": 510, "treatment": 490}, {"control": 0.5, "treatment": 0.5})
    assert not ok.mismatch and ok.p_value > 0.5
    skewed = sample_ratio({"a": 900, "b": 100}, {"a": 0.9, "b": 0.1})
    assert not skewed.mismatch


def test_users_in_an_undeclared_or_empty_arm_are_a_mismatch() -> None:
    stray = sample_ratio({"a": 500, "b": 500, "c": 3}, {"a": 0.5, "b": 0.5})
    assert stray.mismatch and "'c': 3" in stray.reason
    zero = sample_ratio({"a": 500, "b": 4}, {"a": 1.0, "b": 0.0})
    assert zero.mismatch and "'b': 4" in zero.reason


def test_a_rate_of_zero_gets_an_upper_bound_not_a_point() -> None:
    t = UserTotals(np.full(100, 10), np.zeros(100, dtype=int))
    lo, hi = rate_ci(t, np.random.default_rng(0))
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.001 < hi < 0.01


def test_a_rare_event_leaves_the_lift_undefined_but_the_difference_and_p_value_defined() -> None:
    """Control has one event among 200 users: many resamples of control have none, where the
    relative lift is undefined; the difference of rates and its p-value still are."""
    rng = np.random.default_rng(0)
    n = np.full(200, 10)
    control = UserTotals(n, np.r_[1, np.zeros(199, dtype=int)])
    arm = UserTotals(n, np.r_[np.ones(30, dtype=int), np.zeros(170, dtype=int)])
    lf = lift(arm, control, rng, n_resamples=500)
    assert np.isnan(lf.ci[0]) and np.isnan(lf.ci[1]) and lf.value == pytest.approx(29.0)
    assert lf.difference == pytest.approx(0.0145)
    assert lf.difference_ci[0] > 0 and lf.p_value < 0.01
