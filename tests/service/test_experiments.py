"""The experiments file: validation names the path and the limit; assignment is deterministic,
sticky, proportional to the shares and independent across salts."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from service.experiments import (
    Catalog,
    Experiment,
    ExperimentsError,
    ExperimentsLoader,
    ForcedArmError,
    load_experiments,
    parse_experiments,
    unit_hash,
)
from service.settings import DEFAULT_PRESETS, Settings
from tests.service.experiments_files import experiments_toml

ISSUE_EXAMPLE = experiments_toml("v2-vs-v1", "2026-12")

CATALOG = Catalog(versions={"mmoe": [1, 2], "other": [1]}, default_model="mmoe",
                  tasks=("click", "like", "share"), presets=DEFAULT_PRESETS,
                  default_weights={"click": 1.0, "like": 1.0, "share": 1.0},
                  weight_bounds=(0.0, 100.0))
USERS = [f"u{i}" for i in range(100_000)]


def exp(name: str = "e", salt: str = "s", arms: list[dict[str, Any]] | None = None,
        **kw: Any) -> dict[str, Any]:
    arms = arms if arms is not None else [{"name": "control", "share": 0.5},
                                          {"name": "treatment", "share": 0.5}]
    return {"name": name, "salt": salt, "arm": arms, **kw}


def errors_of(doc: dict[str, Any], catalog: Catalog | None = CATALOG) -> list[str]:
    with pytest.raises(ExperimentsError) as info:
        parse_experiments(doc, catalog)
    return info.value.errors


def write(tmp_path: Path, text: str, name: str = "experiments.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---- the file ---------------------------------------------------------------------------------


def test_the_issue_example_loads_and_assigns_its_arms(tmp_path: Path) -> None:
    cfg = load_experiments(write(tmp_path, ISSUE_EXAMPLE), CATALOG)
    (e,) = cfg.experiments
    assert e.name == "v2-vs-v1" and e.shares() == {"control": 0.5, "treatment": 0.5}
    a = cfg.assign("u17")
    assert a is not None and a.experiment == "v2-vs-v1" and a.arm in ("control", "treatment")
    assert a.overrides.model_version == (1 if a.arm == "control" else 2)
    assert cfg.sha256 is not None and cfg.source == str(tmp_path / "experiments.toml")


def test_an_arm_carries_every_override() -> None:
    cfg = parse_experiments({"experiment": [exp(arms=[
        {"name": "a", "share": 0.25, "model_name": "other", "model_version": 1},
        {"name": "b", "share": 0.75, "weights": {"click": 2, "share": 8.5}, "preset": "engagement",
         "scoring": "weighted_product"},
    ])]}, CATALOG)
    a, b = cfg.experiments[0].arms
    assert (a.overrides.model_name, a.overrides.model_version) == ("other", 1)
    assert dict(b.overrides.weights or {}) == {"click": 2.0, "share": 8.5}
    assert (b.overrides.preset, b.overrides.scoring) == ("engagement", "weighted_product")
    assert cfg.models("mmoe") == {("other", 1)}  # b serves the default model as it is


def test_the_arms_name_the_model_versions_to_keep_loaded(tmp_path: Path) -> None:
    cfg = load_experiments(write(tmp_path, ISSUE_EXAMPLE), CATALOG)
    assert cfg.models("mmoe") == {("mmoe", 1), ("mmoe", 2)}


def test_an_empty_file_has_no_experiments_and_assigns_nobody(tmp_path: Path) -> None:
    cfg = load_experiments(write(tmp_path, ""), CATALOG)
    assert cfg.experiments == () and cfg.assign("u1") is None


@pytest.mark.parametrize(("doc", "path", "says"), [
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}])]},
     "experiment[0].arm", "sum to 0.9"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5 + 2e-9}])]},
     "experiment[0].arm", "within 1e-09"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 1.5}, {"name": "b", "share": -0.5}])]},
     "experiment[0].arm[0].share", "in [0, 1]"),
    ({"experiment": [exp(arms=[{"name": "a", "share": "half"}, {"name": "b", "share": 0.5}])]},
     "experiment[0].arm[0].share", "number"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 1.0}])]}, "experiment[0].arm",
     "at least 2 arms"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5, "model_version": 7},
                               {"name": "b", "share": 0.5}])]},
     "experiment[0].arm[0].model_version", "available: 1, 2"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5, "model_version": 0},
                               {"name": "b", "share": 0.5}])]},
     "experiment[0].arm[0].model_version", "integer >= 1"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5, "model_name": "nope"},
                               {"name": "b", "share": 0.5}])]},
     "experiment[0].arm[0].model_name", "no version of model 'nope'"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5, "preset": "viral"},
                               {"name": "b", "share": 0.5}])]},
     "experiment[0].arm[0].preset", "unknown preset 'viral'"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5, "weights": {"watch": 1}},
                               {"name": "b", "share": 0.5}])]},
     "experiment[0].arm[0].weights.watch", "unknown task"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5,
                                                            "weights": {"click": 101}}])]},
     "experiment[0].arm[1].weights.click", "between 0 and 100"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5, "weights": {"click": "x"}},
                               {"name": "b", "share": 0.5}])]},
     "experiment[0].arm[0].weights", "task = number"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5, "scoring": "max"},
                               {"name": "b", "share": 0.5}])]},
     "experiment[0].arm[0].scoring", "known: weighted_sum, weighted_product"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}])]},
     "experiment[0].arm[1].name", "duplicate arm 'a' (first at arm[0])"),
    ({"experiment": [exp(arms=[{"name": "a/b", "share": 0.5}, {"name": "b", "share": 0.5}])]},
     "experiment[0].arm[0].name", "letters, digits"),
    ({"experiment": [exp(arms=[{"name": "a", "share": 0.5, "shares": 1},
                               {"name": "b", "share": 0.5}])]},
     "experiment[0].arm[0].shares", "unknown key"),
    ({"experiment": [exp("x", "s1"), exp("x", "s2", traffic=[0.0, 0.0])]},
     "experiment[1].traffic", "0 <= lo < hi <= 1"),
    ({"experiment": [exp("x", "s1", traffic=[0, 0.5]), exp("x", "s2", traffic=[0.5, 1])]},
     "experiment[1].name", "duplicate experiment 'x' (first at experiment[0])"),
    ({"experiment": [exp("x", "s1", traffic=[0, 0.5]), exp("y", "s1", traffic=[0.5, 1])]},
     "experiment[1].salt", "same salt as experiment[0]"),
    ({"experiment": [exp(salt="traffic")]}, "experiment[0].salt", "must differ from traffic_salt"),
    ({"experiment": [exp(salt="")]}, "experiment[0].salt", "non-empty"),
    ({"experiment": [exp("x", "s1"), exp("y", "s2")]},
     "experiment[1].traffic", "[0, 1) overlaps experiment[0]'s [0, 1)"),
    ({"experiment": [exp("x", "s1", traffic=[0, 0.6]), exp("y", "s2", traffic=[0.5, 1])]},
     "experiment[1].traffic", "overlaps"),
    ({"experiment": {"name": "x"}}, "experiment", "array of tables"),
    ({"experiments": []}, "file.experiments", "unknown key"),
    ({"traffic_salt": 3}, "traffic_salt", "non-empty string"),
    ({"experiment": [exp(canary={"arm": "nope", "steps": [0.01, 1.0], "step_s": 60,
                                 "max_error_ratio": 0.01, "max_p99_ms": 50})]},
     "experiment[0].canary.arm", "one of the experiment's arms (control, treatment"),
    ({"experiment": [exp(canary={"arm": "treatment", "steps": [0.05, 0.01], "step_s": 60,
                                 "max_error_ratio": 0.01, "max_p99_ms": 50})]},
     "experiment[0].canary.steps", "strictly increasing"),
    ({"experiment": [exp(canary={"arm": "treatment", "steps": [0.0, 0.5], "step_s": 60,
                                 "max_error_ratio": 0.01, "max_p99_ms": 50})]},
     "experiment[0].canary.steps", "(0, 1]"),
    ({"experiment": [exp(canary={"arm": "treatment", "steps": [0.5], "step_s": 0,
                                 "max_error_ratio": 0.01, "max_p99_ms": 50})]},
     "experiment[0].canary.step_s", "> 0"),
    ({"experiment": [exp(canary={"arm": "treatment", "steps": [0.5], "step_s": 60,
                                 "max_error_ratio": 1.5, "max_p99_ms": 50})]},
     "experiment[0].canary.max_error_ratio", "in [0, 1]"),
    ({"experiment": [exp(canary={"arm": "treatment", "steps": [0.5], "step_s": 60,
                                 "max_error_ratio": 0.1})]},
     "experiment[0].canary.max_p99_ms", "required"),
    ({"experiment": [exp(canary=[1])]}, "experiment[0].canary", "must be a table"),
])
def test_every_validation_error_names_the_path_and_the_limit(doc: dict[str, Any], path: str,
                                                              says: str) -> None:
    errors = errors_of(doc)
    assert any(e.startswith(f"{path}: ") and says in e for e in errors), errors


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    errors = errors_of({"experiment": [exp(arms=[
        {"name": "a", "share": 0.7, "model_version": 9}, {"name": "b", "share": 0.7,
                                                          "preset": "viral"}])]})
    assert [e.split(":")[0] for e in errors] == [
        "experiment[0].arm[0].model_version", "experiment[0].arm[1].preset", "experiment[0].arm"]


def test_without_a_catalog_only_the_files_own_structure_is_checked() -> None:
    doc = {"experiment": [exp(arms=[{"name": "a", "share": 0.5, "model_version": 9},
                                    {"name": "b", "share": 0.5, "preset": "viral"}])]}
    assert parse_experiments(doc, None).experiments[0].arms[0].overrides.model_version == 9
    assert len(errors_of(doc, CATALOG)) == 2


def test_disjoint_traffic_ranges_do_not_overlap_and_split_the_users() -> None:
    cfg = parse_experiments({"experiment": [exp("x", "s1", traffic=[0, 0.3]),
                                            exp("y", "s2", traffic=[0.3, 1.0])]}, CATALOG)
    got = [cfg.assign(u) for u in USERS[:20_000]]
    assert all(a is not None for a in got)
    x = sum(a.experiment == "x" for a in got if a is not None)
    assert abs(x - 6000) < 5 * math.sqrt(20_000 * 0.3 * 0.7)


def test_users_outside_every_traffic_range_are_in_no_experiment() -> None:
    cfg = parse_experiments({"experiment": [exp(traffic=[0.0, 0.1])]}, CATALOG)
    got = [cfg.assign(u) for u in USERS[:20_000]]
    inside = sum(a is not None for a in got)
    assert abs(inside - 2000) < 5 * math.sqrt(20_000 * 0.1 * 0.9)


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[[experiment]\nname = ")
    with pytest.raises(ExperimentsError, match=r"experiments\.toml: not TOML: .*line 1"):
        load_experiments(p, CATALOG)
    with pytest.raises(ExperimentsError, match="cannot read"):
        load_experiments(tmp_path / "missing.toml", CATALOG)


# ---- assignment -------------------------------------------------------------------------------


def test_unit_hash_is_stable_and_in_the_unit_interval() -> None:
    # pinned: a change of the hash would silently reshuffle every running experiment
    assert unit_hash("2026-12", "u17") == unit_hash("2026-12", "u17")
    digest = hashlib.sha256(b"7:2026-12u17").digest()  # len(salt):salt + user id
    assert unit_hash("2026-12", "u17") == int.from_bytes(digest[:8], "big") / 2**64
    assert unit_hash("2026-12", "u17") == 0.6624278276239424
    assert unit_hash("ab", "c") != unit_hash("a", "bc")
    us = [unit_hash("s", u) for u in USERS[:10_000]]
    assert all(0.0 <= u < 1.0 for u in us)
    assert stats.kstest(us, "uniform").pvalue > 1e-3


def test_shares_hold_within_binomial_tolerance_over_100k_users() -> None:
    shares = [0.1, 0.3, 0.6]
    cfg = parse_experiments({"experiment": [exp(arms=[
        {"name": f"a{i}", "share": s} for i, s in enumerate(shares)])]}, CATALOG)
    counts = {f"a{i}": 0 for i in range(3)}
    for u in USERS:
        a = cfg.assign(u)
        assert a is not None
        counts[a.arm] += 1
    n = len(USERS)
    for i, s in enumerate(shares):  # 4.5 sigma each: a false failure about once in 10^5 runs
        assert abs(counts[f"a{i}"] - n * s) < 4.5 * math.sqrt(n * s * (1 - s)), counts
    assert stats.chisquare(list(counts.values()), [n * s for s in shares]).pvalue > 1e-4


def test_assignment_is_sticky_across_loads_and_processes(tmp_path: Path) -> None:
    p = write(tmp_path, ISSUE_EXAMPLE)
    first = load_experiments(p, CATALOG)
    again = load_experiments(p, None)  # another process reading the same file
    for u in USERS[:2000]:
        a, b, c = first.assign(u), first.assign(u), again.assign(u)
        assert a == b and a is not None and c is not None and a.arm == c.arm


def test_two_salts_give_independent_assignments() -> None:
    """Chi-square test of independence of the 2x2 table of arms under salt A and salt B."""
    a = parse_experiments({"experiment": [exp(salt="A")]}, CATALOG).experiments[0]
    b = parse_experiments({"experiment": [exp(salt="B")]}, CATALOG).experiments[0]
    table = np.zeros((2, 2))
    names = {"control": 0, "treatment": 1}
    for u in USERS:
        table[names[a.assign(u).name], names[b.assign(u).name]] += 1
    res = stats.chi2_contingency(table)
    assert res.pvalue > 1e-3, table
    # and the same salt gives the same split (the test above would notice a dependent one)
    assert all(a.assign(u) == a.assign(u) for u in USERS[:100])


def test_a_canary_that_grows_keeps_its_users() -> None:
    cfg = parse_experiments({"experiment": [exp(
        arms=[{"name": "control", "share": 0.0}, {"name": "canary", "share": 1.0}],
        canary={"arm": "canary", "steps": [0.01, 0.05, 0.25, 1.0], "step_s": 600,
                "max_error_ratio": 0.01, "max_p99_ms": 50})]}, CATALOG)
    e = cfg.experiments[0]
    assert e.canary is not None and e.canary.steps == (0.01, 0.05, 0.25, 1.0)
    assert e.shares_at(1) == {"control": pytest.approx(0.95), "canary": 0.05}
    prev: set[str] = set()
    for step in range(4):
        shares = e.shares_at(step)
        now = {u for u in USERS[:20_000] if e.assign(u, shares).name == "canary"}
        assert prev <= now
        n, s = 20_000, shares["canary"]
        assert abs(len(now) - n * s) <= 5 * math.sqrt(n * s * (1 - s)) + 1e-9
        prev = now
    via = cfg.assign("u5", {e.name: e.shares_at(0)})
    assert via is not None and via.arm == e.assign("u5", e.shares_at(0)).name


def test_a_forced_arm_names_a_declared_experiment_and_arm() -> None:
    cfg = parse_experiments({"experiment": [exp("v2-vs-v1")]}, CATALOG)
    a = cfg.force("v2-vs-v1/treatment")
    assert (a.experiment, a.arm, a.forced) == ("v2-vs-v1", "treatment", True)
    with pytest.raises(ForcedArmError, match="must be 'experiment/arm'"):
        cfg.force("treatment")
    with pytest.raises(ForcedArmError, match=r"unknown experiment 'nope' \(known: v2-vs-v1\)"):
        cfg.force("nope/treatment")
    with pytest.raises(ForcedArmError, match=r"has no arm 'x' \(arms: control, treatment\)"):
        cfg.force("v2-vs-v1/x")


# ---- reload -----------------------------------------------------------------------------------


def test_the_loader_keeps_the_old_config_when_the_new_file_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, ISSUE_EXAMPLE)
    loader = ExperimentsLoader(p, CATALOG)
    first = loader.load()
    assert first.ok and first.changed and first.experiments.experiments[0].name == "v2-vs-v1"
    assert not loader.load().changed  # same bytes: nothing to swap
    p.write_text(ISSUE_EXAMPLE.replace("model_version = 2", "model_version = 9"))
    refused = loader.load()
    assert not refused.ok and refused.experiments is first.experiments
    assert refused.error is not None and "experiment[0].arm[1].model_version" in refused.error
    assert loader.current is first.experiments
    p.write_text(ISSUE_EXAMPLE.replace('"2026-12"', '"2027-01"'))
    swapped = loader.load()
    assert swapped.ok and swapped.changed and loader.current.experiments[0].salt == "2027-01"
    # a new catalog (a version removed from the repository) refuses what it no longer has
    gone = Catalog(**{**CATALOG.__dict__, "versions": {"mmoe": [1]}})
    assert not loader.load(gone).ok and loader.current is swapped.experiments
    assert ExperimentsLoader(None).load().experiments.experiments == ()


# ---- properties -------------------------------------------------------------------------------

_weights = st.lists(st.integers(min_value=0, max_value=1000), min_size=2, max_size=6).filter(
    lambda w: sum(w) > 0)


@settings(max_examples=200, deadline=None)
@given(_weights, st.text(min_size=1, max_size=20), st.lists(st.text(max_size=30), min_size=1,
                                                           max_size=30))
def test_any_shares_that_sum_to_one_load_and_every_user_gets_a_declared_arm(
        weights: list[int], salt: str, users: list[str]) -> None:
    total = sum(weights)
    shares = [w / total for w in weights]
    shares[-1] = 1.0 - math.fsum(shares[:-1])  # exact to float rounding, as a user would write
    if salt == "traffic":
        salt += "!"
    arms = [{"name": f"arm{i}", "share": s} for i, s in enumerate(shares)]
    cfg = parse_experiments({"experiment": [exp(salt=salt, arms=arms)]}, CATALOG)
    e: Experiment = cfg.experiments[0]
    for u in users:
        a = cfg.assign(u)
        assert a is not None and a.arm in e.shares()
        assert e.shares()[a.arm] > 0  # an arm of share 0 is never assigned


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1, allow_nan=False), min_size=2, max_size=6))
def test_shares_are_accepted_exactly_when_they_sum_to_one(shares: list[float]) -> None:
    arms = [{"name": f"arm{i}", "share": s} for i, s in enumerate(shares)]
    doc = {"experiment": [exp(arms=arms)]}
    if abs(math.fsum(shares) - 1.0) <= 1e-9:
        parse_experiments(doc, CATALOG)
    else:
        assert any("must sum to 1" in e for e in errors_of(doc))


def test_the_catalog_takes_the_services_presets_defaults_and_bounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKER_WEIGHT_MAX", "5")
    cat = Catalog.from_settings(Settings(), {"mmoe": [3]}, ("click", "like", "share"))
    assert cat.weight_bounds == (0.0, 5.0) and cat.default_model == "mmoe"
    doc = {"experiment": [exp(arms=[{"name": "a", "share": 0.5, "weights": {"click": 6}},
                                    {"name": "b", "share": 0.5, "model_version": 3}])]}
    assert errors_of(doc, cat) == [
        "experiment[0].arm[0].weights.click: weight must be between 0 and 5"]


def test_the_documented_example_loads(tmp_path: Path) -> None:
    """docs/experiments.md's full example (with traffic range and canary) is a valid file."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "experiments.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = load_experiments(write(tmp_path, example), CATALOG)
    (e,) = cfg.experiments
    assert e.traffic == (0.0, 0.5) and e.canary is not None and e.canary.arm == "treatment"
    assert cfg.traffic_salt == "traffic-1"
    assert e.canary.start is not None and cfg.shadow is not None and cfg.shadow.share == 0.1
