"""The experiment report: per experiment and arm, impressions, users, requests and rates per
task with 95 % CIs, the lift over control with its CI and p-value, and a sample-ratio check.

Input: an exported served log (`DIR/impressions`, `DIR/feedback`, docs/closing-the-loop.md).
Labels come from `ranker.logjoin.join_labels`, the join the trainer uses: an event counts for
its impression when it comes within `window_s` after it, once per impression and task. The
statistics are `analysis.stats` (bootstrap CIs and permutation p-values over users, Holm over
the tasks of an arm; the naive z-test beside them).

Declared shares (for the SRM check) come from the experiments file, passed in by the caller:
the log names each impression's experiment and arm but not the shares, and the file is the
source of truth of what was intended (a log that recorded the shares it saw would recheck the
assignment against itself).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from statsmodels.stats.multitest import multipletests

from analysis.stats import (
    LEVEL,
    SRM_ALPHA,
    UserTotals,
    lift,
    naive_rate_ci,
    rate_ci,
    sample_ratio,
)
from ranker.logjoin import DEFAULT_WINDOW_S, LogError, join_labels, read_feedback, read_impressions
from ranker.servedlog import FEEDBACK_DIR, IMPRESSIONS_DIR, SCORE_PREFIX, STREAM_ID, part_files

REPORT_JSON, REPORT_MD, REPORT_PNG = "experiment_report.json", "experiment_report.md", \
    "experiment_report.png"
ALPHA = 1 - LEVEL
_COLUMNS = (STREAM_ID, "ts", "request_id", "user_id", "item_id", "position", "experiment", "arm")


def log_tasks(files: Sequence[Path]) -> list[str]:
    """The tasks the log's impressions were scored for (their `score_<task>` columns)."""
    tasks: list[str] = []
    for f in files:
        for name in pq.read_schema(f).names:
            t = name.removeprefix(SCORE_PREFIX)
            if name.startswith(SCORE_PREFIX) and t not in tasks:
                tasks.append(t)
    return tasks


