"""`ranker logs export` and `ranker train --from-logs`: the served log's command lines.

Argument parsing, signals and summaries only; the work is `service.servedlog.exporter` (streams
to Parquet) and `training.from_logs` (Parquet to a run directory). The export also runs as
`python -m launch.logs export ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from launch.argtypes import nonnegative_finite, positive_float, positive_int
from service.featurestore.keys import DEFAULT_PREFIX


def export_main(argv: list[str]) -> int:
    """Export the served and feedback streams to Parquet partitioned by hour, exactly once."""
    from service.servedlog.exporter import (
        DEFAULT_BATCH,
        DEFAULT_BLOCK_MS,
        DEFAULT_CONSUMER,
        DEFAULT_GROUP,
        Exporter,
        make_exporter_client,
    )

    p = argparse.ArgumentParser(prog="ranker logs export", description=export_main.__doc__)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--redis-url", default=os.environ.get("RANKER_REDIS_URL"),
                   help="redis://host:port/db (default $RANKER_REDIS_URL)")
    p.add_argument("--cluster", action="store_true", default=None, help="force cluster mode")
    p.add_argument("--password", help="Redis password (or put it in the URL)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="key prefix (default %(default)s)")
    p.add_argument("--group", default=DEFAULT_GROUP, help="consumer group (default %(default)s)")
    p.add_argument("--consumer", default=DEFAULT_CONSUMER,
                   help="this exporter's name in the group; restart under the same name to "
                   "resume its pending entries (default %(default)s)")
    p.add_argument("--batch", type=positive_int, default=DEFAULT_BATCH,
                   help="entries per read and file (default %(default)s)")
    p.add_argument("--block-ms", type=positive_int, default=DEFAULT_BLOCK_MS,
                   help="how long an idle read waits for new entries (default %(default)s)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--until-empty", action="store_true",
                      help="stop once both streams are drained")
    stop.add_argument("--max-seconds", type=positive_float, help="stop after this long")
    a = p.parse_args(argv)
    if not a.redis_url:
        p.error("--redis-url is required (or set RANKER_REDIS_URL)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)  # finish the batch in hand, then stop

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    client = make_exporter_client(a.redis_url, cluster=a.cluster, password=a.password,
                                  block_ms=a.block_ms)
    try:
        exporter = Exporter(client, a.out, prefix=a.prefix, group=a.group, consumer=a.consumer,
                            batch=a.batch, block_ms=a.block_ms)
        report = exporter.run(until_empty=a.until_empty, max_seconds=a.max_seconds,
                              stop=lambda: bool(stopping))
    finally:
        client.close()
        for s, h in previous.items():
            signal.signal(s, h)
    print(json.dumps(report.as_dict()), flush=True)
    return 0


def add_from_logs_args(p: argparse.ArgumentParser) -> None:
    """`ranker train`'s flags for training on an exported served log."""
    from training.from_logs import DEFAULT_IPS_CLIP, DEFAULT_WINDOW_S, DEFAULT_WITH_SPEC

    g = p.add_argument_group("training from a served log (ranker logs export --out DIR)")
    g.add_argument("--from-logs", type=Path, metavar="DIR",
                   help="train on DIR/impressions joined with DIR/feedback instead of --spec")
    g.add_argument("--window-s", type=positive_float, default=DEFAULT_WINDOW_S,
                   help="attribution window after an impression, seconds (default %(default)s)")
    g.add_argument("--model-repo", type=Path, default=Path("models"),
                   help="repository of the serving models named in the log (default %(default)s)")
    g.add_argument("--ips-clip", type=nonnegative_finite, default=DEFAULT_IPS_CLIP,
                   help="a log of an exploring service (RANKER_EXPLORE_RATE): inverse-propensity "
                        "weights clipped at this (default %(default)s; 0 = no weighting)")
    g.add_argument("--init-from", type=Path, metavar="RUN_DIR",
                   help="warm-start from the serving model's run directory (its model.pt, or "
                        "that file): continual training; the same architecture")
    g.add_argument("--with-data", type=Path, metavar="DATA_DIR",
                   help="train and validate on the log plus this offline dataset (e.g. the one "
                        "the serving model was trained on), encoded with the serving schema")
    g.add_argument("--with-data-position", type=int, metavar="P",
                   help="with --position-tower: the position the --with-data rows get (0, the "
                        "top, for an offline log without position effect)")
    g.add_argument("--with-spec", default=DEFAULT_WITH_SPEC, metavar="SPEC",
                   help="the dataset spec of --with-data (default %(default)s)")


def train_from_logs(p: argparse.ArgumentParser, a: argparse.Namespace, model_kw: dict[str, Any],
                    tc: Any) -> int:
    """`ranker train --from-logs DIR`: a run directory like any run's, from what was served."""
    from training.from_logs import DATASET, LogError, report_markdown, run_training_from_logs

    if a.max_train_rows or a.data:
        p.error("--from-logs trains on the whole log: --data and --max-train-rows do not apply")
    out = a.out or Path("runs") / DATASET
    try:
        report = run_training_from_logs(a.from_logs, out, model_kw, tc, repo=a.model_repo,
                                        window_s=a.window_s, baselines=a.baselines,
                                        ips_clip=a.ips_clip, init_from=a.init_from,
                                        with_data=a.with_data, with_spec=a.with_spec,
                                        with_data_position=a.with_data_position)
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report_markdown(report))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["export"]:
        return export_main(args[1:])
    print("usage: python -m launch.logs export --out DIR [options]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
