"""The evaluation report of a run: report.json, a Markdown table, and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from training.distributed import rank_zero_only
from training.seeds import seeds_markdown

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CURVES_PNG = "training_curves.png"
GATES_PNG = "gate_heatmap.png"
RELIABILITY_PNG = "reliability.png"
POLARISED = 0.9  # a gate whose largest mean weight is at least this is flagged


def _fmt(x: Any) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def markdown(report: dict[str, Any]) -> str:
    """Test AUC and log loss per task for every model (and the oracle AUC when known)."""
    tasks: list[str] = report["tasks"]
    oracle = report.get("oracle_auc") or {}
    lines = [
        f"# {report['dataset']}: test metrics",
        "",
        f"Rows: {report['training_data']['rows']}. Main model: `{report['main']}`.",
        "",
        "| model | " + " | ".join(f"{t} AUC | {t} log loss" for t in tasks) + " | epochs | s |",
        "|---" * (1 + 2 * len(tasks) + 2) + "|",
    ]
    for name, m in report["models"].items():
        cells = []
        for t in tasks:
            metric = m["test"].get(t, {})
            cells += [_fmt(metric.get("auc")), _fmt(metric.get("log_loss"))]
        h = m["history"]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {h['best_epoch']}/{len(h['val_loss'])} "
            f"| {h['seconds']:.0f} |"
        )
    if oracle:
        cells = []
        for t in tasks:
            cells += [_fmt(oracle.get(t)), "—"]
        lines.append("| oracle (true p) | " + " | ".join(cells) + " | | |")
        main = report["models"][report["main"]]["test"]
        gaps = ", ".join(f"{t} {oracle[t] - main[t]['auc']:+.4f}" for t in tasks)
        lines += ["", f"Oracle AUC minus {report['main']} AUC: {gaps}."]
    lines += ["", "Epochs: best/run (early stopping on validation loss); s: training seconds.", ""]
    if "seeds" in report:
        lines += ["The table above is seed "
                  f"{report['seeds']['seeds'][0]}'s run (the checkpoint's).", ""]
        lines += seeds_markdown(report["seeds"], tasks)
    if "tuning" in report:
        lines += tuning_markdown(report["tuning"])
    return "\n".join(lines)


def gate_health(gates: Any, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per task, from the gate weights [N, T, M]: mean entropy (nats, and over log M), expert
    utilisation (mean weight per expert), the share of rows whose gate puts >= 0.9 on one
    expert, and `polarised`: the mean weight of one expert is >= 0.9."""
    import numpy as np

    g = np.asarray(gates, dtype=np.float64)  # (N, T, M)
    m = g.shape[-1]
    ent = -(g * np.log(np.clip(g, 1e-12, None))).sum(-1)  # (N, T)
    util = g.mean(axis=0)  # (T, M)
    out = {}
    for j, t in enumerate(tasks):
        out[t] = {
            "entropy": float(ent[:, j].mean()),
            "entropy_norm": float(ent[:, j].mean() / math.log(m)) if m > 1 else 0.0,
            "utilisation": util[j].tolist(),
            "rows_polarised": float((g[:, j].max(-1) >= POLARISED).mean()),
            "polarised": bool(util[j].max() >= POLARISED),
        }
    return out


def health_markdown(report: dict[str, Any]) -> str:
    """Calibration (ECE per task) and gate health of every model."""
    tasks: list[str] = report["tasks"]
    lines = ["## Calibration (expected calibration error, 10 bins)", "",
             "| model | " + " | ".join(tasks) + " |", "|---" * (1 + len(tasks)) + "|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m["test"].get(t, {}).get("ece"))
                                                  for t in tasks) + " |")
    lines += ["", f"Reliability plot of the main model: `{RELIABILITY_PNG}`.", ""]
    gated = {n: m["test"]["gate_health"] for n, m in report["models"].items()
             if "gate_health" in m["test"]}
    if gated:
        lines += ["## Gate health", "",
                  "| model | task | entropy / log M | max utilisation | rows >= 0.9 | flag |",
                  "|---|---|---|---|---|---|"]
        for name, h in gated.items():
            for t, x in h.items():
                flag = "**polarised**" if x["polarised"] else ""
                lines.append(f"| {name} | {t} | {x['entropy_norm']:.3f} | "
                             f"{max(x['utilisation']):.3f} | {x['rows_polarised']:.3f} | {flag} |")
        lines += ["", f"Polarised: one expert's mean gate weight >= {POLARISED}.", ""]
    return "\n".join(lines)


