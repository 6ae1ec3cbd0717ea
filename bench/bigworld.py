"""The service at production size against the small world, in one run (issue 20).

    python -m bench.bigworld --world small=models/mmoe/1:data/synthetic \\
        --world production=runs/big/models/mmoe/1:data/production --name bigworld-2026-12-01

For each world, in turn, on one private redis-server each (loopback):
  load     `ranker features load` as a process on the world's Parquet files (streamed):
           records/s, its peak RSS and CPU, the redis-server's CPU, MEMORY USAGE per record
           (sampled) and Redis's used memory; `--load-runs K` K times (the median),
           `--load-only` nothing else
  floors   one raw MGET of the request's keys and one onnxruntime run (in process), and a
           FastAPI POST that does nothing (the noop app under uvicorn), each p50 per N
  service  one `ranker serve` worker, closed loop at concurrency 1 for each N: p50 / p99, the
           stage breakdown from its /metrics; overhead = service p50 / sum of the floors
and the production world's ratios over the small world's. Results: <out>/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import redis

from bench import data, floors
from bench.procs import Processes
from bench.run import RESULTS_DIR, Env, Plan, loadgen, log, scrape_stages, server, stage_delta
from ranker.manifest import MODEL_FILE, load_manifest, load_schema

NS = (100, 500, 1000)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_sum(pids: tuple[int | None, ...]) -> float | None:
    """The processes' CPU seconds summed; None when there are none or one cannot be read."""
    cpu = [process_cpu_s(pid) if pid else None for pid in pids]
    return None if not cpu or None in cpu else sum(c for c in cpu if c is not None)


def load_features(version_dir: Path, users: Path, items: Path, url: str,
                  redis_pids: tuple[int | None, ...] = (), nodes: list[str] | None = None,
                  ) -> dict[str, Any]:
    """`ranker features load` as its own process, timed: its peak RSS and CPU (GNU time if
    present) and the redis-servers' CPU meanwhile (`redis_pids`, summed). With `nodes` (the
    URLs of a cluster's masters) it loads with `--cluster`, memory and keys summed over them."""
    cmd = [sys.executable, "-m", "launch.cli", "features", "load", "--model-dir",
           str(version_dir), "--users", str(users), "--items", str(items), "--redis-url", url,
           "--no-progress", *(["--cluster"] if nodes else [])]
    gnu_time = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists()
                                        else None)
    rss_file = Path(tempfile.mkstemp(prefix="rss-")[1])
    if gnu_time:
        cmd = [gnu_time, "-f", "%M %U %S", "-o", str(rss_file), *cmd]
    load_start = round(os.getloadavg()[0], 2)
    redis_cpu = _cpu_sum(redis_pids)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"features load failed: {out.stderr[-2000:]}")
    redis_after = _cpu_sum(redis_pids)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    timed = rss_file.read_text().strip().splitlines()[-1].split() if gnu_time else []
    rss_kb = timed[0] if timed else ""
    rss_file.unlink(missing_ok=True)
    used_memory, keys = 0, 0
    for node in nodes or [url]:
        client = redis.Redis.from_url(node)
        try:
            used_memory += client.info("memory")["used_memory"]
            keys += client.dbsize()
        finally:
            client.close()
    records = report["users"] + report["items"]
    return {"command": " ".join(cmd), "wall_s": wall, "records": records,
            "records_per_s": report["records_per_s"], "report_seconds": report["seconds"],
            "peak_rss_mb": int(rss_kb) / 1024 if rss_kb.isdigit() else None,
            "memory_usage_bytes_per_record": report["redis_bytes_per_record"],
            "redis_used_memory_mb": used_memory / 2**20, "keys": keys,
            "used_memory_bytes_per_key": used_memory / max(keys, 1),
            "load_id": report["load_id"], "loadavg_1m_start": load_start,
            "loader_cpu_s": float(timed[1]) + float(timed[2]) if len(timed) == 3 else None,
            "redis_cpu_s": (redis_after - redis_cpu if redis_after is not None
                            and redis_cpu is not None else None)}


def items_file(schema: Any, data_dir: Path, workdir: Path) -> Path:
    """The world's items, topped up to the largest N with generated items (`pad_entities`,
    as `ranker bench` does) when the world has fewer."""
    path = data_dir / "items.parquet"
    if pq.ParquetFile(path).metadata.num_rows >= max(NS):
        return path
    padded = workdir / "items-padded.parquet"
    pq.write_table(data.pad_entities(schema, pq.read_table(path), "item", max(NS)), padded)
    return padded


