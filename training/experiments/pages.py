"""The comparison pages of docs/experiments/ from the run directories' report.json files.

Every figure on those pages comes from a `ranker train` run directory under `--runs`: its
report.json (one seed's "models", or "seeds" -> "runs" for `--seeds`), plus `ndcg.json` where
`ndcg` wrote one. Nothing is typed by hand; regenerate with

    python -m training.experiments.pages ndcg --pos runs/exp/small/pos \
        --data data/synthetic-100k-pos                             # position page: NDCG@10
    python -m training.experiments.pages write --runs runs/exp --docs docs/experiments \
        --readme README.md --training docs/training.md

`write` also fills the blocks between `<!-- pages:NAME -->` and `<!-- /pages:NAME -->` in the
README and docs/training.md. The queue of jobs that made the runs, with their wall times and
the load average at start and end, is `--runs`/jobs.tsv (runs/exp/runner.sh writes it).

A comparison pools arms (a label -> a run directory and a model name in it) by seed. Mean ±
std are over each arm's seeds (sample std, ddof 1); a paired difference (arm − reference) uses
the seeds both have (same seed = same split, initial-weight draw and batch order); the tests
are `training.seeds.paired_tests` (paired t, Wilcoxon).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.experiments.report import stats
from training.seeds import paired_tests

Models = dict[str, Any]  # a report's "models" entry: name -> {"test": {task: {...}}, ...}
Pooled = dict[str, dict[int, dict[str, Any]]]  # arm label -> seed -> that arm's model entry


@dataclass(frozen=True)
class Arm:
    label: str
    run: str  # run directory, relative to --runs
    model: str  # the model's name in that run's report ("mmoe", "shared_bottom", ...)


@dataclass
class Page:
    name: str  # docs/experiments/<name>/README.md
    title: str
    intro: str
    tasks: list[str]
    arms: list[Arm]
    reference: str  # the arm every other is paired against
    metrics: list[str] = field(default_factory=lambda: ["auc", "log_loss"])
    jobs: list[str] = field(default_factory=list)  # job names (prefixes) in jobs.tsv
    plots: list[tuple[str, str, str]] = field(default_factory=list)  # (run, png, copy as)
    notes: str = ""
    oracle_run: str | None = None  # a run whose report has "oracle_auc" (same data)
    extra: Callable[[Path], list[str]] | None = None  # more generated lines (checks)


# ---------------------------------------------------------------------------------- loading


def load_report(run_dir: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((run_dir / "report.json").read_text())
    return report


def seed_runs(run_dir: Path) -> dict[int, Models]:
    """seed -> that seed's "models" of one run directory (or of every directory a glob such as
    `pos/tower0-s*` matches, one seed each), with ndcg.json's figures merged into each model's
    test metrics (`ndcg10` per task) when present, and the gate health per task as the metrics
    `gate_entropy` (normalised entropy of the mean gate) and `gate_max_util`."""
    if "*" in run_dir.name:
        merged: dict[int, Models] = {}
        for d in sorted(r.parent for r in run_dir.parent.glob(f"{run_dir.name}/report.json")):
            for s, m in seed_runs(d).items():
                if s in merged:
                    raise ValueError(f"{d}: seed {s} twice in {run_dir}")
                merged[s] = m
        return merged
    report = load_report(run_dir)
    if "seeds" in report:
        runs = {int(s): m for s, m in report["seeds"]["runs"].items()}
    else:
        runs = {int(report["train_config"]["seed"]): report["models"]}
    extra = run_dir / "ndcg.json"
    if extra.exists():
        nd = json.loads(extra.read_text())
        for seed, models in runs.items():
            for name, per_task in nd.get(str(seed), {}).items():
                for t, v in per_task.items():
                    models[name]["test"][t]["ndcg10"] = v
    for models in runs.values():
        for m in models.values():
            for t, h in m["test"].get("gate_health", {}).items():
                if t in m["test"]:
                    m["test"][t]["gate_entropy"] = h["entropy_norm"]
                    m["test"][t]["gate_max_util"] = max(h["utilisation"])
    return runs


def arm_entry(models: Models, model: str, run: str) -> dict[str, Any]:
    """The model entry an arm names; `single_*` joins the single-task models (single_<task>,
    one task each) into one entry with every task."""
    if model == "single_*":
        singles = {k[len("single_"):]: v for k, v in models.items() if k.startswith("single_")}
        if not singles:
            raise KeyError(f"{run}: no single-task models")
        return {"model_type": "single-task", "tasks": list(singles),
                "test": {t: v["test"][t] for t, v in singles.items()}}
    if model not in models:
        raise KeyError(f"{run}: no model {model!r} (has {sorted(models)})")
    entry: dict[str, Any] = models[model]
    return entry


def pool(root: Path, arms: Sequence[Arm]) -> Pooled:
    """arm label -> seed -> the arm's model entry, over the seeds that arm's runs have."""
    return {a.label: {s: arm_entry(m, a.model, a.run)
                      for s, m in sorted(seed_runs(root / a.run).items())} for a in arms}


def values(pooled: Pooled, label: str, task: str, metric: str,
           seeds: Sequence[int] | None = None) -> list[float] | None:
    """The arm's metric per seed (its own seeds, or these), None when it has no such figure."""
    runs = pooled[label]
    seeds = sorted(runs) if seeds is None else list(seeds)
    if not seeds or task not in runs[seeds[0]]["test"]:
        return None
    if metric not in runs[seeds[0]]["test"][task]:
        return None
    return [float(runs[s]["test"][task][metric]) for s in seeds]


