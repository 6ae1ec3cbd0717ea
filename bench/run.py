"""`ranker bench`: the service, its physical floors and the naive alternative, in one run.

Order of a run: make sure a model exists; start a private redis-server and load the same users
and items in both layouts (packed records for the service, one hash per entity for the naive
app); measure the in-process floors and knobs; then for each HTTP system (noop floor, naive
app, service; 1 and 2 workers) start it under uvicorn, drive it with the load generator in its
own process (concurrency 1, then a sweep until throughput stops growing, then an open-loop run
at one offered rate shared by all), and stop it. Every process started is stopped on exit,
error or Ctrl-C. Results: bench/results/<date>.json, <date>.md and <date>-p99.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from bench import data, floors
from bench.procs import Processes, cpu_seconds, uvicorn_cmd
from launch.procs import HOST, free_port, wait_http
from ranker.manifest import MODEL_FILE, load_manifest, load_schema
from ranker.schema import FeatureSchema

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = {"overhead_ratio_max": 1.3, "throughput_ratio_min": 5.0, "p99_ratio_max": 0.2,
           "saturation_vs_inference_floor_min": 0.8}


@dataclass
class Plan:
    """What one run measures."""

    ns: list[int] = field(default_factory=lambda: [100, 500, 1000])
    concurrencies: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    workers: list[int] = field(default_factory=lambda: [1, 2])
    duration_s: float = 5.0
    warmup_s: float = 1.0
    bodies_per_n: int = 200
    key_n: int = 500  # N of the targets, the stage breakdown and the knobs
    service_knobs: bool = True

    @classmethod
    def quick(cls) -> Plan:
        return cls(ns=[100], concurrencies=[1], workers=[1], duration_s=1.0, warmup_s=0.3,
                   bodies_per_n=20, key_n=100, service_knobs=False)


@dataclass
class Env:
    """Everything the HTTP measurements share."""

    version_dir: Path
    schema: FeatureSchema
    redis_url: str
    workdir: Path
    procs: Processes
    plan: Plan
    data_dir: Path | None = None  # the trainer's dataset, when the tables came from it
    body_files: dict[int, Path] = field(default_factory=dict)
    topk_files: dict[int, Path] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    redis_pid: int | None = None
    server_pgid: int | None = None  # the server being measured (its uvicorn process group)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def resolve_model(args: argparse.Namespace) -> Path:
    """The version directory to benchmark: --model-dir, or the trainer's default model."""
    if args.model_dir:
        return Path(args.model_dir).resolve()
    from training.pipeline import ensure_default_model  # the trainer's; imports torch

    return Path(ensure_default_model(Path(args.model_repo), Path(args.data_dir),
                                     name=args.model_name, small=args.quick)).resolve()


def load_tables(schema: FeatureSchema, data_dir: Path) -> tuple[dict[str, Any], str]:
    """The trainer's tables when they fit the schema, else tables drawn from the schema."""
    tables = data.tables_from_dir(data_dir)
    if tables is not None:
        keys = {e: schema.group(e) for e in ("user", "item")}
        if all(g is not None and g.key in tables[e].column_names for e, g in keys.items()):
            return tables, str(data_dir)
    user_g, item_g = schema.group("user"), schema.group("item")
    n_users = len(user_g.categorical[0].vocab.values) if user_g and user_g.categorical else 1000
    n_items = len(item_g.categorical[0].vocab.values) if item_g and item_g.categorical else 2000
    return data.tables_from_schema(schema, n_users, n_items), "drawn from the model's schema"


def context_of(schema: FeatureSchema) -> dict[str, Any]:
    """A fixed, valid request context: each context feature's most frequent value."""
    g = schema.group("context")
    if g is None:
        return {}
    return {f.name: f.vocab.values[0] for f in g.categorical if f.vocab.values}


