"""Tables, the paper's four findings and plots for the synthetic task-correlation experiment."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

LABELS = {"mmoe": "MMoE", "omoe": "OMoE", "shared_bottom": "Shared-Bottom"}
COLORS = {"mmoe": "tab:red", "omoe": "tab:blue", "shared_bottom": "tab:green"}
METRICS = ("final_train_loss", "final_test_loss")

Key = tuple[str, float]


def group(runs: list[dict[str, Any]]) -> dict[Key, list[dict[str, Any]]]:
    """Runs by (model, correlation)."""
    out: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        out[(r["model"], float(r["correlation"]))].append(r)
    return dict(out)


def stats(values: list[float]) -> dict[str, float]:
    """n, mean, std (ddof=1), standard error, best (min), median, worst (max)."""
    a = np.asarray(values, dtype=float)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {
        "n": len(a),
        "mean": float(a.mean()),
        "std": std,
        "sem": std / math.sqrt(len(a)),
        "best": float(a.min()),
        "median": float(np.median(a)),
        "worst": float(a.max()),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[Key, dict[str, float]]]:
    """metric -> (model, correlation) -> stats."""
    groups = group(runs)
    return {m: {k: stats([r[m] for r in v]) for k, v in groups.items()} for m in METRICS}


def _order(runs: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
    """Models in the paper's order, correlations from most to least related."""
    models = [m for m in LABELS if any(r["model"] == m for r in runs)]
    corrs = sorted({float(r["correlation"]) for r in runs}, reverse=True)
    return models, corrs


def findings(
    table: dict[Key, dict[str, float]], models: list[str], corrs: list[float]
) -> list[dict[str, Any]]:
    """The paper's four claims, each checked on mean (or std) final loss: claim, holds, detail."""
    mean = {k: v["mean"] for k, v in table.items()}
    std = {k: v["std"] for k, v in table.items()}
    out: list[dict[str, Any]] = []

    per_model = []
    all_mono = True
    for m in models:
        seq = [mean[(m, p)] for p in corrs]
        mono = all(a <= b for a, b in itertools.pairwise(seq))
        all_mono &= mono
        text = " → ".join(f"{v:.4f}" for v in seq)
        per_model.append(f"{LABELS[m]}: {text}" + ("" if mono else " (not monotone)"))
    out.append(
        {
            "claim": "every model does better on more related tasks "
            f"(mean loss rises as p goes {' → '.join(f'{p:g}' for p in corrs)})",
            "holds": all_mono,
            "detail": "; ".join(per_model),
        }
    )

    hi, lo = corrs[0], corrs[-1]
    drop = {m: mean[(m, lo)] - mean[(m, hi)] for m in models}
    # standard error of a difference of two independent means
    drop_se = {m: math.hypot(table[(m, lo)]["sem"], table[(m, hi)]["sem"]) for m in models}
    least = min(drop, key=lambda m: drop[m])
    out.append(
        {
            "claim": f"MMoE loses least as the correlation drops (loss at p={lo:g} minus p={hi:g})",
            "holds": least == "mmoe",
            "detail": "; ".join(f"{LABELS[m]}: {drop[m]:+.4f} ± {drop_se[m]:.4f}" for m in models),
        }
    )

    if "shared_bottom" in models:
        mixtures = [m for m in models if m != "shared_bottom"]
        beats = all(mean[(m, p)] < mean[("shared_bottom", p)] for m in mixtures for p in corrs)
        out.append(
            {
                "claim": "both mixture models beat Shared-Bottom at every correlation",
                "holds": beats,
                "detail": "; ".join(
                    f"p={p:g}: " + ", ".join(f"{LABELS[m]} {mean[(m, p)]:.4f}" for m in models)
                    for p in corrs
                ),
            }
        )
        most = all(std[("shared_bottom", p)] > std[(m, p)] for m in mixtures for p in corrs)
        out.append(
            {
                "claim": "Shared-Bottom's final loss varies most across runs "
                "(std, every correlation)",
                "holds": most,
                "detail": "; ".join(
                    f"p={p:g}: "
                    + ", ".join(
                        f"{LABELS[m]} {std[(m, p)]:.4f} (worst run {table[(m, p)]['worst']:.4f})"
                        for m in models
                    )
                    for p in corrs
                ),
            }
        )
    return out