def common_seeds(pooled: Pooled, labels: Sequence[str]) -> list[int]:
    return sorted(set.intersection(*(set(pooled[lab]) for lab in labels)))


# ---------------------------------------------------------------------------------- tables

METRIC_NAMES = {"auc": "test AUC", "log_loss": "test log loss", "ece": "test ECE (10 bins)",
                "ndcg10": "NDCG@10 against the true probabilities",
                "gate_entropy": "gate entropy (normalised, 1 = uniform)",
                "gate_max_util": "largest expert utilisation"}
# no entry (the gate's health): neither direction is better in itself, so no bold, no verdict word
HIGHER_BETTER = {"auc": True, "log_loss": False, "ece": False, "ndcg10": True}
DIGITS = {"auc": 4, "log_loss": 4, "ece": 4, "ndcg10": 4, "gate_entropy": 3, "gate_max_util": 3}


def fmt(xs: list[float] | None, digits: int = 4) -> str:
    if not xs:
        return "—"
    s = stats(xs)
    if len(xs) == 1:  # one seed: no spread to show
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def mean_std_table(pooled: Pooled, labels: Sequence[str], tasks: Sequence[str], metric: str,
                   oracle: dict[str, float] | None = None) -> list[str]:
    """| arm | seeds | task1 | task2 | ... | with mean ± std over each arm's seeds; the best mean
    per task in bold."""
    d = DIGITS.get(metric, 4)
    best: dict[str, float] = {}
    for t in tasks:
        means = [float(np.mean(v)) for lab in labels if (v := values(pooled, lab, t, metric))]
        if means and metric in HIGHER_BETTER:
            best[t] = max(means) if HIGHER_BETTER[metric] else min(means)
    lines = ["| arm | seeds | " + " | ".join(tasks) + " |",
             "|---|---:" + "|---:" * len(tasks) + "|"]
    for lab in labels:
        cells = [str(len(pooled[lab]))]
        for t in tasks:
            v = values(pooled, lab, t, metric)
            c = fmt(v, d)
            if v and t in best and abs(float(np.mean(v)) - best[t]) < 10 ** -(d + 2):
                c = f"**{c}**"
            cells.append(c)
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    if oracle and metric == "auc":
        lines.append("| oracle (true p) | | " + " | ".join(
            f"{oracle[t]:.4f}" if t in oracle else "—" for t in tasks) + " |")
    return lines


