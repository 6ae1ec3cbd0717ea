"""The evaluation report of a run: report.json, a Markdown table, and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from training.distributed import rank_zero_only

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CURVES_PNG = "training_curves.png"
GATES_PNG = "gate_heatmap.png"


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
    return "\n".join(lines)


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
    files[REPORT_MD].write_text(markdown(report))
    plot_curves(report, run_dir / CURVES_PNG)
    files[CURVES_PNG] = run_dir / CURVES_PNG
    gates = report["models"][report["main"]]["test"].get("gates_mean")
    if gates:
        plot_gates(gates, report["tasks"], run_dir / GATES_PNG,
                   f"{report['main']}: mean gate weight on test")
        files[GATES_PNG] = run_dir / GATES_PNG
    return files