def plot_reliability(reliability: dict[str, dict[str, list[float]]], path: Path,
                     title: str) -> None:
    """Mean prediction against fraction positive per bin, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(reliability)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        r = reliability[t]
        hi = max([*r["mean_pred"], *r["frac_pos"], 1e-3])
        ax.plot([0, hi], [0, hi], color="grey", lw=0.8, ls="--")
        ax.plot(r["mean_pred"], r["frac_pos"], marker="o")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("mean predicted p")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction positive")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tuning_markdown(tuning: dict[str, Any]) -> list[str]:
    """The search: budget, trials run and pruned, the best parameters and every trial."""
    b = tuning["budget"]
    budget = f"{b['trials']} trials" + (f", {b['timeout_s'] / 60:g} min" if b["timeout_s"] else "")
    lines = [
        f"## Hyperparameter search ({budget}; {tuning['sampler']}, {tuning['pruner']})",
        "",
        f"{tuning['trials_run']} trials in {tuning['seconds']:.0f} s, {tuning['trials_pruned']} "
        f"pruned. Objective: {tuning['objective']}, on the validation split. Best: trial "
        f"{tuning['best_trial']}, validation loss {tuning['best_val_loss']:.5f}; the models above "
        "were trained with it (best_config.json).",
        "",
        "| trial | state | val loss | " + " | ".join(tuning["best_params"]) + " |",
        "|---" * (3 + len(tuning["best_params"])) + "|",
    ]
    for t in tuning["trials"]:
        cells = [_param(t["params"].get(k)) for k in tuning["best_params"]]
        lines.append(f"| {t['number']} | {t['state']} | {_fmt(t['value'])} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _param(x: Any) -> str:
    return "—" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """Train and validation loss per epoch for every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in report["models"].items():
        h = m["history"]
        epochs = range(1, len(h["train_loss"]) + 1)
        axes[0].plot(epochs, h["train_loss"], marker="o", label=name)
        axes[1].plot(epochs, h["val_loss"], marker="o", label=name)
    for ax, title in zip(axes, ("train loss (weighted sum)", "validation loss"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_gates(gates_mean: list[list[float]], tasks: list[str], path: Path, title: str) -> None:
    """Heatmap of mean gate weight, task x expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    g = np.asarray(gates_mean)  # (T, M)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * g.shape[1], 1.2 + 0.5 * g.shape[0]))
    im = ax.imshow(g, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(range(g.shape[1]), [f"e{m}" for m in range(g.shape[1])])
    for (i, j), v in np.ndenumerate(g):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@rank_zero_only
def write_report(report: dict[str, Any], run_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md and the plots; returns the written files by name.

    Rank 0 only in a torch.distributed group (others get None)."""
    run_dir = Path(run_dir)
    files = {REPORT_JSON: run_dir / REPORT_JSON, REPORT_MD: run_dir / REPORT_MD}
    files[REPORT_JSON].write_text(json.dumps(report, indent=2) + "\n")
    files[REPORT_MD].write_text(markdown(report) + "\n" + health_markdown(report))
    plot_curves(report, run_dir / CURVES_PNG)
    files[CURVES_PNG] = run_dir / CURVES_PNG
    rel = report["models"][report["main"]]["test"].get("reliability")
    if rel:
        plot_reliability(rel, run_dir / RELIABILITY_PNG, f"{report['main']}: reliability on test")
        files[RELIABILITY_PNG] = run_dir / RELIABILITY_PNG
    gates = report["models"][report["main"]]["test"].get("gates_mean")
    if gates:
        plot_gates(gates, report["tasks"], run_dir / GATES_PNG,
                   f"{report['main']}: mean gate weight on test")
        files[GATES_PNG] = run_dir / GATES_PNG
    return files
