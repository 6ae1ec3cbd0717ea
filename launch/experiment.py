"""`ranker experiment report`: the experiment report's command line.

Argument parsing and the summary only; the report is `analysis.report`, the declared shares come
from the experiments file (`service.experiments`, structure only: no model repository needed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from launch.argtypes import nonnegative_finite, positive_int


def report_main(argv: list[str]) -> int:
    """Per arm of each experiment in an exported served log: rates per task with 95 % CIs
    (bootstrap over users), lift vs control with CI and p-value, and a sample-ratio check."""
    from analysis.report import experiment_report, write_report
    from ranker.logjoin import DEFAULT_WINDOW_S, LogError
    from service.experiments import ExperimentsError, load_experiments

    p = argparse.ArgumentParser(prog="ranker experiment report", description=report_main.__doc__)
    p.add_argument("--logs", type=Path, required=True,
                   help="exported log directory (impressions/, feedback/: ranker logs export)")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--window-s", type=nonnegative_finite, default=DEFAULT_WINDOW_S,
                   help="attribution window: an event counts within this long after its "
                   "impression (default %(default)s)")
    p.add_argument("--control", help="the control arm (default: 'control', else the first)")
    p.add_argument("--experiments", type=Path,
                   default=os.environ.get("RANKER_EXPERIMENTS_FILE") or None,
                   help="experiments file: the declared shares of the sample-ratio check "
                   "(default $RANKER_EXPERIMENTS_FILE; without one the check is skipped)")
    p.add_argument("--resamples", type=positive_int, default=2000,
                   help="bootstrap resamples (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = p.parse_args(argv)
    try:
        shares = None
        if args.experiments is not None:
            shares = load_experiments(args.experiments).shares()
        report = experiment_report(args.logs, window_s=args.window_s, control=args.control,
                                   shares=shares, n_resamples=args.resamples, seed=args.seed)
    except (LogError, ExperimentsError) as e:
        print(f"ranker experiment report: {e}", file=sys.stderr)
        return 2
    written = write_report(report, args.out, plot=not args.no_plot)
    for line in summary(report):
        print(line)
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def summary(report: dict[str, Any]) -> list[str]:
    """One line per experiment and task: each arm's lift over control, and the SRM verdict."""
    lines = []
    for e in report["experiments"]:
        srm = e["srm"]
        verdict = ("SRM not checked" if not srm["checked"]
                   else "SAMPLE RATIO MISMATCH" if srm["mismatch"] else "no SRM")
        lines.append(f"{e['name']}: control {e['control']}, {verdict}")
        for t in report["tasks"]:
            cells = []
            for a in e["arms"]:
                lf = a["tasks"][t].get("lift")
                if lf is not None:
                    cells.append(f"{a['name']} {100 * lf['value']:+.2f} % "
                                 f"[{100 * lf['ci'][0]:+.2f}, {100 * lf['ci'][1]:+.2f}] "
                                 f"p={lf['p_value']:.3g}")
            lines.append(f"  {t}: " + "; ".join(cells))
    return lines
