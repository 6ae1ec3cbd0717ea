"""Feature store read path: raw MGET (the floor) vs FeatureStore.fetch vs a hash per entity.

One run, one private redis-server (and optionally a 3-master cluster) on loopback:

    python -m bench.featurestore_bench [--reps 300] [--runs 3] [--no-cluster] [--out r.json]
                                       [--png r.png]

For 1 user + N candidates (N = 100, 500, 1000) each iteration draws N item ids (5% unknown) and
times, back to back on the same asyncio client (hiredis parser):
  mget      one MGET of the N+1 record keys, values left as bytes (the floor)
  fetch     FeatureStore.fetch: one MGET (+ the load pointers) and decoding into model arrays
  hash      the Feast-like layout: HGETALL per entity in one pipeline, decoded into the same arrays
On the cluster: FeatureStore.fetch with `mget_nonatomic` (per-slot MGETs, pipelined per node,
nodes concurrently) vs a cluster pipeline of one GET per key (no decoding: a lower bound for it)
vs an alternative layout measured only here: item keys hash-tagged into 48 buckets, so a request
needs at most 48 MGETs instead of ~N (no decoding either).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import redis
from redis.asyncio.cluster import RedisCluster as RedisAsyncCluster
from redis.cluster import RedisCluster

from launch.local_redis import RedisClusterServer, RedisServer
from ranker.schema import CategoricalFeature, DenseFeature, FeatureSchema, GroupSchema, Vocabulary
from service.featurestore.cluster import ReplicaRouter, send_on_node
from service.featurestore.keys import record_key_prefix
from service.featurestore.reader import FeatureStore, make_client, pack_mget
from service.featurestore.writer import copy_tags, encode_table, load_tables, make_sync_client

N_USERS, N_ITEMS = 2_000, 20_000
SIZES = (100, 500, 1000)


def bench_schema() -> FeatureSchema:
    """A production-like width: user 4 cat + 8 dense, item 6 cat + 12 dense."""

    def cats(prefix: str, n: int, vocab: int) -> tuple[CategoricalFeature, ...]:
        return tuple(
            CategoricalFeature(f"{prefix}c{j}", Vocabulary(tuple(str(v) for v in range(vocab))), 8)
            for j in range(n)
        )

    def dense(prefix: str, n: int) -> tuple[DenseFeature, ...]:
        return tuple(
            DenseFeature(f"{prefix}d{j}", 1.0, 2.0, 0.0, log1p=j % 2 == 0) for j in range(n)
        )

    return FeatureSchema(
        (
            GroupSchema("user", "user_id", cats("u", 4, 100), dense("u", 8)),
            GroupSchema("item", "item_id", cats("i", 6, 100), dense("i", 12)),
        )
    )


def bench_tables(schema: FeatureSchema, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """Random raw user and item tables for `bench_schema`."""
    rng = np.random.default_rng(seed)
    out = []
    for entity, n in (("user", N_USERS), ("item", N_ITEMS)):
        g = schema.group(entity)
        assert g is not None and g.key is not None
        cols: dict[str, Any] = {g.key: [f"{entity[0]}{i}" for i in range(n)]}
        for f in g.categorical:
            cols[f.name] = rng.integers(0, 120, n).astype(str)  # ~17% out of vocabulary
        for d in g.dense:
            cols[d.name] = rng.exponential(3.0, n)
        out.append(pa.table(cols))
    return out[0], out[1]


def write_hash_layout(url: str, schema: FeatureSchema, users: pa.Table, items: pa.Table) -> None:
    """The comparison layout: one Redis hash per entity, one field per encoded feature."""
    client = redis.Redis.from_url(url)
    for entity, table in (("user", users), ("item", items)):
        g = schema.group(entity)
        assert g is not None and g.key is not None
        cols = {n: table.column(n) for n in g.feature_names}
        cat, dense = g.encode_columns(cols, table.num_rows)
        ids = table.column(g.key).to_pylist()
        pipe = client.pipeline(transaction=False)
        for row, entity_id in enumerate(ids):
            mapping: dict[Any, Any] = {"written_at": time.time()}
            mapping.update({f.name: int(cat[row, j]) for j, f in enumerate(g.categorical)})
            mapping.update({f.name: float(dense[row, j]) for j, f in enumerate(g.dense)})
            pipe.hset(f"h:{entity[0]}:{entity_id}", mapping=mapping)
            if len(pipe) >= 2000:
                pipe.execute()
        pipe.execute()
    client.close()


def decode_hashes(g: GroupSchema, rows: list[dict[bytes, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """HGETALL replies -> (cat int64 [n,k], dense f32 [n,d]) with defaults for empty replies."""
    dcat, ddense = g.default_row()
    cat = np.empty((len(rows), g.n_cat), np.int64)
    dense = np.empty((len(rows), g.n_dense), np.float32)
    cat_names = [f.name.encode() for f in g.categorical]
    dense_names = [f.name.encode() for f in g.dense]
    for i, row in enumerate(rows):
        if row:
            cat[i] = [int(row[n]) for n in cat_names]
            dense[i] = [float(row[n]) for n in dense_names]
        else:
            cat[i], dense[i] = dcat, ddense
    return cat, dense


def summarize(samples_ns: list[int]) -> dict[str, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e6
    return {
        "p10_ms": float(np.percentile(a, 10)),
        "median_ms": float(np.median(a)),
        "p99_ms": float(np.percentile(a, 99)),
    }


async def timed(fn: Callable[..., Awaitable[Any]], *args: Any) -> tuple[int, int]:
    """(wall time, this thread's CPU time) of one awaited call, in ns.

    The CPU time is the client's own work (packing, parsing, decoding) and is far less disturbed
    than the wall time when other processes compete for the cores.
    """
    t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    await fn(*args)
    return time.perf_counter_ns() - t0, time.thread_time_ns() - c0


async def bench_single(url: str, schema: FeatureSchema, reps: int, seed: int) -> dict[str, Any]:
    """mget vs fetch vs hash on one redis-server, interleaved per iteration."""
    client = make_client(url, socket_timeout_s=1.0)
    fs = FeatureStore(client, schema)
    await fs.fetch("u0", ["i0"])  # learn the load pointers
    loads = fs.load_ids
    assert loads["user"] is not None and loads["item"] is not None
    uprefix = record_key_prefix("rk", schema.version, loads["user"], "user")
    iprefix = record_key_prefix("rk", schema.version, loads["item"], "item")
    item_group = schema.group("item")
    user_group = schema.group("user")
    assert item_group is not None and user_group is not None
    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {}
    for n in SIZES:
        samples: dict[str, list[int]] = {
            k: [] for k in ("mget", "fetch", "hash", "decode_only", "mget_cpu", "fetch_cpu")
        }
        for rep in range(reps + 10):  # the first 10 are warm-up
            ids = [f"i{i}" for i in rng.integers(0, int(N_ITEMS * 1.05), n)]  # ~5% unknown
            user = f"u{rng.integers(0, N_USERS)}"
            keys = [uprefix + user] + [iprefix + i for i in ids]

            async def hash_fetch(ids: list[str] = ids, user: str = user) -> None:
                pipe = client.pipeline(transaction=False)
                pipe.hgetall(f"h:u:{user}")
                for i in ids:
                    pipe.hgetall(f"h:i:{i}")
                rows = await pipe.execute()
                decode_hashes(user_group, rows[:1])
                decode_hashes(item_group, rows[1:])

            # MGET and fetch alternate which goes first; the hash layout (which leaves lots of
            # garbage and a busy server behind) runs after both, so it cannot slow them down.
            pair: list[tuple[str, Callable[..., Awaitable[Any]], tuple[Any, ...]]] = [
                ("mget", client.mget, (keys,)),
                ("fetch", fs.fetch, (user, ids)),
            ]
            if rep % 2:
                pair.reverse()
            times: dict[str, tuple[int, int]] = {}
            if rep % 50 == 0:
                gc.collect()  # outside the timings; the collector is off while timing
            for name, fn, args in [*pair, ("hash", hash_fetch, ())]:
                times[name] = await timed(fn, *args)
            values: list[Any] = await client.mget(keys)
            t0 = time.perf_counter_ns()
            fs._decode(values[0], values[1:])
            t_dec = time.perf_counter_ns() - t0
            if rep >= 10:
                for name, (wall, cpu) in times.items():
                    samples[name].append(wall)
                    if name + "_cpu" in samples:
                        samples[name + "_cpu"].append(cpu)
                samples["decode_only"].append(t_dec)
        # decoding alone in a tight loop (warm caches): the pure cost numpy adds per request
        last: list[Any] = await client.mget(keys)
        tight: list[int] = []
        for _ in range(1000):
            t0 = time.perf_counter_ns()
            fs._decode(last[0], last[1:])
            tight.append(time.perf_counter_ns() - t0)
        samples["decode_tight"] = tight
        row: dict[str, Any] = {k: summarize(v) for k, v in samples.items()}
        m, f, h = (row[k]["median_ms"] for k in ("mget", "fetch", "hash"))
        row["fetch_minus_mget_ms"] = f - m
        row["p10_fetch_minus_mget_ms"] = row["fetch"]["p10_ms"] - row["mget"]["p10_ms"]
        row["fetch_over_mget"] = f / m
        row["hash_over_fetch"] = h / f
        row["cpu_fetch_minus_mget_ms"] = (
            row["fetch_cpu"]["median_ms"] - row["mget_cpu"]["median_ms"]
        )
        results[str(n)] = row
    await fs.aclose()
    return results


CLUSTER_BUCKETS = 48  # 16 per master


def bucket_key(item_id: str) -> str:
    """A hash-tagged key: all items of one bucket share a slot, so one MGET reads them."""
    return f"bt:{{b{zlib.crc32(item_id.encode()) % CLUSTER_BUCKETS}}}:i:{item_id}"


def node_tag_key_prefix(tag: str) -> str:
    """Design B: items sharded (not copied) over the masters, one replica tag per master."""
    return f"nt:{{{tag}}}:i:"


def write_bucketed_items(client: RedisCluster, schema: FeatureSchema, items: pa.Table) -> list[str]:
    """The item records again under alternative layouts (measured only): bucket-tagged keys, and
    sharded by master under the masters' replica tags (design B); returns those tags."""
    g = schema.group("item")
    assert g is not None and g.key is not None
    enc = encode_table(g, items, time.time())
    size = enc.records.dtype.itemsize
    blob = enc.records.tobytes()
    tags = sorted(copy_tags(client, True).values())
    pipe = client.pipeline()
    for row, item_id in enumerate(enc.ids):
        record = blob[row * size : (row + 1) * size]
        pipe.set(bucket_key(item_id), record)
        tag = tags[zlib.crc32(item_id.encode()) % len(tags)]
        pipe.set(node_tag_key_prefix(tag) + item_id, record)
    pipe.execute()
    return tags


async def bench_cluster(url: str, single_url: str, schema: FeatureSchema, reps: int,
                        seed: int, tags: list[str], sizes: tuple[int, ...] = SIZES
                        ) -> dict[str, Any]:
    """On a 3-master cluster, interleaved per iteration with the single-node fetch (the
    baseline, same run): FeatureStore.fetch with the replicated layout (one master per request)
    and the sharded layout (mget_nonatomic), design B (items sharded by master under its tag:
    one packed MGET per master, concurrently on raw connections, decoded), a pipeline of GETs
    and the 48-bucket mget_nonatomic (neither decoded)."""
    client = make_client(url, cluster=True, socket_timeout_s=1.0, connect_timeout_s=1.0)
    assert isinstance(client, RedisAsyncCluster)
    fs = FeatureStore(client, schema)  # cluster_layout="replicated"
    sharded = FeatureStore(client, schema, cluster_layout="sharded")
    single = FeatureStore(make_client(single_url, socket_timeout_s=1.0), schema)
    for store in (fs, sharded, single):
        await store.fetch("u0", ["i0"])
    item_load = fs.load_ids["item"]
    assert item_load is not None and client.nodes_manager.slots_cache
    iprefix = record_key_prefix("rk", schema.version, item_load, "item")
    router = ReplicaRouter(client)
    nodes = {}
    for tag in tags:
        node, own = router.route(tag.encode())
        assert own == tag
        nodes[tag] = node

    async def per_node(ids: list[str]) -> None:
        by_tag: dict[str, list[int]] = {t: [] for t in tags}
        for j, i in enumerate(ids):
            by_tag[tags[zlib.crc32(i.encode()) % len(tags)]].append(j)
        groups = [(t, rows) for t, rows in by_tag.items() if rows]
        replies = await asyncio.gather(*[
            send_on_node(nodes[t], pack_mget((), node_tag_key_prefix(t), [ids[r] for r in rows]),
                         1) for t, rows in groups])
        values: list[Any] = [None] * len(ids)
        for (_, rows), reply in zip(groups, replies, strict=True):
            for r, v in zip(rows, reply[0], strict=True):
                values[r] = v
        fs._decode(None, values)

    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {}
    names = ("single_fetch", "fetch_replicated", "fetch_sharded", "per_node_concurrent",
             "pipeline_get", "bucketed_mget_nonatomic")
    for n in sizes:
        samples: dict[str, list[int]] = {k: [] for k in names}
        for rep in range(reps + 10):
            ids = [f"i{i}" for i in rng.integers(0, N_ITEMS, n)]
            user = f"u{rng.integers(0, N_USERS)}"

            async def pipe_get(ids: list[str] = ids) -> None:
                pipe = client.pipeline()
                for i in ids:
                    pipe.get(iprefix + i)
                await pipe.execute()

            tagged = [bucket_key(i) for i in ids]
            runs: list[tuple[str, Callable[..., Awaitable[Any]], tuple[Any, ...]]] = [
                ("single_fetch", single.fetch, (user, ids)),
                ("fetch_replicated", fs.fetch, (user, ids)),
                ("fetch_sharded", sharded.fetch, (user, ids)),
                ("per_node_concurrent", per_node, (ids,)),
                ("pipeline_get", pipe_get, ()),
                ("bucketed_mget_nonatomic", client.mget_nonatomic, (tagged,)),
            ]
            if rep % 50 == 0:
                gc.collect()
            for k in range(len(runs)):  # rotate which runs first
                name, fn, args = runs[(rep + k) % len(runs)]
                wall, _ = await timed(fn, *args)
                if rep >= 10:
                    samples[name].append(wall)
        row: dict[str, Any] = {k: summarize(v) for k, v in samples.items()}
        base = row["single_fetch"]["median_ms"]
        for name in names[1:]:
            row[f"{name}_over_single"] = row[name]["median_ms"] / base
        results[str(n)] = row
    for store in (fs, sharded, single):
        await store.aclose()
    return results


def samples_cluster_keys() -> tuple[str, ...]:
    return ("single_fetch", "fetch_replicated", "fetch_sharded", "per_node_concurrent",
            "pipeline_get", "bucketed_mget_nonatomic")


def _cell(stats: dict[str, float]) -> str:
    return f"{stats['p10_ms']:.3f} / {stats['median_ms']:.3f} / {stats['p99_ms']:.3f}"


def print_tables(report: dict[str, Any]) -> None:
    """Markdown tables of the run, as pasted into docs/featurestore.md."""
    load = report["load"]
    rate = load["records"] / load["seconds"]
    print(f"load_tables: {load['records']} records in {load['seconds']:.2f}s ({rate:,.0f}/s)")
    if "cluster_load" in report:
        cl = report["cluster_load"]
        print(f"load_tables on the cluster (items copied to every master): {cl['records']} "
              f"records in {cl['seconds']:.2f}s; replica tags {cl['replica_tags']}")
    if "single" in report:
        print_single(report)
    print_cluster(report)


def print_single(report: dict[str, Any]) -> None:
    print(f"\nsingle redis-server ({report['reps']} reps; p10 / median / p99, ms)\n")
    head = [
        "N",
        "MGET (floor)",
        "fetch+decode",
        "hash+HGETALL",
        "decode only",
        "decode, tight loop",
    ]
    head += ["fetch - MGET (p10, median)", "fetch / MGET", "hash / fetch"]
    head += ["client CPU median: MGET / fetch"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for n, r in report["single"].items():
        cells = [n, *(_cell(r[k]) for k in ("mget", "fetch", "hash", "decode_only"))]
        cells += [f"{r['decode_tight']['median_ms'] * 1000:.0f} µs"]
        cells += [f"{r['p10_fetch_minus_mget_ms']:+.3f}, {r['fetch_minus_mget_ms']:+.3f} ms"]
        cells += [f"{r['fetch_over_mget']:.2f}x"]
        cells += [f"{r['hash_over_fetch']:.1f}x"]
        cells += [f"{r['mget_cpu']['median_ms']:.3f} / {r['fetch_cpu']['median_ms']:.3f}"]
        print("| " + " | ".join(cells) + " |")


def print_cluster(report: dict[str, Any]) -> None:
    for run, cluster in enumerate(report.get("cluster_runs", [])):
        print(f"\n3-master cluster, run {run + 1} ({report['reps']} reps, interleaved with the "
              "single-node fetch; p10 / median / p99, ms; ratio = median / single-node fetch)\n")
        keys = samples_cluster_keys()
        print("| N | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
        for n, r in cluster.items():
            cells = [_cell(r["single_fetch"])]
            cells += [f"{_cell(r[k])} ({r[k + '_over_single']:.2f}x)" for k in keys[1:]]
            print(f"| {n} | " + " | ".join(cells) + " |")
    if "cluster_summary" in report:
        print("\nratio to the single-node fetch over the runs (min / median / max of the runs' "
              "medians)\n")
        print("| N | method | min | median | max |\n|---|---|---|---|---|")
        for n, per in report["cluster_summary"].items():
            for k, (lo, mid, hi) in per.items():
                print(f"| {n} | {k} | {lo:.2f}x | {mid:.2f}x | {hi:.2f}x |")


def plot_cluster(report: dict[str, Any], path: Path) -> None:
    """Bars of each cluster method's median / single-node fetch median per N (the median run),
    with the min-max over the runs as error bars; the 1.5x goal as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["cluster_summary"]
    sizes = list(summary)
    methods = list(summary[sizes[0]])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        lo, mid, hi = zip(*(summary[n][m] for n in sizes), strict=True)
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(sizes))]
        ax.bar(xs, mid, width, label=m,
               yerr=[[b - a for a, b in zip(lo, mid, strict=True)],
                     [c - b for b, c in zip(mid, hi, strict=True)]], capsize=2)
    ax.axhline(1.5, color="k", ls="--", lw=1, label="goal: 1.5x")
    ax.set_yscale("log")
    ax.set_xticks(range(len(sizes)), [f"N = {n}" for n in sizes])
    ax.set_ylabel("median / single-node fetch median (log)")
    ax.set_title(f"3-master cluster read paths vs one redis-server, {len(report['cluster_runs'])}"
                 " runs (bars: median run; whiskers: min-max)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=300, help="timed iterations per N and method")
    p.add_argument("--no-cluster", action="store_true", help="skip the 3-master cluster part")
    p.add_argument("--no-single", action="store_true",
                   help="skip the single-node tables (the cluster part still has its baseline)")
    p.add_argument("--runs", type=int, default=1,
                   help="repeat the cluster comparison this many times (spread of the ratios)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("--png", type=Path, help="also plot the cluster ratios here")
    args = p.parse_args(argv)
    schema = bench_schema()
    users, items = bench_tables(schema, args.seed)
    report: dict[str, Any] = {
        "reps": args.reps,
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "records": {"users": N_USERS, "items": N_ITEMS},
    }
    gc.disable()  # collected between iterations instead (gc.collect() outside the timings)
    sizes = tuple(args.sizes)
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        rep = load_tables(client, schema, users, items)
        client.close()
        report["load"] = {"records": rep.users + rep.items, "seconds": rep.seconds}
        if not args.no_single:
            write_hash_layout(server.url, schema, users, items)
            report["single"] = asyncio.run(bench_single(server.url, schema, args.reps, args.seed))
        if not args.no_cluster:
            with RedisClusterServer(masters=3) as cluster:
                sync = make_sync_client(cluster.url, cluster=True)
                assert isinstance(sync, RedisCluster)
                crep = load_tables(sync, schema, users, items)
                report["cluster_load"] = {"records": crep.users + crep.items,
                                          "seconds": crep.seconds,
                                          "replica_tags": crep.replica_tags}
                tags = write_bucketed_items(sync, schema, items)
                sync.close()
                report["cluster_runs"] = [
                    asyncio.run(bench_cluster(cluster.url, server.url, schema, args.reps,
                                              args.seed + run, tags, sizes))
                    for run in range(args.runs)
                ]
            report["cluster_summary"] = {
                str(n): {k: [f(r[str(n)][f"{k}_over_single"] for r in report["cluster_runs"])
                             for f in (min, statistics.median, max)]
                         for k in samples_cluster_keys()[1:]}
                for n in sizes
            }
    print_tables(report)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.png is not None and "cluster_summary" in report:
        plot_cluster(report, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
