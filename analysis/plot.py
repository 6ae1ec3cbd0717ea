"""The report's figure: rate per arm with its bootstrap and naive CIs, one panel per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_rates(report: dict[str, Any], path: Path) -> None:
    """One row per experiment, one panel per task; a point per arm with both intervals."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    exps = report["experiments"]
    fig, axes = plt.subplots(len(exps), len(tasks), figsize=(4 * len(tasks), 3 * len(exps)),
                             squeeze=False)
    for row, e in zip(axes, exps, strict=True):
        names = [a["name"] for a in e["arms"]]
        for ax, t in zip(row, tasks, strict=True):
            for i, a in enumerate(e["arms"]):
                x = a["tasks"][t]
                for dx, key, color, label in ((-0.08, "ci", "C0", "bootstrap over users"),
                                              (0.08, "naive_ci", "C7", "naive (impressions)")):
                    lo, hi = x[key]
                    ax.errorbar([i + dx], [x["rate"]], yerr=[[x["rate"] - lo], [hi - x["rate"]]],
                                fmt="o", color=color, capsize=4,
                                label=label if i == 0 else None)
            ax.set_xticks(range(len(names)), names)
            ax.set_xlim(-0.5, len(names) - 0.5)
            ax.set_title(f"{e['name']}: {t}")
            ax.set_ylabel("events / impression")
            ax.grid(axis="y", alpha=0.3)
        row[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