def paired_rows(pooled: Pooled, labels: Sequence[str], ref: str, tasks: Sequence[str],
                metric: str) -> list[str]:
    """Each arm − the reference, per task: mean ± std of the per-seed differences, p values."""
    d = DIGITS.get(metric, 4)
    lines = [f"| arm − {ref} | task | mean diff | std diff | paired t p | Wilcoxon p | n |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for lab in labels:
        if lab == ref:
            continue
        seeds = common_seeds(pooled, [lab, ref])
        two = {s: {lab: pooled[lab][s], ref: pooled[ref][s]} for s in seeds}
        for r in paired_tests(two, list(tasks), lab, metric):
            lines.append(
                f"| {lab} | {r['task']} | {r['mean_diff']:+.{d}f} | {r['std_diff']:.{d}f} "
                f"| {_p(r['ttest_rel_p'])} | {_p(r['wilcoxon_p'])} | {r['n']} |")
    return lines


def training_table(pooled: Pooled, labels: Sequence[str]) -> list[str]:
    """Per arm: the best (early-stopping) epoch and the epochs run per seed, training seconds,
    and the loss weights of the last epoch (mean over seeds) where a balancer learned them."""
    lines = ["## Training", "",
             "| arm | best epoch / epochs run, per seed | training s (mean) | loss weights at "
             "the last epoch (mean over seeds) |", "|---|---|---:|---|"]
    for lab in labels:
        runs = [pooled[lab][s] for s in sorted(pooled[lab])]
        if not all("history" in r for r in runs):
            lines.append(f"| {lab} | — | — | — |")  # a joined arm (single-task)
            continue
        hist: list[dict[str, Any]] = [r["history"] for r in runs]
        eps = ", ".join(f"{h['best_epoch']}/{len(h['val_loss'])}" for h in hist)
        secs = float(np.mean([h.get("seconds", float("nan")) for h in hist]))
        tw = [h["task_weights"][-1] for h in hist if h.get("task_weights")]
        w = "—"
        if tw and any(abs(v - 1.0) > 1e-9 for d in tw for v in d.values()):
            w = ", ".join(f"{t} {np.mean([d[t] for d in tw]):.3f}" for t in tw[0])
        lines.append(f"| {lab} | {eps} | {secs:.0f} | {w} |")
    return [*lines, ""]


def verdicts(pooled: Pooled, labels: Sequence[str], ref: str, tasks: Sequence[str],
             metric: str, alpha: float = 0.05) -> list[str]:
    """One line per arm: each task's mean difference to the reference, called better / worse
    when the paired t test's p < alpha, else "no significant difference"."""
    d = DIGITS.get(metric, 4)
    hib = HIGHER_BETTER.get(metric)
    out = []
    for lab in labels:
        if lab == ref:
            continue
        seeds = common_seeds(pooled, [lab, ref])
        two = {s: {lab: pooled[lab][s], ref: pooled[ref][s]} for s in seeds}
        parts = []
        for r in paired_tests(two, list(tasks), lab, metric):
            p = r["ttest_rel_p"]
            if p is not None and p < alpha:
                up = r["mean_diff"] > 0
                word = ("higher" if up else "lower") if hib is None else (
                    "better" if up == hib else "worse")
            elif p is None:
                word = "not tested: fewer than 2 seeds or no difference"
            else:
                word = "no significant difference"
            parts.append(f"{r['task']} {r['mean_diff']:+.{d}f} ({word}, p {_p(p)})")
        if parts:
            out.append(f"- **{lab}** − {ref}: " + "; ".join(parts))
    return out


def _p(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def jobs_table(root: Path, prefixes: Sequence[str]) -> list[str]:
    """The jobs that made a page's runs: wall time and the 1-minute load average at start/end."""
    rows = []
    for line in _lines(root, "jobs.tsv", "jobs-manual.tsv"):
        name, start, end, wall, l0, l1, rc = line.split("\t")
        if _matches(name, prefixes):
            rows.append(f"| {name} | {start} – {end} | {wall} | {l0} → {l1} | {rc} |")
    if not rows:
        return []
    return ["| job | UTC | wall s | load (1 min) start → end | rc |",
            "|---|---|---:|---|---:|", *rows]


def commands(root: Path, prefixes: Sequence[str]) -> list[str]:
    """The exact commands of the page's jobs that ran (in jobs.tsv; from the queue the runner
    ran, under nice -n 19 each)."""
    ran = {line.split("\t")[0] for line in _lines(root, "jobs.tsv", "jobs-manual.tsv")}
    out = []
    for line in _lines(root, "queue.txt", "queue-manual.txt"):
        name, _, cmd = line.partition("\t")
        if _matches(name, prefixes) and name in ran:
            out.append(cmd)
    return out


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    """A job belongs to a page when its name is a prefix or starts with `prefix-` (a prefix
    ending in `$`: that name only)."""
    return any(name == p.rstrip("$") or (not p.endswith("$") and name.startswith(p + "-"))
               for p in prefixes)


def _lines(root: Path, *names: str) -> list[str]:
    out: list[str] = []
    for n in names:
        if (root / n).exists():
            out += [x for x in (root / n).read_text().splitlines() if x.strip()]
    return out


def first_run(root: Path, run: str) -> Path | None:
    """The run directory (or the first a glob matches) that has a report.json."""
    found = sorted(p.parent for p in root.glob(f"{run}/report.json"))
    return found[0] if found else None


def oracle_of(root: Path, run: str | None) -> dict[str, float] | None:
    d = first_run(root, run) if run else None
    if d is None:
        return None
    o = load_report(d).get("oracle_auc")
    return {str(k): float(v) for k, v in o.items()} if o else None


def render(page: Page, root: Path, docs: Path) -> str:
    pooled = pool(root, page.arms)
    labels = [a.label for a in page.arms]
    oracle = oracle_of(root, page.oracle_run)
    out = [f"# {page.title}", "", page.intro.strip(), "",
           "Mean ± sample std over each arm's seeds; best mean per task in bold; the paired "
           "tests use the seeds both arms have (same seed = same split, initial-weight draw and "
           "batch order). Arms (run directory under `runs/exp/`, model in its report, seeds):",
           ""]
    out += [f"- **{a.label}**: `{a.run}`, `{a.model}`, seeds "
            f"{', '.join(map(str, sorted(pooled[a.label])))}" for a in page.arms]
    out.append("")
    for m in page.metrics:
        out += [f"## {METRIC_NAMES.get(m, m)}", ""]
        out += mean_std_table(pooled, labels, page.tasks, m, oracle)
        direction = "" if m not in HIGHER_BETTER else (
            "; higher is better" if HIGHER_BETTER[m] else "; lower is better")
        out += ["", "In short (paired t test over the common seeds, p < 0.05, not corrected for "
                f"the number of comparisons on the page{direction}):", ""]
        out += verdicts(pooled, labels, page.reference, page.tasks, m)
        out += ["", f"Paired over seeds ({METRIC_NAMES.get(m, m)}; with 5 seeds the exact "
                "Wilcoxon p cannot go below 0.0625, with 3 not below 0.25):", ""]
        out += paired_rows(pooled, labels, page.reference, page.tasks, m)
        out.append("")
    out += training_table(pooled, labels)
    if page.extra:
        out += page.extra(root)
    if page.notes:
        out += [page.notes.strip(), ""]
    if page.plots:
        out += ["## Plots (seed 0's run of each arm)", ""]
        for run, png, name in page.plots:
            if png.startswith("reliability:"):  # drawn from the report: any model, seed 0
                from training.report import plot_reliability

                model = png.split(":", 1)[1]
                rel = load_report(root / run)["models"][model]["test"]["reliability"]
                plot_reliability(rel, docs / page.name / name, f"{run}: {model}, reliability")
            elif (root / run / png).exists():
                shutil.copyfile(root / run / png, docs / page.name / name)
            else:
                continue
            out.append(f"![{name}]({name})")
        out.append("")
    out += _provenance(root, page.jobs)
    return "\n".join(out) + "\n"


def _provenance(root: Path, jobs: Sequence[str]) -> list[str]:
    out = ["## How it was run", "",
           "Each job ran alone (one at a time), under `nice -n 19`, on the shared 2-core VM "
           "(other sessions' benchmarks and tests ran beside it: see the load column).", ""]
    cmds = commands(root, jobs)
    if cmds:
        out += ["```bash", *cmds, "```", ""]
    out += jobs_table(root, jobs)
    out += ["", "Regenerate this page: `python -m training.experiments.pages write --runs "
            "runs/exp --docs docs/experiments` (training/experiments/pages.py).", ""]
    return out


# ---------------------------------------------------------------------------------- world grid


@dataclass(frozen=True)
class World:
    name: str
    users: int
    items: int
    impressions: int
    relatedness: float
    mmoe: tuple[str, str] | None = None  # (run, model); default grid/<name>/mmoe*, "mmoe"
    sb: tuple[str, str] | None = None  # default grid/<name>/shared_bottom*, "shared_bottom"


GAP = 0.02  # the issue's goal: within 0.02 AUC of the oracle on every task


def grid_rows(root: Path, worlds: Sequence[World], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Per world and task: oracle AUC, MMoE and Shared-Bottom mean ± std, the gap and checks."""
    rows = []
    for w in worlds:
        # grid/<name>/mmoe, and mmoe-s1 ... when seeds were added as runs of their own
        mm_run, mm_model = w.mmoe or (f"grid/{w.name}/mmoe*", "mmoe")
        sb_run, sb_model = w.sb or (f"grid/{w.name}/shared_bottom*", "shared_bottom")
        if first_run(root, mm_run) is None:
            continue
        arms = [Arm("MMoE", mm_run, mm_model)]
        has_sb = first_run(root, sb_run) is not None
        if has_sb:
            arms.append(Arm("Shared-Bottom", sb_run, sb_model))
        pooled = pool(root, arms)
        oracle = oracle_of(root, mm_run) or {}
        for t in tasks:
            mm = values(pooled, "MMoE", t, "auc") or []
            sb = values(pooled, "Shared-Bottom", t, "auc") if has_sb else None
            gap = [oracle[t] - x for x in mm]
            spread = max(stats(mm)["std"], stats(sb)["std"] if sb else 0.0)
            diff = None
            if has_sb:
                both = common_seeds(pooled, ["MMoE", "Shared-Bottom"])
                a_ = values(pooled, "MMoE", t, "auc", both) or []
                b_ = values(pooled, "Shared-Bottom", t, "auc", both) or []
                diff = [a - b for a, b in zip(a_, b_, strict=True)]
            rows.append({
                "world": w, "task": t, "n": len(mm), "oracle": oracle[t], "mmoe": mm, "sb": sb,
                "gap": gap, "gap_met": bool(np.mean(gap) <= GAP),
                "diff": diff, "spread": spread,
                "sb_met": None if diff is None or len(mm) < 2 else bool(np.mean(diff) >= -spread),
            })
    return rows


def grid_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| world (users / items / impressions / relatedness) | task | seeds | oracle AUC "
             "| MMoE AUC | oracle − MMoE | ≤ 0.02 | Shared-Bottom AUC | MMoE − SB | "
             "seed spread | not below SB by more |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        w = r["world"]
        yn = "met" if r["gap_met"] else "**not met**"
        sb_yn = "—" if r["sb_met"] is None else ("met" if r["sb_met"] else "**not met**")
        spread = "—" if r["n"] < 2 else f"{r['spread']:.4f}"
        lines.append(
            f"| {w.name} ({w.users:,} / {w.items:,} / {w.impressions:,} / {w.relatedness:g}) "
            f"| {r['task']} | {r['n']} | {r['oracle']:.4f} | {fmt(r['mmoe'])} | {fmt(r['gap'])} "
            f"| {yn} | {fmt(r['sb'])} | {fmt(r['diff'])} | {spread} | {sb_yn} |")
    return lines


# ---------------------------------------------------------------------------------- splicing


def splice(text: str, name: str, body: str) -> str:
    """Replace what lies between `<!-- pages:name -->` and `<!-- /pages:name -->`."""
    start, end = f"<!-- pages:{name} -->", f"<!-- /pages:{name} -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"no {start} ... {end} block")
    return text[: i + len(start)] + "\n" + body.strip("\n") + "\n" + text[j:]


# ---------------------------------------------------------------------------------- NDCG


def ndcg_at(pred: np.ndarray, gain: np.ndarray, groups: np.ndarray, k: int = 10) -> float:
    """Mean over groups (users) of DCG@k of the predicted order / DCG@k of the ideal order,
    gains = the true probabilities; groups with fewer than 2 rows are left out."""
    order = np.lexsort((-pred, groups))
    g_sorted, p_gain = groups[order], gain[order]
    ideal = np.lexsort((-gain, groups))
    i_gain = gain[ideal]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    ends = np.r_[starts[1:], len(g_sorted)]
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    scores = []
    for a, b in zip(starts, ends, strict=True):
        if b - a < 2:
            continue
        n = min(k, b - a)
        idcg = float(i_gain[a : a + n] @ disc[:n])
        if idcg > 0:
            scores.append(float(p_gain[a : a + n] @ disc[:n]) / idcg)
    return float(np.mean(scores))


def write_ndcg(run_dir: Path, data_dir: Path, k: int = 10) -> dict[str, Any]:
    """NDCG@k per task of a run's checkpoint on its test split, per test user, against the
    oracle's probabilities (no position input: as served). Writes run_dir/ndcg.json."""
    from training.data import build_schema, encode_split, load_raw
    from training.spec import load_spec
    from training.train import load_checkpoint, predict

    report = load_report(run_dir)
    spec = load_spec(report["spec"] or "synthetic")
    raw = load_raw(spec, data_dir)
    schema = build_schema(spec, raw)
    test = encode_split(spec, schema, raw, "test")
    assert test.oracle is not None, "NDCG against the oracle needs a synthetic world"
    users = raw.splits["test"][spec.source.user_key].to_numpy()
    model, _ = load_checkpoint(run_dir / "model.pt")
    pred = predict(model, test)
    seed = str(report["train_config"]["seed"])
    per_task = {t: ndcg_at(pred[t], test.oracle[:, j], users, k)
                for j, t in enumerate(spec.task_names)}
    out = {seed: {report["main"]: per_task}}
    (run_dir / "ndcg.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


# ---------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.experiments.pages")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the pages (and the README/training.md blocks)")
    w.add_argument("--runs", type=Path, default=Path("runs/exp"))
    w.add_argument("--docs", type=Path, default=Path("docs/experiments"))
    w.add_argument("--readme", type=Path)
    w.add_argument("--training", type=Path)
    n = sub.add_parser("ndcg", help="NDCG@10 of every run directory under --pos (ndcg.json)")
    n.add_argument("--pos", type=Path, default=Path("runs/exp/small/pos"))
    n.add_argument("--data", type=Path, default=Path("data/synthetic-100k-pos"))
    a = p.parse_args(argv)
    if a.cmd == "ndcg":
        for run in sorted(a.pos.glob("*/report.json")):
            print(run.parent, write_ndcg(run.parent, a.data))
        return 0
    from training.experiments import page_set

    page_set.write_all(a.runs, a.docs, a.readme, a.training)
    return 0


if __name__ == "__main__":
    sys.exit(main())