def results_markdown(meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """results.md: settings, per-(model, correlation) table of both losses, the findings."""
    models, corrs = _order(runs)
    summary = summarise(runs)
    t, d = meta["train"], meta["data"]
    lines = [
        "# MMoE synthetic task-correlation experiment: results",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{len(runs)} runs: {meta['repeats']} repeats × {len(corrs)} correlations × "
        f"{len(models)} models; n_train={t['n_train']}, n_test={t['n_test']}, steps={t['steps']}, "
        f"batch={t['batch_size']}, Adam lr={t['lr']}, Shared-Bottom width "
        f"{t['shared_bottom_width']}; d={d['d']}, c={d['c']}, m={d['m']}, "
        f"noise variance {d['noise_var']}. Wall time {meta['wall_seconds']:.0f} s "
        f"on {meta['machine']['cpus']} CPUs ({meta['machine']['processor']}), "
        f"{meta['workers']} worker processes.",
        "",
        "Loss = MSE(task 1) + MSE(task 2) after the last step, on the whole training set "
        "(train) and on a held-out set from the same task weights (test).",
        "",
    ]
    params = {r["model"]: r["n_params"] for r in runs}
    lines.append("Parameters: " + ", ".join(f"{LABELS[m]} {params[m]:,}" for m in models) + ".")
    for metric in METRICS:
        lines += [
            "",
            f"## {metric.replace('_', ' ')}",
            "",
            "| model | p | n | mean | std | sem | best | median | worst |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m in models:
            for p in corrs:
                s = summary[metric][(m, p)]
                lines.append(
                    f"| {LABELS[m]} | {p:g} | {s['n']} | {s['mean']:.4f} | {s['std']:.4f} | "
                    f"{s['sem']:.4f} | {s['best']:.4f} | {s['median']:.4f} | {s['worst']:.4f} |"
                )
        lines += ["", f"### The paper's findings, on the {metric.replace('_', ' ')}", ""]
        for f in findings(summary[metric], models, corrs):
            mark = "reproduced" if f["holds"] else "NOT reproduced"
            lines.append(f"- **{mark}**: {f['claim']}. {f['detail']}")
    lines += ["", *curve_table(runs, models, corrs)]
    return "\n".join(lines) + "\n"


def curve_table(runs: list[dict[str, Any]], models: list[str], corrs: list[float]) -> list[str]:
    """Mean training loss at a few points of the curve: where in training the models differ."""
    groups = group(runs)
    steps = runs[0]["curve_steps"]
    picks = sorted({max(0, round(len(steps) * f) - 1) for f in (0.05, 0.1, 0.25, 0.5, 1.0)})
    lines = [
        "## Training loss along the way",
        "",
        "Mean over runs of the mean minibatch loss in the logging window ending at each step.",
        "",
        "| model | p | " + " | ".join(f"step {steps[i]}" for i in picks) + " |",
        "|---|---:|" + "---:|" * len(picks),
    ]
    for m in models:
        for p in corrs:
            curves = np.asarray([r["train_curve"] for r in groups[(m, p)]])
            mu = curves.mean(axis=0)
            cells = " | ".join(f"{mu[i]:.4f}" for i in picks)
            lines.append(f"| {LABELS[m]} | {p:g} | {cells} |")
    return lines


def plot_curves(runs: list[dict[str, Any]], path: Path, by: str = "correlation") -> None:
    """Mean training-loss curve ± 1 s.e.: a panel per correlation (lines = models) or per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, corrs = _order(runs)
    groups = group(runs)
    panels: list[Any] = corrs if by == "correlation" else models
    lines: list[Any] = models if by == "correlation" else corrs
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True)
    cmap = plt.get_cmap("viridis")
    for i, (ax, panel) in enumerate(zip(np.atleast_1d(axes), panels, strict=True)):
        for j, line in enumerate(lines):
            m, p = (line, panel) if by == "correlation" else (panel, line)
            rs = groups[(m, p)]
            steps = rs[0]["curve_steps"]
            curves = np.asarray([r["train_curve"] for r in rs])
            mu = curves.mean(axis=0)
            se = curves.std(axis=0, ddof=1) / math.sqrt(len(rs)) if len(rs) > 1 else 0 * mu
            color = COLORS[m] if by == "correlation" else cmap(j / max(1, len(lines) - 1))
            label = LABELS[m] if by == "correlation" else f"p={p:g}"
            ax.plot(steps, mu, color=color, label=label, lw=1.4)
            ax.fill_between(steps, mu - se, mu + se, color=color, alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_title(f"correlation {panel:g}" if by == "correlation" else LABELS[panel])
        ax.set_xlabel("training step")
        ax.grid(True, which="both", alpha=0.3)
        if i == 0:
            ax.set_ylabel("training loss (mean over runs)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_distribution(runs: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Final loss of every run: a box per model with the runs as points, a panel per correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, corrs = _order(runs)
    groups = group(runs)
    rng = np.random.default_rng(0)  # jitter only
    fig, axes = plt.subplots(1, len(corrs), figsize=(3.6 * len(corrs), 3.6), sharey=True)
    for i, (ax, p) in enumerate(zip(np.atleast_1d(axes), corrs, strict=True)):
        data = [[r[metric] for r in groups[(m, p)]] for m in models]
        ax.boxplot(data, showfliers=False, widths=0.6)
        for j, (m, vals) in enumerate(zip(models, data, strict=True)):
            x = j + 1 + rng.uniform(-0.18, 0.18, len(vals))
            ax.scatter(x, vals, s=9, color=COLORS[m], alpha=0.6)
        ax.set_xticks(range(1, len(models) + 1), [LABELS[m] for m in models], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"correlation {p:g}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        if i == 0:
            ax.set_ylabel(metric.replace("_", " ") + " (one point per run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """results.md, summary.json and the PNGs into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(results_markdown(meta, runs))
    summary = summarise(runs)
    flat = {
        metric: [{"model": m, "correlation": p, **s} for (m, p), s in table.items()]
        for metric, table in summary.items()
    }
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": flat}, indent=1))
    plot_curves(runs, out / "loss_curves.png", by="correlation")
    plot_curves(runs, out / "loss_curves_by_model.png", by="model")
    for metric in METRICS:
        plot_distribution(runs, out / f"{metric}_distribution.png", metric)
