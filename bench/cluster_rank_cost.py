"""/rank on a 3-master Redis Cluster against /rank on one redis-server, in the same run.

    python -m bench.cluster_rank_cost --candidates 500 --requests 300 --runs 3

Two instances of the real app (`create_app`, its middleware and lifespan) in one process: one
reads its features from a private redis-server, the other (`redis_cluster=True`) from a private
3-master cluster on loopback, both loaded with the same tables by `load_tables` (on the cluster
the item records are copied to every master: docs/featurestore.md). They take turns in short
blocks (A B B A ..., `--block` requests each) on the same request sequence, one request at a
time, at the ASGI level (bench.inprocess). Per run: p50 / p99 of the call time of each, and the
ratio cluster / single node of the p50s; the spread is over the runs.

Needs the `train` extra (bench.measure exports the default-size MMoE with torch).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.inprocess import ab_runs, add_ab_arguments, latency_ms, run_on_default_model, timed_calls


def load_cluster_features(url: str, version_dir: Path, n_items: int) -> dict[str, str]:
    """bench.measure's tables (same seed, so the same features) into the cluster."""
    from bench.measure import feature_tables
    from service.featurestore.writer import load_tables, make_sync_client

    client = make_sync_client(url, cluster=True)
    try:
        return load_tables(client, *feature_tables(version_dir, n_items)).replica_tags
    finally:
        client.close()


async def measure(args: argparse.Namespace, repo: Path, url: str) -> dict[str, Any]:
    from asgi_lifespan import LifespanManager

    from launch.local_redis import RedisClusterServer
    from service.app import create_app
    from service.settings import Settings

    version_dir = next(p for p in (repo / "mmoe").iterdir() if p.is_dir())
    base = {"model_repo": repo, "model_name": "mmoe", "request_timeout_s": 5.0,
            "redis_socket_timeout_s": 1.0, "redis_connect_timeout_s": 1.0,
            "max_candidates": max(args.candidates, 1000)}
    out: dict[str, Any] = {"runs": []}
    with RedisClusterServer(masters=3) as cluster:
        out["replica_tags"] = load_cluster_features(cluster.url, version_dir, args.items)
        apps = {"off": create_app(Settings(**base, redis_url=url)),
                "on": create_app(Settings(**base, redis_url=cluster.url, redis_cluster=True))}
        async with LifespanManager(apps["off"]) as m_off, LifespanManager(apps["on"]) as m_on:
            managed = {"off": m_off.app, "on": m_on.app}

            async def block(name: str, part: list[bytes]) -> dict[str, Any]:
                return {"times": await timed_calls(managed[name], part, args.gap_ms / 1e3)}

            async for got in ab_runs(args, block):
                row: dict[str, Any] = {("single" if k == "off" else "cluster"):
                       latency_ms([t for b in blocks for t in b["times"]])
                       for k, blocks in got.items()}
                row["p50_ratio"] = row["cluster"]["p50_ms"] / row["single"]["p50_ms"]
                out["runs"].append(row)
                print(f"run {len(out['runs'])}: single p50 {row['single']['p50_ms']:.3f} ms, "
                      f"cluster p50 {row['cluster']['p50_ms']:.3f} ms, "
                      f"ratio {row['p50_ratio']:.3f}", flush=True)
    ratios = [r["p50_ratio"] for r in out["runs"]]
    out["p50_ratio"] = {"min": min(ratios), "median": statistics.median(ratios),
                        "max": max(ratios)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster_rank_cost", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    add_ab_arguments(p, requests=300, runs=3)
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    res = run_on_default_model(args, measure)
    res["args"] = {k: v for k, v in vars(args).items() if k != "out"}
    r = res["p50_ratio"]
    print(f"/rank p50 cluster / single node at N={args.candidates}: median {r['median']:.3f} "
          f"(min {r['min']:.3f}, max {r['max']:.3f}) over {len(res['runs'])} runs")
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