def request_files(workdir: Path, users_path: Path, items_path: Path, schema: Any, count: int
                  ) -> tuple[dict[int, Path], dict[int, list[dict[str, Any]]]]:
    """Seeded bodies per N (users and items of the world's tables), as files and dicts."""
    users = pq.read_table(users_path, columns=["user_id"])
    items = pq.read_table(items_path, columns=["item_id"])
    user_ids = users.column(0).to_pylist()
    item_ids = items.column(0).to_pylist()
    ctx = {"hour": 20, "surface": "home"} if schema.group("context") is not None else None
    files, reqs = {}, {}
    for n in NS:
        bodies = data.request_bodies(user_ids, item_ids, n, count, seed=n,
                                     extra={"context": ctx} if ctx else None)
        files[n] = data.write_bodies(workdir / f"bodies-{n}.jsonl", bodies)
        reqs[n] = [json.loads(b) for b in bodies]
    return files, reqs


def load_runs_into(version_dir: Path, data_dir: Path, items: Path, nodes: list[str],
                   load_runs: int, pids: tuple[int | None, ...], name: str, cluster: bool = False,
                   ) -> dict[str, Any]:
    """`load_runs` loads, each into an empty Redis (`nodes`: one server's URL, or a cluster's
    masters; the last load stays): the last run's figures with the median records/s."""
    log(f"{name}: loading the features of {data_dir} into {len(nodes)} node(s)")
    runs = []
    for run in range(max(1, load_runs)):
        if run:
            for node in nodes:
                redis.Redis.from_url(node, socket_timeout=300).flushall()
        runs.append(load_features(version_dir, data_dir / "users.parquet", items, nodes[0],
                                  pids, nodes if cluster else None))
        log(f"  {runs[-1]['records']} records at {runs[-1]['records_per_s']:,.0f}/s, "
            f"peak RSS {runs[-1]['peak_rss_mb']} MB, load {runs[-1]['loadavg_1m_start']}")
    return dict(runs[-1], records_per_s=statistics.median(r["records_per_s"] for r in runs),
                runs=[r["records_per_s"] for r in runs],
                loader_cpu_s_runs=[r["loader_cpu_s"] for r in runs],
                redis_cpu_s_runs=[r["redis_cpu_s"] for r in runs],
                loadavg_runs=[r["loadavg_1m_start"] for r in runs])


def measure_world(name: str, version_dir: Path, data_dir: Path, plan: Plan, workdir: Path,
                  load_runs: int = 1, load_only: bool = False, cluster: int = 0,
                  ) -> dict[str, Any]:
    from launch.local_redis import RedisServer
    from service.registry import load_version

    manifest = load_manifest(version_dir)
    schema = load_schema(version_dir, manifest)
    wdir = workdir / name
    wdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"model": str(version_dir), "data": str(data_dir),
                           "dataset": json.loads((data_dir / "dataset.json").read_text())
                           .get("sizes"),
                           "inputs": [t.model_dump() for t in manifest.inputs],
                           "model_bytes": (version_dir / MODEL_FILE).stat().st_size}
    items = items_file(schema, data_dir, wdir)
    out["items_generated"] = items != data_dir / "items.parquet"
    if cluster:  # the loads only, into a cluster of `cluster` masters
        from launch.local_redis import RedisClusterServer

        with RedisClusterServer(cluster) as rc:
            nodes = [n.url for n in rc.nodes]
            out["load"] = load_runs_into(version_dir, data_dir, items, nodes, load_runs,
                                         tuple(n.pid for n in rc.nodes), name, cluster=True)
            out["load"]["cluster_masters"] = cluster
        return out
    with RedisServer() as rs, Processes(wdir / "logs") as procs:
        out["load"] = load_runs_into(version_dir, data_dir, items, [rs.url], load_runs,
                                     (rs.pid,), name)
        if load_only:
            return out
        env = Env(version_dir, schema, rs.url, wdir, procs, plan, redis_pid=rs.pid)
        env.body_files, reqs = request_files(wdir, data_dir / "users.parquet", items, schema,
                                             plan.bodies_per_n)
        model = load_version(version_dir, warmup_sizes=())
        session = floors.make_session(version_dir / MODEL_FILE, 1, 1, "all")
        lid = out["load"]["load_id"]
        out["floors"] = {}
        for n in NS:
            keys = [floors.store_keys(schema, lid, r["user_id"], r["candidates"])
                    for r in reqs[n]]
            batches = floors.fetch_inputs(rs.url, schema, reqs[n][:50], model.context_inputs)
            out["floors"][str(n)] = {"mget": floors.mget_floor(rs.url, keys),
                                     "inference": floors.ort_time(session, batches)}
        with server(env, "noop", 1) as base:
            for n in NS:
                res = loadgen(env, base + "/rank", env.body_files[n], n)
                out["floors"][str(n)]["noop_http"] = {"p50_ms": res["p50_ms"]}
        out["service"] = {}
        with server(env, "service", 1) as base:
            for n in NS:
                before = scrape_stages(base)
                res = loadgen(env, base + "/rank", env.body_files[n], n)
                stages = stage_delta(before, scrape_stages(base))
                fl = out["floors"][str(n)]
                floor_sum = (fl["mget"]["p50_ms"] + fl["inference"]["p50_ms"]
                             + fl["noop_http"]["p50_ms"])
                out["service"][str(n)] = {
                    "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"], "rps": res["rps"],
                    "errors": res["errors"], "server_cpu_ms_per_req":
                    res["server_cpu_ms_per_req"], "floor_sum_ms": floor_sum,
                    "overhead_ratio": res["p50_ms"] / floor_sum, "stages_ms": stages}
                log(f"  {name} N={n}: p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
                    f"floors {floor_sum:.2f} ms, overhead {res['p50_ms'] / floor_sum:.2f}x")
    return out


