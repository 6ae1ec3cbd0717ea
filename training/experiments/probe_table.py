"""The grid's two checks from probe rows (JSON lines of `training.experiments.probe`): per world
and task, mean ± std over the seeds of oracle − MMoE, and MMoE − Shared-Bottom against the seed
spread (the larger of the two models' seed std), as on docs/experiments/world-grid/README.md.

    python -m training.experiments.probe_table docs/experiments/world-grid/cross-probes.jsonl \\
        --tag ewd1e-3-cross-wide --sb-tag sb-ewd1e-3-cross-wide
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

GOAL = 0.02
TASKS = ("click", "like", "share")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(rows: list[dict[str, Any]], tag: str, sb_tag: str) -> str:
    gaps: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["tag"] in (tag, sb_tag):
            world = Path(r["data"]).name
            for t in TASKS:
                gaps[(world, "sb" if r["tag"] == sb_tag else "mmoe")][t].append(r["gap"][t])
    worlds = list(dict.fromkeys(w for w, _ in gaps))  # in the rows' order
    out = ["| world | task | seeds (MMoE / SB) | oracle − MMoE | ≤ 0.02 | MMoE − SB | seed spread "
           "| not below SB by more |", "|---|---|---|---:|---|---:|---:|---|"]
    met: list[str] = []
    for w in worlds:
        ok = True
        for t in TASKS:
            m = gaps[(w, "mmoe")][t]
            s = gaps[(w, "sb")][t]
            if not m:
                continue
            gm, sm = _mean_std(m)
            ok &= gm <= GOAL
            cells = [w, t, f"{len(m)} / {len(s)}", f"{gm:.4f} ± {sm:.4f}",
                     "met" if gm <= GOAL else "**not met**"]
            if s:
                gs, ss = _mean_std(s)
                diff, spread = gs - gm, max(sm, ss)  # MMoE − SB in AUC = SB's gap − MMoE's
                cells += [f"{diff:+.4f}", f"{spread:.4f}",
                          "met" if diff >= -spread else "**not met**"]
            else:
                cells += ["—", "—", "—"]
            out.append("| " + " | ".join(cells) + " |")
        if ok and gaps[(w, "mmoe")]["click"]:
            met.append(w)
    out.append("")
    out.append(f"Worlds with every task within {GOAL} (mean over the seeds): "
               f"{', '.join(met) or 'none'} ({len(met)} of {len(worlds)}).")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsonl", type=Path)
    ap.add_argument("--tag", required=True, help="the MMoE rows' tag")
    ap.add_argument("--sb-tag", required=True, help="the Shared-Bottom rows' tag")
    a = ap.parse_args()
    rows = [json.loads(line) for line in a.jsonl.read_text().splitlines() if line.strip()]
    print(table(rows, a.tag, a.sb_tag))


if __name__ == "__main__":
    main()
