"""`ranker features load`: materialise the trainer's user and item tables into Redis."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ranker.manifest import list_versions, load_manifest, load_schema, version_dir
from ranker.schema import FeatureSchema
from service.featurestore.keys import DEFAULT_PREFIX
from service.featurestore.writer import (
    DEFAULT_MAX_UNKNOWN_LIST_SHARE,
    DEFAULT_OLD_LOAD_GRACE_S,
    DEFAULT_STREAM_ROWS,
    BadListError,
    MissingColumnsError,
    load_files,
    make_sync_client,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ranker features load",
        description="Encode the user and item feature tables with a model's schema and write "
        "them to Redis as a new load, then switch to it atomically.",
    )
    src = p.add_argument_group("model (its manifest gives the feature schema)")
    src.add_argument("--model-dir", type=Path, help="a version dir: models/<name>/<version>")
    src.add_argument("--repo", type=Path, help="model repository (with --name: newest version)")
    src.add_argument("--name", help="model name in --repo")
    p.add_argument("--users", type=Path, help="users parquet (user_id + raw user features)")
    p.add_argument("--items", type=Path, help="items parquet (item_id + raw item features)")
    p.add_argument("--redis-url", help="redis://host:port/db (required)")
    p.add_argument("--cluster", action="store_true", default=None, help="force cluster mode")
    p.add_argument("--password", help="Redis password (or put it in the URL)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="key prefix (default %(default)s)")
    p.add_argument("--ttl", type=int, default=None, help="expire records after this many seconds")
    p.add_argument("--batch-size", type=int, default=DEFAULT_STREAM_ROWS,
                   help="records per command (default %(default)s); the files are read and "
                   "encoded 50 000 rows at a time (memory is bounded by that)")
    p.add_argument("--load-id", help="override the content-derived load id")
    p.add_argument(
        "--old-load-grace",
        type=int,
        default=DEFAULT_OLD_LOAD_GRACE_S,
        help="seconds the previous load's records live after the switch (default %(default)s)",
    )
    p.add_argument("--keep-old", action="store_true", help="leave the previous load untouched")
    p.add_argument(
        "--allow-missing-columns",
        action="store_true",
        help="write a feature column absent from a table as its default for every entity "
        "(refused otherwise; the report lists such columns)",
    )
    p.add_argument(
        "--max-unknown-list-share",
        type=float,
        default=DEFAULT_MAX_UNKNOWN_LIST_SHARE,
        help="refuse a list feature (a history) whose present ids are more than this share "
        "unknown to the model's vocabulary (default %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_schema(args: argparse.Namespace) -> tuple[FeatureSchema, Path]:
    """The schema of --model-dir, or of the newest complete version of --repo/--name."""
    if args.model_dir is not None:
        vdir = args.model_dir
    elif args.repo is not None and args.name:
        versions = list_versions(args.repo, args.name)
        if not versions:
            raise SystemExit(f"error: no complete version of {args.name!r} in {args.repo}")
        vdir = version_dir(args.repo, args.name, versions[-1])
    else:
        raise SystemExit("error: give --model-dir, or --repo and --name")
    return load_schema(vdir, load_manifest(vdir)), vdir


def load_main(argv: list[str]) -> int:
    """Entry point of `ranker features load`."""
    args = _parser().parse_args(argv)
    if not args.redis_url:
        print(
            "error: --redis-url is required (the main job passes its embedded server's URL)",
            file=sys.stderr,
        )
        return 2
    if args.users is None and args.items is None:
        print("error: give --users and/or --items (parquet tables)", file=sys.stderr)
        return 2
    if args.batch_size < 1 or (args.ttl is not None and args.ttl < 1):
        print("error: --batch-size and --ttl must be >= 1", file=sys.stderr)
        return 2
    schema, vdir = resolve_schema(args)
    client = make_sync_client(args.redis_url, cluster=args.cluster, password=args.password)
    try:
        # streamed: the Parquet files are read in batches; a killed load rerun on the same
        # files resumes after its last written batch (service/featurestore/writer.py)
        report = load_files(
            client,
            schema,
            args.users,
            args.items,
            prefix=args.prefix,
            ttl_s=args.ttl,
            batch_size=args.batch_size,
            load_id=args.load_id,
            old_load_grace_s=None if args.keep_old else args.old_load_grace,
            progress=not args.no_progress,
            allow_missing_columns=args.allow_missing_columns,
            max_unknown_list_share=args.max_unknown_list_share,
        )
    except MissingColumnsError as e:
        print(f"error: {e} (--allow-missing-columns)", file=sys.stderr)
        return 2
    except BadListError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        client.close()
    print(
        f"loaded {report.users} users and {report.items} items "
        f"({report.bytes_written / 1e6:.2f} MB) for schema {report.schema_version} of {vdir} "
        f"as load {report.load_id} in {report.seconds:.2f}s "
        f"({report.records_per_s:,.0f} records/s"
        + "".join(f", {entity} {size:.0f} B/record in Redis"
                  for entity, size in report.redis_bytes_per_record.items()) + ")"
        + (f"; resumed after {report.resumed_rows} rows written before"
           if report.resumed_rows else "")
        + "".join(f"; previous {entity} load {lid}"
                  for entity, lid in report.previous_load_ids.items() if lid)
        + "".join(f"; {entity} columns defaulted: {', '.join(cols)}"
                  for entity, cols in report.defaulted_columns.items())
        + (f", {report.old_keys_expiring} old keys expiring" if report.old_keys_expiring else "")
    )
    print(json.dumps(report.as_dict()))
    return 0
