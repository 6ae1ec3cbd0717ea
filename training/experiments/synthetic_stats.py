"""Extra statistics on a runs.json of the synthetic experiment: medians, IQRs, Welch t, paired wins.

python -m training.experiments.synthetic_stats docs/experiments/mmoe-synthetic/runs.json
python -m training.experiments.synthetic_stats --nonlinearity 1 2 3
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from training.experiments.report import LABELS, METRICS
from training.experiments.synthetic import DataConfig, sin_params


def nonlinearity(c: float, n: int = 200_000) -> tuple[float, float]:
    """(label variance, variance left after the best linear fit in wᵀx) of one noiseless task."""
    alpha, beta = sin_params(DataConfig())
    z = c * np.random.default_rng(1).standard_normal(n)  # wᵀx ~ N(0, c²) since |w| = c
    y = z + np.sin(z[:, None] * alpha + beta).sum(axis=-1)
    resid = y - np.polyval(np.polyfit(z, y, 1), z)
    return float(y.var()), float(resid.var())


def main(argv: list[str]) -> int:
    """Print, per metric and model, the medians and IQRs per correlation and Welch's t."""
    if argv and argv[0] == "--nonlinearity":
        for c in map(float, argv[1:]):
            total, left = nonlinearity(c)
            print(
                f"c={c:g}: label variance {total:.3f}, non-linear part {left:.3f} "
                f"({left / total:.1%})"
            )
        return 0
    runs = json.loads(Path(argv[0]).read_text())["runs"]
    models = [m for m in LABELS if any(r["model"] == m for r in runs)]
    corrs = sorted({float(r["correlation"]) for r in runs}, reverse=True)
    hi, lo = corrs[0], corrs[-1]
    for metric in METRICS:
        print(f"## {metric}")
        for m in models:
            v = {
                p: np.array([r[metric] for r in runs if (r["model"], r["correlation"]) == (m, p)])
                for p in corrs
            }
            a, b = v[hi], v[lo]
            t = (b.mean() - a.mean()) / math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
            med = ", ".join(f"p={p:g}: {np.median(v[p]):.4f}" for p in corrs)
            iqr = ", ".join(
                f"{np.percentile(v[p], 75) - np.percentile(v[p], 25):.4f}" for p in corrs
            )
            print(f"{LABELS[m]}: median {med}; IQR {iqr}; Welch t (p={lo:g} − p={hi:g}) {t:.2f}")
            # a run that ends above twice its cell's median failed to train (a plateau)
            failed = {p: v[p] > 2 * np.median(v[p]) for p in corrs}
            print(
                "  failed runs (> 2× median): "
                + ", ".join(f"p={p:g}: {int(failed[p].sum())}" for p in corrs)
                + "; mean of the others: "
                + ", ".join(f"p={p:g}: {v[p][~failed[p]].mean():.4f}" for p in corrs)
            )
        if "shared_bottom" not in models:
            continue
        by_key = {(r["model"], r["correlation"], r["repeat"]): r[metric] for r in runs}
        repeats = sorted({r["repeat"] for r in runs})
        for p in corrs:
            for m in models:
                if m == "shared_bottom":
                    continue
                wins = sum(by_key[(m, p, k)] < by_key[("shared_bottom", p, k)] for k in repeats)
                print(
                    f"p={p:g}: {LABELS[m]} below Shared-Bottom in {wins}/{len(repeats)} "
                    "paired repeats"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
