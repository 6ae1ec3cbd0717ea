"""The serving side's pure parts: canary steps and shares, the breach window, the rollback
file, override precedence, the shadow's tau and overlap, the file's [shadow] table."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from service.arms import Rollback, Window, canary_shares, read_rollbacks, write_rollback
from service.experiments import ExperimentsError, Overrides, parse_experiments
from service.pipeline import apply_overrides
from service.schemas import RankRequest
from service.shadow import tau_b, top_overlap

CANARY = {"experiment": [{"name": "e", "salt": "s", "arm": [
    {"name": "stable", "share": 0.5}, {"name": "canary", "share": 0.5, "model_version": 2}],
    "canary": {"arm": "canary", "steps": [0.01, 0.05, 0.25, 1.0], "step_s": 60,
               "max_error_ratio": 0.01, "max_p99_ms": 50, "start": 1000.0}}]}


def test_canary_steps_follow_time_from_the_start_and_stop_at_the_last():
    c = parse_experiments(CANARY).experiments[0].canary
    assert c is not None and c.start == 1000.0
    assert [c.step_at(t, c.start) for t in (0, 1000, 1059, 1060, 1150, 1e9)] == [0, 0, 0, 1, 2, 3]


def test_canary_shares_and_rollback():
    e = parse_experiments(CANARY).experiments[0]
    assert canary_shares(e, 1000.0, 0.0, False) == pytest.approx({"stable": 0.99, "canary": 0.01})
    assert canary_shares(e, 1130.0, 0.0, False) == pytest.approx({"stable": 0.75, "canary": 0.25})
    assert canary_shares(e, 1130.0, 0.0, True) == {"stable": 1.0, "canary": 0.0}


def test_a_canary_start_may_be_a_toml_datetime():
    import tomllib

    doc = tomllib.loads('[[experiment]]\nname = "e"\nsalt = "s"\n'
                        '[[experiment.arm]]\nname = "a"\nshare = 0.5\n'
                        '[[experiment.arm]]\nname = "b"\nshare = 0.5\n'
                        '[experiment.canary]\narm = "b"\nsteps = [0.5, 1.0]\nstep_s = 60\n'
                        'max_error_ratio = 0.1\nmax_p99_ms = 50\n'
                        'start = 2026-12-01T10:00:00Z\n')
    c = parse_experiments(doc).experiments[0].canary
    assert c is not None and c.start == 1796119200.0
    bad = CANARY["experiment"][0] | {"canary": CANARY["experiment"][0]["canary"] | {"start": "x"}}
    with pytest.raises(ExperimentsError, match=r"canary\.start"):
        parse_experiments({"experiment": [bad]})


def test_the_window_judges_errors_then_p99_only_with_enough_outcomes():
    w = Window(60.0)
    for i in range(9):
        w.add(100.0 + i, False, 0.001)
    assert w.verdict(10, 0.1, 50) is None  # 9 < min_requests
    w.add(109.0, True, 0.001)
    assert (w.verdict(10, 0.1, 50) or "").startswith("error ratio 9/10")
    w = Window(60.0)
    for i in range(100):
        w.add(100.0 + i * 0.1, True, 0.2 if i % 10 == 0 else 0.001)
    assert (w.verdict(10, 0.1, 50) or "").startswith("p99")
    w.add(1000.0, True, 0.001)  # the old outcomes leave the window
    assert len(w.items) == 1


def test_the_rollback_file_applies_to_its_experiments_file_only(tmp_path):
    path = tmp_path / "exp.toml.rollback.json"
    write_rollback(path, "e", Rollback("canary", "error ratio", 5.0), "sha-a")
    write_rollback(path, "f", Rollback("c2", "p99", 6.0), "sha-b")
    assert set(read_rollbacks(path, "sha-a")) == {"e"}
    assert read_rollbacks(path, "sha-a")["e"].arm == "canary"
    assert read_rollbacks(path, "sha-c") == {}
    path.write_text("not json")
    assert read_rollbacks(path, "sha-a") == {}


def test_what_an_arm_sets_wins_over_the_request():
    req = RankRequest(user_id="u", candidates=["a", "b"], weights={"click": 3.0},
                      scoring="weighted_product")
    assert apply_overrides(req, Overrides()) is req
    out = apply_overrides(req, Overrides(preset="like"))
    assert (out.weights, out.preset, out.scoring) == (None, "like", "weighted_product")
    out = apply_overrides(req, Overrides(weights={"click": 1.0}, scoring="weighted_sum"))
    assert (out.weights, out.preset, out.scoring) == ({"click": 1.0}, None, "weighted_sum")
    assert req.weights == {"click": 3.0}  # the request itself is untouched


@pytest.mark.parametrize("n", [2, 7, 500])
def test_numpy_tau_b_matches_scipy_with_ties(n, monkeypatch):
    import service.shadow as shadow

    rng = np.random.default_rng(n)
    x = rng.integers(0, 5, n).astype(float)  # many ties
    y = x + rng.normal(0, 2, n)
    want = stats.kendalltau(x, y).statistic
    assert tau_b(x, y) == pytest.approx(want)
    monkeypatch.setattr(shadow, "_scipy_tau", None)
    assert tau_b(x, y) == pytest.approx(want)
    assert tau_b(x, x) == pytest.approx(1.0)


def test_top_overlap():
    live_order = np.arange(20)  # the live top 10 is 0..9
    shadow = np.zeros(20)
    shadow[[0, 1, 2, 15, 16, 17, 18, 19, 13, 12]] = 1.0
    assert top_overlap(live_order, shadow) == pytest.approx(0.3)
    assert top_overlap(live_order[:3], np.arange(3.0)[::-1]) == 1.0


def test_the_shadow_table_is_validated():
    cfg = parse_experiments({"shadow": {"model_version": 2, "share": 0.5}})
    assert cfg.shadow is not None and cfg.shadow.share == 0.5
    assert cfg.models("mmoe") == {("mmoe", 2)}
    with pytest.raises(ExperimentsError, match="shadow: names no model"):
        parse_experiments({"shadow": {}})
    with pytest.raises(ExperimentsError, match=r"shadow\.share"):
        parse_experiments({"shadow": {"model_version": 2, "share": 0}})
    with pytest.raises(ExperimentsError, match=r"shadow\.sample: unknown key"):
        parse_experiments({"shadow": {"model_version": 2, "sample": 1}})