def loadgen(env: Env, url: str, bodies: Path, n: int, *, concurrency: int = 1,
            rate: float | None = None) -> dict[str, Any]:
    """One load-generator process; its JSON summary plus the CPU the server and Redis used.

    CPU per request (server process group, and redis-server, over every response of the run
    including warm-up) does not depend on what else runs on the machine the way latency does.
    """
    plan = env.plan
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", url, "--bodies", str(bodies),
           "--candidates", str(n), "--duration", str(plan.duration_s),
           "--warmup", str(plan.warmup_s), "--concurrency", str(concurrency)]
    if rate is not None:
        cmd += ["--mode", "open", "--rate", f"{rate:.3f}"]
    redis_pids = {env.redis_pid} if env.redis_pid else set()
    cpu0 = (cpu_seconds(pgid=env.server_pgid), cpu_seconds(pids=redis_pids))
    res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         timeout=plan.duration_s + plan.warmup_s + 60)
    cpu1 = (cpu_seconds(pgid=env.server_pgid), cpu_seconds(pids=redis_pids))
    if res.returncode != 0:
        raise RuntimeError(f"load generator failed: {res.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(res.stdout)
    done = max(out.get("completed_total", 0), 1)
    out["server_cpu_ms_per_req"] = (cpu1[0] - cpu0[0]) / done * 1e3
    out["redis_cpu_ms_per_req"] = (cpu1[1] - cpu0[1]) / done * 1e3
    return out


def warm(base: str, body_files: list[Path], per_file: int = 4) -> None:
    """A few requests of every size first: lazy initialisation stays out of the measurements."""
    for path in body_files:
        for body in path.read_bytes().splitlines()[:per_file]:
            req = urllib.request.Request(base + "/rank", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()


@contextlib.contextmanager
def server(env: Env, system: str, workers: int, extra_env: dict[str, str] | None = None
           ) -> Iterator[str]:
    """Start `system` (noop, naive, service) under uvicorn; yield its base URL; stop it."""
    port = free_port()
    name = f"{system}-w{workers}-{port}"
    if system == "noop":
        cmd, ready, penv = uvicorn_cmd("bench.noop_app:app", port, workers), "/healthz", {}
    elif system == "naive":
        cmd = uvicorn_cmd("bench.naive_app:create_app", port, workers, factory=True)
        ready = "/healthz"
        penv = {"NAIVE_MODEL_DIR": str(env.version_dir), "NAIVE_REDIS_URL": env.redis_url}
    else:
        cmd = [sys.executable, "-m", "launch.cli", "serve", "--host", HOST, "--port", str(port),
               "--workers", str(workers), "--model-repo", str(env.version_dir.parents[1]),
               "--model-name", env.version_dir.parent.name, "--redis-url", env.redis_url,
               "--watch-interval", "0", "--log-level", "warning"]
        ready = "/readyz"
        # several workers share metrics through files; one worker keeps them in memory (with
        # the variable set, one worker's /metrics showed no histograms at 07:07 UTC)
        penv = ({"PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(dir=env.workdir, prefix="prom-")}
                if workers > 1 else {})
    proc = env.procs.start(name, cmd, {**penv, **(extra_env or {})})
    env.server_pgid = proc.pid  # the child leads its own process group (Processes.start)
    base = f"http://{HOST}:{port}"
    try:
        wait_http(base + ready, proc, timeout_s=120)
    except Exception as e:
        env.procs.stop(proc)
        raise RuntimeError(f"{system} did not start: {e}\n{env.procs.log_tail(name)}") from e
    warm(base, [env.body_files[n] for n in env.plan.ns])
    log(f"{system} ({workers} worker{'s' * (workers > 1)}) up on {base}")
    try:
        yield base
    finally:
        env.procs.stop(proc)
        env.server_pgid = None


def record(env: Env, system: str, workers: int, n: int, res: dict[str, Any], **tags: Any) -> dict:
    row = {"system": system, "workers": workers, "n": n, **tags, **res}
    env.runs.append(row)
    p99 = res.get("p99_ms", float("nan"))
    log(f"  {system} w{workers} N={n} {res['mode']} c={res['concurrency']} "
        f"rate={res['offered_rps']:.0f}: {res['rps']:.1f} req/s, p50 "
        f"{res.get('p50_ms', float('nan')):.2f} ms, p99 {p99:.2f} ms, errors {res['errors']}")
    return row


def sweep(env: Env, base: str, system: str, workers: int, n: int,
          scrape: dict[str, Any] | None = None) -> float:
    """Closed loop at rising concurrency until throughput stops growing; best req/s.

    With `scrape`, the service's stage histograms are read around the concurrency-1 point and
    the mean per stage is stored in it under "stages_metrics_ms".
    """
    best, flat = 0.0, 0
    for c in env.plan.concurrencies:
        before = scrape_stages(base) if scrape is not None and c == 1 else None
        res = loadgen(env, base + "/rank", env.body_files[n], n, concurrency=c)
        if before is not None and scrape is not None:
            scrape["stages_metrics_ms"] = stage_delta(before, scrape_stages(base))
        record(env, system, workers, n, res, kind="sweep")
        # saturated once two points in a row add < 5 %: one noisy point does not end the sweep
        flat = flat + 1 if res["rps"] < best * 1.05 else 0
        best = max(best, res["rps"])
        if flat >= 2:
            break
    return best


def scrape_stages(base: str) -> dict[str, tuple[float, float]]:
    """(sum seconds, count) per stage of ranker_stage_duration_seconds from /metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, list[float]] = {}
    pat = re.compile(r'^ranker_stage_duration_seconds_(sum|count)\{stage="(\w+)"\} (\S+)$')
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            out.setdefault(m.group(2), [0.0, 0.0])[m.group(1) == "count"] += float(m.group(3))
    return {k: (v[0], v[1]) for k, v in out.items()}


def stage_delta(before: dict[str, tuple[float, float]],
                after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean milliseconds per request of each stage between two scrapes."""
    out = {}
    for stage, (s, c) in after.items():
        s0, c0 = before.get(stage, (0.0, 0.0))
        if c > c0:
            out[stage] = (s - s0) / (c - c0) * 1e3
    return out


def http_runs(env: Env, results: dict[str, Any]) -> None:
    """Every HTTP measurement: noop floor, naive app, service; sweeps and same offered load."""
    plan = env.plan
    with server(env, "noop", 1) as base:
        results["floors_http"] = {}
        for n in plan.ns:
            res = loadgen(env, base + "/rank", env.body_files[n], n)
            results["floors_http"][str(n)] = record(env, "noop", 1, n, res, kind="floor")
        if len(plan.concurrencies) > 1:  # what the client itself can push
            res = loadgen(env, base + "/rank", env.body_files[plan.key_n], plan.key_n,
                          concurrency=plan.concurrencies[-1])
            results["loadgen_ceiling"] = record(env, "noop", 1, plan.key_n, res, kind="ceiling")

    saturation: dict[str, dict[str, float]] = {}
    offered: float | None = None
    for system in ("naive", "service"):
        for w in plan.workers:
            key = f"{system}-w{w}"
            saturation[key] = {}
            with server(env, system, w) as base:
                for n in plan.ns:
                    scrape = results if (system, w, n) == ("service", 1, plan.key_n) else None
                    best = sweep(env, base, system, w, n, scrape)
                    saturation[key][str(n)] = best
                if w == plan.workers[0] and len(plan.concurrencies) > 1:
                    if system == "naive":
                        # the same offered load for both: 80 % of what the naive app sustains
                        offered = 0.8 * saturation[key][str(plan.key_n)]
                    assert offered is not None
                    res = loadgen(env, base + "/rank", env.body_files[plan.key_n], plan.key_n,
                                  rate=offered)
                    record(env, system, w, plan.key_n, res, kind="same_load")
                    if system == "service":  # and at 80 % of its own saturation
                        res = loadgen(env, base + "/rank", env.body_files[plan.key_n],
                                      plan.key_n, rate=0.8 * saturation[key][str(plan.key_n)])
                        record(env, system, w, plan.key_n, res, kind="high_load")
                if system == "service" and w == 1 and plan.service_knobs:
                    for c in (1, 8):
                        res = loadgen(env, base + "/rank", env.topk_files[plan.key_n],
                                      plan.key_n, concurrency=c)
                        record(env, system, w, plan.key_n, res, kind="knob", top_k=10)
    results["saturation_rps"] = saturation
    if plan.service_knobs:
        with server(env, "service", 1, {"RANKER_ORT_INTRA_OP_THREADS": "2"}) as base:
            for c in (1, 8):
                res = loadgen(env, base + "/rank", env.body_files[plan.key_n], plan.key_n,
                              concurrency=c)
                record(env, "service", 1, plan.key_n, res, kind="knob", intra_op=2)


def in_process(env: Env, requests: dict[int, list[dict[str, Any]]], bodies: dict[int, list[bytes]],
               load_id: str, results: dict[str, Any]) -> None:
    """MGET and inference floors, parse time, knobs, user-once exactness, serialisation."""
    from service.registry import load_version

    plan, schema = env.plan, env.schema
    model = load_version(env.version_dir, warmup_sizes=())
    model_path = env.version_dir / MODEL_FILE
    session = floors.make_session(model_path, 1, 1, "all")  # = service.registry.make_session
    results["floors"], results["parse"], results["user_once"] = {}, {}, {}
    batches: dict[int, list[Any]] = {}
    for n in plan.ns:
        keys = [floors.store_keys(schema, load_id, r["user_id"], r["candidates"])
                for r in requests[n]]
        batches[n] = floors.fetch_inputs(env.redis_url, schema, requests[n][:50],
                                         model.context_inputs)
        results["floors"][str(n)] = {"mget": floors.mget_floor(env.redis_url, keys),
                                     "inference": floors.ort_time(session, batches[n])}
        results["parse"][str(n)] = floors.parse_time(bodies[n])
        results["user_once"][str(n)] = floors.user_once_vs_tiled(session, schema, batches[n])
        log(f"  floors N={n}: MGET {results['floors'][str(n)]['mget']['p50_ms']:.3f} ms, "
            f"inference {results['floors'][str(n)]['inference']['p50_ms']:.3f} ms")
    key = plan.key_n
    opts = ("disable", "basic", "all") if plan.service_knobs else ("all",)
    results["ort_knobs"] = floors.ort_knobs(model_path, batches[key], opts=opts)
    results["serialisation"] = floors.serialisation(key, model.tasks)
    results["stages_in_process_ms"] = floors.stages_in_process(
        env.redis_url, model, requests[key], bodies[key])
    results["eager_vs_onnx"] = eager_check(env.version_dir, batches[key][:5])
    if plan.service_knobs:
        from bench.quantize import int8_knob

        results["int8"] = int8_knob(env.version_dir, env.data_dir, batches[key])


def eager_check(version_dir: Path, batches: list[dict[str, Any]]) -> dict[str, float]:
    """The naive app's eager model against the served ONNX graph on real batches."""
    import numpy as np
    import torch

    from bench.eager import check_same_weights, load_eager

    model = load_eager(version_dir)
    session = floors.make_session(version_dir / MODEL_FILE)
    names = [o.name for o in session.get_outputs()]
    worst = 0.0
    with torch.no_grad():
        for b in batches:
            want = dict(zip(names, session.run(names, b), strict=True))
            got = model({k: torch.from_numpy(v) for k, v in b.items()})
            worst = max(worst, *(float(np.max(np.abs(got[k].numpy() - want[k]))) for k in names))
    return {"golden_max_abs_diff": check_same_weights(model, version_dir),
            "batches_max_abs_diff": worst}


def run_all(args: argparse.Namespace, plan: Plan, workdir: Path) -> dict[str, Any]:
    """Set up, measure everything, tear down; the raw results."""
    from launch.local_redis import RedisServer
    from service.featurestore.writer import load_tables as store_load

    t_start = time.perf_counter()
    version_dir = resolve_model(args)
    manifest = load_manifest(version_dir)
    schema = load_schema(version_dir, manifest)
    tables, source = load_tables(schema, Path(args.data_dir))
    n_items = tables["item"].num_rows
    tables["item"] = data.pad_entities(schema, tables["item"], "item", max(plan.ns))
    results: dict[str, Any] = {"plan": asdict(plan), "model": {
        "dir": str(version_dir), "name": manifest.name, "version": manifest.version,
        "model_type": manifest.model_type, "tasks": manifest.tasks, "config": manifest.config}}
    with RedisServer() as rs, Processes(workdir / "logs") as procs:
        env = Env(version_dir, schema, rs.url, workdir, procs, plan,
                  data_dir=Path(args.data_dir) if source == str(args.data_dir) else None,
                  redis_pid=rs.pid)
        client = redis.Redis.from_url(rs.url)
        rep = store_load(client, schema, tables["user"], tables["item"])
        n_hashes = data.write_naive_hashes(client, schema, tables)
        client.close()
        user_ids = data.ids(tables["user"], schema, "user")
        item_ids = data.ids(tables["item"], schema, "item")
        results["data"] = {"source": source, "users": len(user_ids), "items": len(item_ids),
                           "items_generated": len(item_ids) - n_items,
                           "records": rep.users + rep.items, "naive_hashes": n_hashes}
        ctx = context_of(schema)
        requests, bodies = {}, {}
        for n in plan.ns:
            bodies[n] = data.request_bodies(user_ids, item_ids, n, plan.bodies_per_n, seed=n,
                                            extra={"context": ctx} if ctx else None)
            requests[n] = [json.loads(b) for b in bodies[n]]
            env.body_files[n] = data.write_bodies(workdir / f"bodies-{n}.jsonl", bodies[n])
            topk = [json.dumps({**r, "top_k": 10}).encode() for r in requests[n]]
            env.topk_files[n] = data.write_bodies(workdir / f"bodies-{n}-top10.jsonl", topk)
        log(f"loaded {len(user_ids)} users, {len(item_ids)} items ({source}); floors and knobs")
        in_process(env, requests, bodies, rep.load_id, results)
        http_runs(env, results)
        procs.started.append({"name": "redis-server", "pid": rs.pid})
    results["runs"] = env.runs
    results["processes"] = procs.started  # all stopped by now; the smoke test checks it
    results["wall_s"] = time.perf_counter() - t_start
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ranker bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few seconds: N=100, c=1, 1 worker")
    p.add_argument("--model-dir", help="model version directory (default: the trainer's default "
                   "model, trained if missing)")
    p.add_argument("--model-repo", default="models")
    p.add_argument("--model-name", default="mmoe")
    p.add_argument("--data-dir", default="data/synthetic")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the report files go")
    p.add_argument("--name", help="report file stem (default: today's UTC date)")
    p.add_argument("--duration", type=float, help="measured seconds per point")
    p.add_argument("--ns", help="comma-separated candidate counts (default 100,500,1000)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.quick:
        floors.BUDGET_S = 0.25
    if args.duration:
        plan.duration_s = args.duration
    if args.ns:
        plan.ns = [int(x) for x in args.ns.split(",")]
        plan.key_n = plan.ns[len(plan.ns) // 2]
    command = "ranker bench " + " ".join(sys.argv[1:] if argv is None else argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through every context manager: children stopped

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="ranker-bench-"))
    started = datetime.now(UTC)
    load_at_start = os.getloadavg()[0]
    try:
        results = run_all(args, plan, workdir)
    except KeyboardInterrupt:
        log("interrupted; every child process was stopped")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    from bench import report

    results["meta"] = report.machine() | {"command": command.strip(), "quick": args.quick,
                                          "started_at": started.isoformat(timespec="seconds"),
                                          "loadavg_1m_at_start": load_at_start}
    results["summary"] = report.summarise(results, TARGETS)
    stem = args.name or started.strftime("%Y-%m-%d")
    paths = report.write(results, Path(args.out_dir), stem)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