def ratios(small: dict[str, Any], big: dict[str, Any]) -> dict[str, Any]:
    """The production world's figures over the small world's, per N."""
    out = {}
    for n in map(str, NS):
        s, b = small["service"][n], big["service"][n]
        out[n] = {"p50": b["p50_ms"] / s["p50_ms"], "p99": b["p99_ms"] / s["p99_ms"],
                  "overhead_ratio": b["overhead_ratio"] / s["overhead_ratio"]}
    return out


def _table_head(title: str, *columns: str) -> list[str]:
    """A Markdown section's title and its table's header and rule."""
    return ["", f"## {title}", "", "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns)]


def markdown(results: dict[str, Any]) -> str:
    worlds = results["worlds"]
    what = ("The service" if all("service" in w for w in worlds.values()) else "The loader")
    lines = [f"# {what} at production size ({results['date']})", "",
             f"Machine: {results['machine']['cpus']} CPUs, load average at the start "
             f"{results['machine']['loadavg_start']}, at the end "
             f"{results['machine']['loadavg_end']} (a shared VM: other jobs ran meanwhile).",
             "", "Command:", "", "```", results["command"], "```"]
    lines += _table_head("Worlds", "world", "users", "items", "impressions", "model inputs",
                         "model.onnx")
    for name, w in worlds.items():
        sizes = w["dataset"] or {}
        imp = sum(v for k, v in sizes.items() if k.startswith("impressions_"))
        ins = ", ".join(f"{i['name']} {i['shape'][-1]}" for i in w["inputs"])
        lines.append(f"| {name} | {sizes.get('users', 0):,} | {sizes.get('items', 0):,} | "
                     f"{imp:,} | {ins} | {w['model_bytes'] / 1e6:.1f} MB |")
    lines += _table_head("Loading the features (`ranker features load`, streamed)", "world",
                         "records", "records/s (median)", "each run", "load avg at each",
                         "loader CPU s", "redis-server CPU s", "wall s", "peak RSS",
                         "MEMORY USAGE per record", "Redis used memory")
    for name, w in worlds.items():
        ld = w["load"]
        per = ", ".join(f"{e} {v:.0f} B" for e, v in ld["memory_usage_bytes_per_record"].items())
        rss = f"{ld['peak_rss_mb']:.0f} MB" if ld["peak_rss_mb"] else "n/a"
        runs = ", ".join(f"{r:,.0f}" for r in ld.get("runs", [ld["records_per_s"]]))
        loads = ", ".join(f"{x:.1f}" for x in ld.get("loadavg_runs", []))
        cpu = ", ".join(f"{x:.1f}" for x in ld.get("loader_cpu_s_runs", []) if x is not None)
        rcpu = ", ".join(f"{x:.1f}" for x in ld.get("redis_cpu_s_runs", []) if x is not None)
        where = (f" (cluster, {ld['cluster_masters']} masters)" if ld.get("cluster_masters")
                 else "")
        lines.append(f"| {name}{where} | {ld['records']:,} | {ld['records_per_s']:,.0f} | {runs} | "
                     f"{loads} | {cpu} | {rcpu} | {ld['wall_s']:.1f} | {rss} | {per} | "
                     f"{ld['redis_used_memory_mb']:.0f} MB |")
    if not all("service" in w for w in worlds.values()):
        return "\n".join(lines) + "\n"
    lines += _table_head("/rank, one worker, concurrency 1", "world", "N", "p50", "p99",
                         "MGET floor", "inference floor", "noop HTTP", "sum of floors",
                         "overhead", "req/s")
    for name, w in worlds.items():
        for n in map(str, NS):
            s, fl = w["service"][n], w["floors"][n]
            lines.append(
                f"| {name} | {n} | {s['p50_ms']:.2f} ms | {s['p99_ms']:.2f} ms | "
                f"{fl['mget']['p50_ms']:.3f} | {fl['inference']['p50_ms']:.3f} | "
                f"{fl['noop_http']['p50_ms']:.3f} | {s['floor_sum_ms']:.2f} | "
                f"{s['overhead_ratio']:.2f}x | {s['rps']:.0f} |")
    stages = sorted({k for w in worlds.values() for s in w["service"].values()
                     for k in s["stages_ms"]})
    lines += _table_head("Where the time goes (mean ms per request, from the stage histograms)",
                         "world", "N", *stages)
    for name, w in worlds.items():
        for n in map(str, NS):
            st = w["service"][n]["stages_ms"]
            lines.append(f"| {name} | {n} | " + " | ".join(f"{st.get(k, 0):.3f}" for k in stages)
                         + " |")
    if "ratios" in results:
        lines += _table_head("Production over small (same run)", "N", "p50", "p99",
                             "overhead ratio")
        for n, r in results["ratios"].items():
            lines.append(f"| {n} | {r['p50']:.2f}x | {r['p99']:.2f}x | "
                         f"{r['overhead_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def export_untrained(spec_name: str, data_dir: Path, repo: Path, name: str = "mmoe") -> Path:
    """The production-size model's graph without its training: the schema fitted on the
    world's train split (1 M user ids, 100 k item ids), the default `ModelConfig`, initial
    weights; golden rows from the test split. Its latency is the trained model's (the same
    graph and tables); its scores are not, and the results say which one was measured."""
    from training.data import build_schema, encode_split, load_raw, training_data_info
    from training.export import export_model
    from training.model import ModelConfig, MultiTaskModel, inputs_from_schema
    from training.pipeline import golden_from
    from training.spec import load_spec

    spec = load_spec(spec_name)
    raw = load_raw(spec, data_dir)
    schema = build_schema(spec, raw)
    test = encode_split(spec, schema, raw, "test")
    model = MultiTaskModel(ModelConfig(inputs=inputs_from_schema(schema), tasks=spec.task_names))
    return export_model(model.eval(), schema, repo, name, golden_from(schema, test),
                        metrics={"untrained": True},
                        training_data=training_data_info(spec, raw))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export-untrained"]:  # export-untrained SPEC DATA_DIR REPO
        print(export_untrained(argv[1], Path(argv[2]), Path(argv[3])))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.bigworld", description=__doc__)
    p.add_argument("--world", action="append", required=True,
                   help="name=<model version dir>:<data dir> (first: the baseline)")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--bodies", type=int, default=200)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--name", default="bigworld")
    p.add_argument("--load-runs", type=int, default=1,
                   help="measure the load this many times per world (median reported)")
    p.add_argument("--load-only", action="store_true", help="the loads only (no /rank)")
    p.add_argument("--cluster", type=int, default=0, metavar="MASTERS",
                   help="load into a local Redis Cluster of this many masters (implies "
                        "--load-only)")
    a = p.parse_args(argv)
    plan = Plan(ns=list(NS), concurrencies=[1], workers=[1], duration_s=a.duration,
                warmup_s=1.0, bodies_per_n=a.bodies, key_n=500, service_knobs=False)
    worlds: dict[str, tuple[Path, Path]] = {}
    for spec in a.world:
        name, _, paths = spec.partition("=")
        vdir, _, ddir = paths.partition(":")
        worlds[name] = (Path(vdir).resolve(), Path(ddir).resolve())
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m bench.bigworld " + " ".join(argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "worlds": {}}
    with tempfile.TemporaryDirectory(prefix="bigworld-") as tmp:
        for name, (vdir, ddir) in worlds.items():
            results["worlds"][name] = measure_world(name, vdir, ddir, plan, Path(tmp),
                                                    a.load_runs, a.load_only or bool(a.cluster),
                                                    a.cluster)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    names = list(results["worlds"])
    if len(names) > 1 and not (a.load_only or a.cluster):
        results["ratios"] = ratios(results["worlds"][names[0]], results["worlds"][names[-1]])
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / f"{a.name}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
