"""The report on simulated users (sim.core's position-based users in a synthetic world), with
arms assigned by the experiments file: a clearly worse arm is found worse, A/A runs are honest.

Offline: the rankings are computed here (control by the world's true click probability,
treatment at random), not served; the same proof through `ranker simulate` and the service
comes when arms are wired into /rank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analysis.report import experiment_report
from ranker.servedlog import FeedbackEvent, ServedRecord
from service.experiments import Experiments, parse_experiments
from sim.core import Population, PositionModel, evaluate, plan_request
from tests.analysis.logs import T0, write_records
from training.synthetic import TASKS, SyntheticConfig, World, generate_world

WEIGHTS = {"click": 1.0, "like": 0.0, "share": 0.0}
POSITION = PositionModel(top_k=10, eta=1.0)


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(SyntheticConfig.small())[0]


def experiments(salt: str) -> Experiments:
    return parse_experiments({"experiment": [{"name": "ab", "salt": salt, "arm": [
        {"name": "control", "share": 0.5}, {"name": "treatment", "share": 0.5}]}]})


def simulate(d: Path, world: World, cfg: Experiments, requests: int, seed: int,
             worse: bool) -> None:
    """`requests` simulated requests of 50 candidates, top 10 served, feedback drawn by sim.core;
    control ranks by the true click probability, treatment the same (A/A) or at random."""
    population = Population.draw(world, None, seed)
    rng = np.random.default_rng([seed, 7])
    records: list[tuple[str, ServedRecord]] = []
    events: list[tuple[str, FeedbackEvent]] = []
    for i in range(requests):
        plan = plan_request(world, population, i, seed, n_candidates=50)
        user = f"u{plan.user}"
        a = cfg.assign(user)
        assert a is not None
        click = world.conditionals(plan.user, plan.candidates, plan.hour, plan.surface)["click"]
        order = (rng.permutation(len(click)) if worse and a.arm == "treatment"
                 else np.argsort(-click, kind="stable"))
        served = plan.candidates[order][:POSITION.top_k]
        out = evaluate(world, plan, served, WEIGHTS, "weighted_sum", POSITION, seed)
        ts = T0 + i * 0.1
        rid = f"r{seed}-{i}"
        records.append((f"{int(ts * 1000)}-0", ServedRecord(
            ts=ts, request_id=rid, user_id=user, model_name="mmoe", model_version=1,
            scoring="weighted_sum", weights=WEIGHTS, context={}, tasks=TASKS,
            item_ids=[f"i{k}" for k in served], scores=np.zeros((len(served), 3), np.float32),
            final=np.zeros(len(served)), experiment=a.experiment, arm=a.arm)))
        for item, task in out.events:
            fts = ts + 1.0
            events.append((f"{int(fts * 1000)}-{len(events) % 1000}",
                           FeedbackEvent(rid, f"i{item}", task, fts)))
    write_records(d, records, events)


def test_a_clearly_worse_arm_is_found_worse_with_no_srm(tmp_path: Path, world: World) -> None:
    cfg = experiments("ab-1")
    simulate(tmp_path, world, cfg, 1500, seed=1, worse=True)
    report = experiment_report(tmp_path, shares=cfg.shares(), n_resamples=1000)
    (e,) = report["experiments"]
    assert e["srm"]["checked"] and not e["srm"]["mismatch"], e["srm"]
    treatment = next(a for a in e["arms"] if a["name"] == "treatment")
    lf = treatment["tasks"]["click"]["lift"]
    assert lf["p_value"] < 0.01 and lf["ci"][1] < 0, lf


def test_aa_runs_report_few_significant_differences(tmp_path: Path, world: World) -> None:
    """20 seeded A/A runs (another salt and other users' draws each): at most 3 significant at
    0.05 on click (expected 1; P(> 3 | 5 %) is 1.6 %)."""
    significant = []
    for seed in range(20):
        d = tmp_path / f"run{seed}"
        cfg = experiments(f"aa-{seed}")
        simulate(d, world, cfg, 400, seed=100 + seed, worse=False)
        report = experiment_report(d, shares=cfg.shares(), n_resamples=400, seed=seed)
        (e,) = report["experiments"]
        treatment = next(a for a in e["arms"] if a["name"] == "treatment")
        if treatment["tasks"]["click"]["lift"]["significant"]:
            significant.append(seed)
    assert len(significant) <= 3, significant
