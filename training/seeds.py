"""Runs over several seeds: mean ± std per model and task, and paired tests between models.

Every seed trains every model on the same split (the data and the schema do not depend on the
seed; the seed draws the initial weights and the batch order). Two models trained with the same
seed form a pair, so the test between them is a paired one over the seeds: Student's paired t
test (`scipy.stats.ttest_rel`) and the Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, exact
for small samples: with 5 seeds its smallest two-sided p is 2/32 = 0.0625, so it can never reach
0.05 there, which is why the t test is reported beside it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

METRICS = ("auc", "log_loss")


def seed_summary(runs: dict[int, dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Per model and task: each metric's values over the seeds, mean and sample std (ddof 1).

    `runs` maps seed -> the report's "models" entry of that seed's run.
    """
    seeds = sorted(runs)
    first = runs[seeds[0]]
    out: dict[str, Any] = {}
    for name in first:
        per_task: dict[str, Any] = {}
        for t in tasks:
            if t not in first[name]["test"]:
                continue  # a single-task model has only its task
            cell: dict[str, Any] = {}
            for m in METRICS:
                x = np.array([runs[s][name]["test"][t][m] for s in seeds], dtype=np.float64)
                cell[m] = {
                    "values": x.tolist(),
                    "mean": float(x.mean()),
                    "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
                }
            per_task[t] = cell
        out[name] = per_task
    return out


def paired_tests(
    runs: dict[int, dict[str, Any]], tasks: list[str], main: str, metric: str = "auc"
) -> list[dict[str, Any]]:
    """The main model against every other model on every task they share, paired by seed.

    Each row: the mean difference main − other, its sample std, the paired t test's and the
    Wilcoxon test's two-sided p (None when there are fewer than 2 seeds, or every difference is
    0, where neither test is defined).
    """
    from scipy import stats

    seeds = sorted(runs)
    rows = []
    for other in runs[seeds[0]]:
        if other == main:
            continue
        for t in tasks:
            if t not in runs[seeds[0]][other]["test"] or t not in runs[seeds[0]][main]["test"]:
                continue
            a = np.array([runs[s][main]["test"][t][metric] for s in seeds], dtype=np.float64)
            b = np.array([runs[s][other]["test"][t][metric] for s in seeds], dtype=np.float64)
            d = a - b
            t_p = w_p = None
            if len(d) >= 2 and np.any(d != 0):
                t_p = _finite(stats.ttest_rel(a, b).pvalue)
                w_p = _finite(stats.wilcoxon(a, b).pvalue)
            rows.append({
                "task": t, "metric": metric, "model": main, "other": other, "n": len(d),
                "mean_diff": float(d.mean()),
                "std_diff": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                "ttest_rel_p": t_p, "wilcoxon_p": w_p,
            })
    return rows


def _finite(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def seeds_markdown(section: dict[str, Any], tasks: list[str]) -> list[str]:
    """The report's lines for a multi-seed run: a mean ± std table and the paired tests."""
    seeds = section["seeds"]
    lines = [
        f"## Over {len(seeds)} seeds ({', '.join(map(str, seeds))}): test AUC, mean ± std",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|---" * (1 + len(tasks)) + "|",
    ]
    for name, per_task in section["summary"].items():
        cells = []
        for t in tasks:
            c = per_task.get(t)
            cells.append(f"{c['auc']['mean']:.4f} ± {c['auc']['std']:.4f}" if c else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired over seeds (same seed = same batch order and init draw): main − other test AUC.",
        "",
        "| task | other | mean diff | std diff | paired t p | Wilcoxon p |",
        "|---|---|---|---|---|---|",
    ]
    for r in section["paired"]:
        lines.append(
            f"| {r['task']} | {r['other']} | {r['mean_diff']:+.4f} | {r['std_diff']:.4f} "
            f"| {_p(r['ttest_rel_p'])} | {_p(r['wilcoxon_p'])} |"
        )
    lines.append("")
    return lines


def _p(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"
