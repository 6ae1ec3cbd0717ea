"""The loop's figures: AUCs on held-out logged impressions against the oracle's, and the online
rates of v1 and v2 on the same simulated requests against the oracle's and a random ranking's.

Reads the exported logs with the trainer's own join (`ranker.logjoin`) and split
(`training.from_logs.split_by_time`), so "held-out" is exactly the test split v2 was evaluated
on; the oracle's scores are `World.probabilities` of each logged (user, item, hour, surface).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ranker.logjoin import join_labels, read_feedback, read_impressions
from ranker.servedlog import FEEDBACK_DIR, IMPRESSIONS_DIR, part_files

if TYPE_CHECKING:
    from bench.loop import LoopConfig

TASKS = ("click", "like", "share")
COLUMNS = ["stream_id", "ts", "position", "request_id", "user_id", "item_id", "context",
           "model_version", *(f"score_{t}" for t in TASKS)]
# two-sided 95 % t quantiles by degrees of freedom (a paired CI over a few evaluation seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228}


def joined_log(log_dir: Path, window_s: float) -> tuple[pa.Table, np.ndarray]:
    """The log's impressions (one row per served item, duplicates dropped, time order) and
    their labels (N, T), by the trainer's join."""
    imp = read_impressions(part_files(log_dir / IMPRESSIONS_DIR), COLUMNS)
    fb = read_feedback(part_files(log_dir / FEEDBACK_DIR))
    labels, keep, _ = join_labels(imp, fb, TASKS, window_s)
    return imp.filter(pa.array(keep)), labels[keep]


def oracle_scores(world: Any, imp: pa.Table) -> dict[str, np.ndarray]:
    """The true marginal probabilities of each logged impression, in its logged context."""
    ctx = [json.loads(c) for c in imp["context"].to_pylist()]
    probs: dict[str, np.ndarray] = world.probabilities(
        world.user_index(imp["user_id"].to_pylist()), world.item_index(imp["item_id"].to_pylist()),
        np.array([int(c["hour"]) for c in ctx]), np.array([str(c["surface"]) for c in ctx]))
    return probs


def auc_table(imp: pa.Table, labels: np.ndarray, world: Any) -> dict[str, dict[str, Any]]:
    """Per task: positives, the served model's AUC (its logged scores) and the oracle's."""
    from training.metrics import auc

    oracle = oracle_scores(world, imp)
    out: dict[str, dict[str, Any]] = {}
    for j, t in enumerate(TASKS):
        y = labels[:, j]
        out[t] = {"impressions": len(y), "positives": int(y.sum()),
                  "served_model_auc": auc(y, imp[f"score_{t}"].to_numpy()),
                  "oracle_auc": auc(y, oracle[t])}
    return out


def heldout_aucs(log_dir: Path, world: Any, window_s: float,
                 v2_test: dict[str, Any], rows_test: int) -> dict[str, Any]:
    """On the test split of v2's training log (the latest 10 % of requests, never trained on):
    v2's AUC (from its run's report), v1's (the logged scores: v1 served them) and the
    oracle's, per task."""
    from training.from_logs import split_by_time

    imp, labels = joined_log(log_dir, window_s)
    test = split_by_time(imp["request_id"].to_pylist())["test"]
    imp, labels = imp.take(pa.array(test)), labels[test]
    table = auc_table(imp, labels, world)
    for t in TASKS:
        table[t] = {"impressions": table[t]["impressions"], "positives": table[t]["positives"],
                    "v2_auc": v2_test[t]["auc"], "v1_auc": table[t]["served_model_auc"],
                    "oracle_auc": table[t]["oracle_auc"]}
    return {"rows": len(test), "rows_in_v2_report": rows_test, "per_task": table}


def eval_aucs(log_dir: Path, world: Any, window_s: float,
              versions: Sequence[int]) -> dict[str, Any]:
    """On the evaluation traffic (seeds never trained on): each version's AUC on the impressions
    it served (its logged scores), next to the oracle's on the same impressions."""
    imp, labels = joined_log(log_dir, window_s)
    out: dict[str, Any] = {}
    for v in versions:
        mask = np.asarray(imp["model_version"].to_numpy() == v)
        out[f"v{v}"] = auc_table(imp.filter(pa.array(mask)), labels[mask], world)
    return out


