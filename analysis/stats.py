"""The statistics of the experiment report, on per-user totals: pure numpy/scipy/statsmodels.

An arm's rate of a task is events / impressions (a ratio of sums over its users). The unit of
randomisation is the user, and one user's impressions are correlated (a heavy clicker clicks
on many of them), so treating impressions as independent trials understates the variance.
Hence:

- **CIs: bootstrap over users** (`scipy.stats.bootstrap`, percentile method): users are
  resampled with replacement, each with all their impressions and events, and the ratio of
  sums is recomputed. Percentile rather than BCa because BCa's jackknife costs O(users²).
- **p-values: permutation over users** (`scipy.stats.permutation_test`, independent samples,
  two-sided): the users' arm labels are shuffled, each user keeping all their impressions and
  events, and the difference of the rates recomputed. Under "the arms do not differ" the users
  are exchangeable, so the test's false-positive rate is the level by construction, also for a
  rare task with a few dozen events per arm, where the bootstrap's own p-value (still reported,
  `bootstrap_p_value`) was measured anti-conservative: 4 of 20 A/A runs below 0.05 on share
  (`bench/results/experiments_aa.json` of the first session). A Monte Carlo p-value: at least
  1/(B+1).
- **Naive, for comparison:** the two-proportion z-test of statsmodels (`proportions_ztest`)
  and Wilson intervals (`proportion_confint`) that treat every impression as independent.
  Their ratio of widths (`design_effect`, squared) shows how much the clustering matters.
- **Sample-ratio mismatch:** `scipy.stats.chisquare` of users per arm against the declared
  shares; flagged below `SRM_ALPHA` (0.001: an SRM check runs on every report, so it gets a
  stricter threshold than the metrics, as in Fabijan et al., KDD 2019).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.proportion import proportion_confint, proportions_ztest

LEVEL = 0.95
SRM_ALPHA = 1e-3
MAX_BATCH_CELLS = 4_000_000  # resampled values held at once: bounds the bootstrap's memory


@dataclass(frozen=True)
class UserTotals:
    """One arm and task: impressions and events per user (the bootstrap's units)."""

    impressions: np.ndarray  # (U,) int
    events: np.ndarray  # (U,) int

    @property
    def rate(self) -> float:
        n = int(self.impressions.sum())
        return float(self.events.sum()) / n if n else float("nan")


def _batch(n_units: int) -> int:
    return max(1, MAX_BATCH_CELLS // max(1, n_units))


def _tail_p(dist: np.ndarray) -> float:
    """Two-sided Monte Carlo p-value of 'the statistic is 0' from its bootstrap distribution."""
    dist = dist[np.isfinite(dist)]
    b = dist.size
    if b == 0:
        return float("nan")
    lo = (np.count_nonzero(dist <= 0) + 1) / (b + 1)
    hi = (np.count_nonzero(dist >= 0) + 1) / (b + 1)
    return float(min(1.0, 2 * min(lo, hi)))


def rate_ci(t: UserTotals, rng: np.random.Generator, n_resamples: int = 2000,
            level: float = LEVEL) -> tuple[float, float]:
    """Bootstrap-over-users CI of events / impressions. With no event at all, or one user,
    there is nothing to resample: the Wilson interval stands in (an upper bound for a zero rate
    rather than the bootstrap's degenerate [0, 0])."""
    if t.impressions.size < 2 or not t.events.any():
        return naive_rate_ci(t, level)
    res = stats.bootstrap(
        (t.events, t.impressions),
        lambda k, n, axis=-1: k.sum(axis=axis) / n.sum(axis=axis),
        paired=True, vectorized=True, method="percentile", n_resamples=n_resamples,
        confidence_level=level, batch=_batch(t.impressions.size), rng=rng,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def naive_rate_ci(t: UserTotals, level: float = LEVEL) -> tuple[float, float]:
    """Wilson interval of events / impressions as if impressions were independent."""
    n = int(t.impressions.sum())
    if n == 0:
        return (float("nan"), float("nan"))
    lo, hi = proportion_confint(int(t.events.sum()), n, alpha=1 - level, method="wilson")
    return float(lo), float(hi)


@dataclass(frozen=True)
class Lift:
    """Relative lift of an arm's rate over control's (rate / control - 1), and the difference
    of the rates; the p-value is of 'no difference' (the same for both)."""

    value: float
    ci: tuple[float, float]  # NaN when some resample of control has no event: lift undefined
    p_value: float  # permutation over users
    naive_p_value: float  # two-proportion z-test over impressions
    difference: float = float("nan")
    difference_ci: tuple[float, float] = (float("nan"), float("nan"))
    bootstrap_p_value: float = float("nan")  # from the bootstrap distribution of the difference


def lift(arm: UserTotals, control: UserTotals, rng: np.random.Generator,
         n_resamples: int = 2000, level: float = LEVEL) -> Lift:
    """The lift and the difference with bootstrap CIs (arms resampled independently, users
    within each; one set of resamples for both), the bootstrap p-value (from the resampled
    differences, defined even when a resample of control has no event) and the naive z-test's."""
    value = arm.rate / control.rate - 1 if control.rate > 0 else float("nan")
    naive = naive_p_value(arm, control)
    nan2 = (float("nan"), float("nan"))
    if arm.impressions.size < 2 or control.impressions.size < 2:
        return Lift(value, nan2, float("nan"), naive, arm.rate - control.rate, nan2)

    def statistic(ia: np.ndarray, ic: np.ndarray, axis: int = -1) -> np.ndarray:
        ra = arm.events[ia].sum(axis=axis) / arm.impressions[ia].sum(axis=axis)
        rc = control.events[ic].sum(axis=axis) / control.impressions[ic].sum(axis=axis)
        relative = ra / np.where(rc > 0, rc, 1.0) - 1.0
        return np.stack([ra - rc, np.where(rc > 0, relative, np.nan)])

    with warnings.catch_warnings():  # an undefined lift is NaN on purpose; scipy's own CI and
        # standard error of it warn, and both are recomputed below from the distribution
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        dist = stats.bootstrap(
            (np.arange(arm.impressions.size), np.arange(control.impressions.size)), statistic,
            vectorized=True, method="percentile", n_resamples=n_resamples,
            confidence_level=level, batch=_batch(arm.impressions.size + control.impressions.size),
            rng=rng,
        ).bootstrap_distribution  # (2, resamples): difference, lift
    tail = 100 * (1 - level) / 2  # the percentile interval, as scipy's method="percentile"
    lo, hi = np.percentile(dist[0], [tail, 100 - tail])
    ci = nan2
    if np.isfinite(dist[1]).all():
        llo, lhi = np.percentile(dist[1], [tail, 100 - tail])
        ci = (float(llo), float(lhi))
    return Lift(value, ci, permutation_p_value(arm, control, rng, n_resamples), naive,
                arm.rate - control.rate, (float(lo), float(hi)), _tail_p(dist[0]))


def permutation_p_value(arm: UserTotals, control: UserTotals, rng: np.random.Generator,
                        n_resamples: int = 2000) -> float:
    """Two-sided p-value of 'same rate' by shuffling the users between the two arms."""
    events = np.concatenate([arm.events, control.events]).astype(np.float64)
    imps = np.concatenate([arm.impressions, control.impressions]).astype(np.float64)
    if not events.any():
        return 1.0  # no event in either arm: every shuffle gives the same (zero) difference
    ia = np.arange(arm.events.size)
    ic = np.arange(arm.events.size, events.size)

    def statistic(a: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        ra = events[a].sum(axis=axis) / imps[a].sum(axis=axis)
        return ra - events[c].sum(axis=axis) / imps[c].sum(axis=axis)

    res = stats.permutation_test(
        (ia, ic), statistic, permutation_type="independent", vectorized=True,
        n_resamples=n_resamples, alternative="two-sided",
        batch=_batch(events.size), rng=rng,
    )
    return float(res.pvalue)


def naive_p_value(arm: UserTotals, control: UserTotals) -> float:
    """statsmodels' two-proportion z-test, every impression an independent trial."""
    counts = np.array([arm.events.sum(), control.events.sum()])
    nobs = np.array([arm.impressions.sum(), control.impressions.sum()])
    if nobs.min() == 0 or counts.sum() == 0 or counts.sum() == nobs.sum():
        return float("nan")  # no variance under the pooled null: the test is undefined
    _, p = proportions_ztest(counts, nobs)
    return float(p)


@dataclass(frozen=True)
class SampleRatio:
    """The SRM check: users per arm against the declared shares."""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    mismatch: bool
    reason: str


def sample_ratio(users: Mapping[str, int], shares: Mapping[str, float],
                 alpha: float = SRM_ALPHA) -> SampleRatio:
    """Chi-square goodness of fit of users per arm to the shares. Users in an undeclared arm
    or in an arm of share 0 are a mismatch by themselves (the chi-square cannot express it)."""
    observed = {a: int(users.get(a, 0)) for a in shares}
    total = sum(observed.values())
    expected = {a: total * s for a, s in shares.items()}
    stray = {a: n for a, n in users.items() if n and (a not in shares or shares[a] == 0)}
    tested = [a for a, s in shares.items() if s > 0]
    if len(tested) < 2 or total == 0:
        chi2, p = float("nan"), float("nan")
    else:
        res = stats.chisquare([observed[a] for a in tested], [expected[a] for a in tested])
        chi2, p = float(res.statistic), float(res.pvalue)
    if stray:
        return SampleRatio(observed, expected, chi2, p, True,
                           f"users in arms not declared or of share 0: {stray}")
    mismatch = bool(p < alpha)
    reason = (f"chi-square p = {p:.3g} < {alpha:g}: the assignment or the logging is broken; "
              "do not trust the other numbers" if mismatch else f"chi-square p = {p:.3g}")
    return SampleRatio(observed, expected, chi2, p, mismatch, reason)
