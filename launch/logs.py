"""`ranker logs export`: drain the served log and feedback streams into Parquet.

Argument parsing, signals and the summary only; the work is `service.servedlog.exporter`.
Also runs as `python -m launch.logs export ...`.
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

from service.featurestore.keys import DEFAULT_PREFIX
from service.servedlog.exporter import (
    DEFAULT_BATCH,
    DEFAULT_BLOCK_MS,
    DEFAULT_CONSUMER,
    DEFAULT_GROUP,
    Exporter,
    make_exporter_client,
)


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def export_main(argv: list[str]) -> int:
    """Export the served and feedback streams to Parquet partitioned by hour, exactly once."""
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
    p.add_argument("--batch", type=_positive_int, default=DEFAULT_BATCH,
                   help="entries per read and file (default %(default)s)")
    p.add_argument("--block-ms", type=_positive_int, default=DEFAULT_BLOCK_MS,
                   help="how long an idle read waits for new entries (default %(default)s)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--until-empty", action="store_true",
                      help="stop once both streams are drained")
    stop.add_argument("--max-seconds", type=_positive_float, help="stop after this long")
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


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["export"]:
        return export_main(args[1:])
    print("usage: python -m launch.logs export --out DIR [options]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