def _sum_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The evaluation seeds of one version added up: counts, rates, expected rates, noise."""
    n = sum(s["impressions"] for s in runs)
    out: dict[str, Any] = {"requests": sum(s["answered"] for s in runs), "impressions": n,
                           "events": {}, "events_sd": {}, "rates": {}, "expected": {}}
    for t in TASKS:
        out["events"][t] = sum(s["events"][t] for s in runs)
        out["events_sd"][t] = math.sqrt(sum(s["expected_events_sd"][t] ** 2 for s in runs))
        out["rates"][t] = out["events"][t] / n
    for r in ("served", "oracle", "random"):
        out["expected"][r] = {k: sum(s["expected_rates"][r][k] * s["impressions"] for s in runs)
                              / n for k in (*TASKS, "weighted")}
    out["measured_weighted"] = sum(out["rates"].values())  # server default weights (1, 1, 1)
    return out


def _paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean of b - a over paired seeds, with a 95 % t interval."""
    d = [y - x for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(d)
    half = (T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))
            if len(d) > 1 else math.nan)
    return {"mean": mean, "ci95": [mean - half, mean + half], "per_seed": d}


def _closeness(served: float, oracle: float, random: float) -> float:
    """Where `served` sits from random (0) to the oracle (1)."""
    return (served - random) / (oracle - random) if oracle != random else math.nan


def online(eval_v1: Sequence[dict[str, Any]], eval_v2: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Online rates under v1 and v2 on the same requests (the same seeds), the oracle's and a
    random ranking's expected rates on them, and the noise of the comparison."""
    a, b = _sum_runs(eval_v1), _sum_runs(eval_v2)
    comparison: dict[str, Any] = {}
    for t in TASKS:
        diff = b["events"][t] - a["events"][t]
        # the two runs draw their users' events independently of each other's rankings;
        # sd of the difference of two independent counts (conservative: the runs share their
        # requests and random streams, which correlates them positively)
        sd = math.hypot(a["events_sd"][t], b["events_sd"][t])
        comparison[t] = {
            "events_v1": a["events"][t], "events_v2": b["events"][t],
            "difference": diff, "sd": sd, "z": diff / sd if sd else math.nan,
            "expected_served_diff": _paired(
                [s["expected_rates"]["served"][t] for s in eval_v1],
                [s["expected_rates"]["served"][t] for s in eval_v2]),
        }
    comparison["weighted"] = {"expected_served_diff": _paired(
        [s["expected_rates"]["served"]["weighted"] for s in eval_v1],
        [s["expected_rates"]["served"]["weighted"] for s in eval_v2])}
    closeness = {
        f"v{i}": {k: {"measured": _closeness(
            agg["rates"][k] if k != "weighted" else agg["measured_weighted"],
            agg["expected"]["oracle"][k], agg["expected"]["random"][k]),
            "expected": _closeness(agg["expected"]["served"][k], agg["expected"]["oracle"][k],
                                   agg["expected"]["random"][k])}
            for k in (*TASKS, "weighted")}
        for i, agg in ((1, a), (2, b))}
    return {"v1": a, "v2": b, "comparison": comparison, "closeness": closeness}


def analyse(cfg: LoopConfig, logs: Path, repo: Path, v1: int, v2: int,
            v2_report: dict[str, Any], eval_v1: Sequence[dict[str, Any]],
            eval_v2: Sequence[dict[str, Any]], checks: list[dict[str, Any]]) -> dict[str, Any]:
    from training.synthetic import World

    world = World.load(cfg.data_dir)
    main = v2_report["main"]
    rows = v2_report["training_data"]["rows"]
    held = heldout_aucs(logs / "train", world, cfg.window_s, v2_report["models"][main]["test"],
                        rows["test"])
    checks.append({"check": "held-out rows = the test rows of v2's report",
                   "got": held["rows"], "want": rows["test"], "ok": held["rows"] == rows["test"]})
    imp_eval = {f"v{v}": 0 for v in (v1, v2)}
    ev = eval_aucs(logs / "eval", world, cfg.window_s, (v1, v2))
    for key in imp_eval:
        imp_eval[key] = ev[key]["click"]["impressions"]
    for key, runs in ((f"v{v1}", eval_v1), (f"v{v2}", eval_v2)):
        want = sum(s["impressions"] for s in runs)
        checks.append({"check": f"eval export: {key}'s impression rows = impressions served",
                       "got": imp_eval[key], "want": want, "ok": imp_eval[key] == want})
    return {"heldout_auc": held, "eval_auc": ev, "online": online(eval_v1, eval_v2),
            "training_impressions": v2_report["from_logs"]["counts"]["impressions"]}