def per_user(users: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Impressions (U,) and events per task (U, T) of each distinct user among the rows."""
    _, inverse = np.unique(users, return_inverse=True)
    u = int(inverse.max()) + 1 if inverse.size else 0
    n = np.bincount(inverse, minlength=u)
    k = np.stack([np.bincount(inverse, weights=labels[:, j], minlength=u)
                  for j in range(labels.shape[1])], axis=1) if u else np.zeros((0, labels.shape[1]))
    return n.astype(np.int64), np.rint(k).astype(np.int64)


def _pick_control(arms: Sequence[str], control: str | None, experiment: str) -> str:
    if control is not None:
        if control not in arms:
            raise LogError(f"experiment {experiment!r}: no arm {control!r} in the log "
                           f"(arms: {', '.join(arms)}); pass --control")
        return control
    return "control" if "control" in arms else arms[0]


def experiment_report(
    log_dir: Path,
    *,
    window_s: float = DEFAULT_WINDOW_S,
    control: str | None = None,
    shares: Mapping[str, Mapping[str, float]] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The report of every experiment in the log, as a JSON-ready dict.

    `shares` (experiment -> arm -> share, from the experiments file) orders the arms and is the
    SRM check's expectation; without it the check is not made (and the report says so)."""
    log_dir = Path(log_dir)
    imp_files = part_files(log_dir / IMPRESSIONS_DIR)
    if not imp_files:
        raise LogError(f"{log_dir / IMPRESSIONS_DIR}: no impression files (ranker logs export)")
    tasks = log_tasks(imp_files)
    has_forced = all("forced" in pq.read_schema(f).names for f in imp_files)
    impressions = read_impressions(imp_files, (*_COLUMNS, "forced") if has_forced else _COLUMNS)
    feedback = read_feedback(part_files(log_dir / FEEDBACK_DIR))
    labels, keep, counts = join_labels(impressions, feedback, tasks, window_s)
    impressions, labels = impressions.filter(pa.array(keep)), labels[keep]
    in_exp = pc.and_(pc.is_valid(impressions["experiment"]), pc.is_valid(impressions["arm"]))
    mask = np.asarray(in_exp.to_numpy(zero_copy_only=False), dtype=bool)
    # forced arms (the QA header) are no randomised users: out of every count and the SRM check
    forced = (np.asarray(pc.fill_null(impressions["forced"], False).to_numpy(
        zero_copy_only=False), dtype=bool) if has_forced else np.zeros(len(mask), dtype=bool))
    mask &= ~forced
    exp_col = np.asarray(impressions["experiment"].to_pylist(), dtype=object)
    arm_col = np.asarray(impressions["arm"].to_pylist(), dtype=object)
    users = np.asarray(impressions["user_id"].to_pylist(), dtype=object)
    requests = np.asarray(impressions["request_id"].to_pylist(), dtype=object)
    rng = np.random.default_rng(seed)
    experiments = []
    names = sorted({str(e) for e in exp_col[mask]}, key=lambda e: (
        list((shares or {}).keys()).index(e) if e in (shares or {}) else math.inf, e))
    for name in names:
        rows = mask & (exp_col == name)
        declared = None if shares is None else shares.get(name)
        experiments.append(_one_experiment(
            name, rows, arm_col, users, requests, labels, tasks, declared, control, rng,
            n_resamples))
    missing = sorted(set(shares or {}) - set(names))
    return {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "logs": str(log_dir),
        "tasks": tasks,
        "window_s": window_s,
        "level": LEVEL,
        "alpha": ALPHA,
        "srm_alpha": SRM_ALPHA,
        "method": {
            "ci": "bootstrap over users (scipy.stats.bootstrap, percentile), "
                  f"{n_resamples} resamples, seed {seed}",
            "p_value": "permutation of the users between the arms (scipy.stats.permutation_test"
                       f", two-sided, {n_resamples} resamples); significant: Holm-adjusted over "
                       "the tasks of an arm (statsmodels multipletests) below alpha",
            "naive": "two-proportion z-test (statsmodels proportions_ztest) and Wilson "
                     "intervals, every impression independent",
            "srm": "chi-square (scipy.stats.chisquare) of users per arm against the declared "
                   "shares",
        },
        "join": counts.as_dict(),
        "outside_experiments": {"impressions": int((~mask & ~forced).sum())},
        "forced_impressions_left_out": int(forced.sum()),
        "declared_not_in_log": missing,
        "experiments": experiments,
    }


def _one_experiment(name: str, rows: np.ndarray, arm_col: np.ndarray, users: np.ndarray,
                    requests: np.ndarray, labels: np.ndarray, tasks: Sequence[str],
                    declared: Mapping[str, float] | None, control: str | None,
                    rng: np.random.Generator, n_resamples: int) -> dict[str, Any]:
    seen = {str(a) for a in arm_col[rows]}
    arms = [a for a in (declared or {}) if a in seen] + sorted(seen - set(declared or {}))
    ctrl = _pick_control(arms, control, name)
    totals: dict[str, dict[str, UserTotals]] = {}
    out_arms: list[dict[str, Any]] = []
    users_of: dict[str, set[Any]] = {}
    for arm in arms:
        r = rows & (arm_col == arm)
        n, k = per_user(users[r], labels[r])
        totals[arm] = {t: UserTotals(n, k[:, j]) for j, t in enumerate(tasks)}
        users_of[arm] = set(users[r])
        out_arms.append({"name": arm, "control": arm == ctrl, "impressions": int(r.sum()),
                         "users": int(n.size), "requests": len(set(requests[r])), "tasks": {}})
    for entry in out_arms:
        arm = entry["name"]
        for t in tasks:
            tot = totals[arm][t]
            task: dict[str, Any] = {
                "events": int(tot.events.sum()), "rate": tot.rate,
                "ci": list(rate_ci(tot, rng, n_resamples)), "naive_ci": list(naive_rate_ci(tot)),
            }
            task["design_effect"] = _design_effect(task["ci"], task["naive_ci"])
            if arm != ctrl:
                lf = lift(tot, totals[ctrl][t], rng, n_resamples)
                task["lift"] = {"value": lf.value, "ci": list(lf.ci), "p_value": lf.p_value,
                                "p_value_floor": 1 / (n_resamples + 1),
                                "bootstrap_p_value": lf.bootstrap_p_value,
                                "naive_p_value": lf.naive_p_value,
                                "difference": lf.difference,
                                "difference_ci": list(lf.difference_ci)}
            entry["tasks"][t] = task
        if arm != ctrl:
            holm(entry["tasks"])
    several = {u for a in users_of for b in users_of if a < b for u in users_of[a] & users_of[b]}
    srm: dict[str, Any]
    if declared is None:
        srm = {"checked": False, "reason": "no experiments file: the declared shares are unknown"}
    else:
        s = sample_ratio({e["name"]: e["users"] for e in out_arms}, declared)
        srm = {"checked": True, **asdict(s)}
    return {"name": name, "control": ctrl, "declared_shares": dict(declared or {}) or None,
            "users_in_several_arms": len(several), "srm": srm, "arms": out_arms}


def holm(tasks: dict[str, dict[str, Any]]) -> None:
    """Holm's step-down adjustment (statsmodels `multipletests`) of one arm's p-values over the
    tasks: `significant` is the adjusted p below ALPHA, so that an arm with no effect on any
    task is reported significant somewhere at most ALPHA of the time, not about 3 x ALPHA."""
    names = [t for t, x in tasks.items() if math.isfinite(x["lift"]["p_value"])]
    adjusted = (multipletests([tasks[t]["lift"]["p_value"] for t in names], method="holm")[1]
                if names else [])
    for x in tasks.values():
        x["lift"]["p_holm"] = float("nan")
        x["lift"]["significant"] = False
    for t, p in zip(names, adjusted, strict=True):
        tasks[t]["lift"]["p_holm"] = float(p)
        tasks[t]["lift"]["significant"] = bool(p < ALPHA)


def _design_effect(ci: Sequence[float], naive: Sequence[float]) -> float | None:
    """(bootstrap width / naive width)²: how many impressions one independent one is worth."""
    w, w0 = ci[1] - ci[0], naive[1] - naive[0]
    return float((w / w0) ** 2) if w0 > 0 and math.isfinite(w) else None


# ---- outputs ----------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f} %"


def _p(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one section per experiment."""
    lines = [
        "# Experiment report",
        "",
        f"Log `{report['logs']}`; attribution window {report['window_s']:g} s (an event counts "
        "for its impression when it comes within the window after it, once per impression and "
        f"task). Rates are events / impressions; intervals are {100 * report['level']:g} %.",
        "",
        f"- CIs and p-values: {report['method']['ci']}; {report['method']['p_value']}.",
        f"- Naive (for comparison): {report['method']['naive']}.",
        f"- Sample ratio: {report['method']['srm']}, flagged below p = {report['srm_alpha']:g}.",
        "",
    ]
    j = report["join"]
    lines += [f"{j['impressions']} impressions, {j['events']} feedback events "
              f"({sum(j['labels'].values())} labels; late {j['late']}, orphan {j['orphan']}, "
              f"duplicate {j['duplicate']}, early {j['early']}, unknown task {j['unknown_task']}"
              f"); {j['window_open']} impressions whose window is still open at the log's end; "
              f"{report['outside_experiments']['impressions']} impressions outside any "
              "experiment.", ""]
    if report["declared_not_in_log"]:
        lines += [f"Declared but not in the log: {', '.join(report['declared_not_in_log'])}.",
                  ""]
    for e in report["experiments"]:
        lines += _experiment_markdown(e, report["tasks"])
    if not report["experiments"]:
        lines += ["No impression in the log names an experiment.", ""]
    return "\n".join(lines)


def _experiment_markdown(e: dict[str, Any], tasks: Sequence[str]) -> list[str]:
    srm = e["srm"]
    if not srm["checked"]:
        srm_line = f"Sample ratio: not checked ({srm['reason']})."
    else:
        verdict = "**MISMATCH**" if srm["mismatch"] else "no mismatch"
        users = ", ".join(f"{a} {n} (expected {srm['expected'][a]:.1f})"
                          for a, n in srm["observed"].items())
        srm_line = f"Sample ratio: {verdict}: {srm['reason']}; users {users}."
    lines = [f"## {e['name']}", "", f"Control: `{e['control']}`. {srm_line}"]
    if e["users_in_several_arms"]:
        lines.append(f"{e['users_in_several_arms']} users appear in more than one arm (forced "
                     "arms or a changed file); they count in each.")
    lines += ["", "| arm | impressions | users | requests |", "|---|---|---|---|"]
    lines += [f"| {a['name']} | {a['impressions']} | {a['users']} | {a['requests']} |"
              for a in e["arms"]]
    for t in tasks:
        lines += ["", f"### {t}", "",
                  "| arm | events | rate | 95 % CI (users) | naive CI | lift vs control "
                  "| lift CI | p (permutation) | p (Holm) | p (naive z) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for a in e["arms"]:
            x = a["tasks"][t]
            ci = f"{_pct(x['ci'][0])} .. {_pct(x['ci'][1])}"
            naive = f"{_pct(x['naive_ci'][0])} .. {_pct(x['naive_ci'][1])}"
            if "lift" in x:
                lf = x["lift"]
                mark = " *" if lf["significant"] else ""
                p = (f"≤ {_p(lf['p_value_floor'])}" if lf["p_value"] <= lf["p_value_floor"]
                     else _p(lf["p_value"]))  # the resampling's resolution, not a measured p
                cells = (f"{_pct(lf['value'])}{mark}", f"{_pct(lf['ci'][0])} .. "
                         f"{_pct(lf['ci'][1])}", p, _p(lf["p_holm"]), _p(lf["naive_p_value"]))
            else:
                cells = ("control", "", "", "", "")
            lines.append(f"| {a['name']} | {x['events']} | {_pct(x['rate'])} | {ci} | {naive} | "
                         + " | ".join(cells) + " |")
    lines += ["", "`*`: significant at 0.05 after Holm's adjustment over the tasks of the arm "
              "(p-values by permutation of the users between the arms; CIs by bootstrap over "
              "users). No correction across arms.", ""]
    return lines


def _finite(obj: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_report(report: dict[str, Any], out: Path, *, plot: bool = True) -> list[Path]:
    """experiment_report.{json,md} and, with matplotlib (the analysis extra), the PNG."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / REPORT_JSON, out / REPORT_MD]
    (out / REPORT_JSON).write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    (out / REPORT_MD).write_text(report_markdown(report))
    if plot and report["experiments"]:
        from analysis.plot import plot_rates  # matplotlib only when a figure is asked for

        plot_rates(report, out / REPORT_PNG)
        written.append(out / REPORT_PNG)
    return written
