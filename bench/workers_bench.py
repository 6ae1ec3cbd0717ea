"""Saturation throughput of `ranker serve --workers 1` vs `--workers 2` with many connections.

    python -m bench.workers_bench [--candidates 500] [--connections 64] [--reps 3] \
        [--designs wrk,wrk-pinned,pyloadgen] [--out-dir bench/results]

Behind a load balancer a service sees many client connections, spread over its workers by the
kernel (uvicorn's workers share one listening socket). One run: the default-size MMoE of
`bench.measure` exported to a temporary repo, its features in a private redis-server, and
*both* servers (1 worker and 2 workers) started once and left up side by side, idle in turn;
each design then drives them alternately (w1 w2, w2 w1, ...) in closed loop at `connections`
keep-alive connections, `--duration` measured seconds after `--warmup`, `--reps` pairs.

Load generator designs (this machine has 2 cores; servers, Redis and the load generator share
them, so the load generator's own CPU is measured every time):
  wrk         Debian's `wrk` (C, epoll; one thread), a Lua script cycling the request bodies
  wrk-pinned  the same, each uvicorn worker pinned to its own core (sched_setaffinity), the
              1-worker server's to core 0; Redis and wrk float
  pyloadgen   `bench.loadgen` (asyncio on uvloop, one process): the bench's own client

Per point: responses/s (200s only), latency, the load generator's CPU (its rusage), each server
process's CPU (per worker: how evenly the kernel spread the connections), Redis's CPU, and the
machine's busy CPU from /proc/stat, so what other processes took is visible. Output: JSON and
Markdown (`workers-<date>`), with the exact command. Loopback only, every run bounded, every
process stopped on exit (bench.procs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.procs import Processes
from bench.report import publish, save_figure, write_files
from launch.procs import HOST, free_port, wait_http

DESIGNS = ("wrk", "wrk-pinned", "pyloadgen")
TARGET_RATIO = 1.6
WRK_SCRIPT = r"""
-- cycles the request bodies of the file given after `--`; prints one JSON line when done
local bodies, idx = {}, 0
function init(args)
  local f = assert(io.open(args[1], "r"))
  for line in f:lines() do
    if #line > 0 then
      bodies[#bodies + 1] = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, line)
    end
  end
  f:close()
end
function request()
  idx = idx % #bodies + 1
  return bodies[idx]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def parse_wrk(stdout: str) -> dict[str, Any]:
    """The JSON line the Lua `done` prints -> throughput of 200s, latency in ms, errors."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("WRKJSON "))
    raw = json.loads(line[len("WRKJSON "):])
    seconds = raw["duration_us"] / 1e6
    errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]}
    ok = raw["requests"] - raw["status"]
    return {"ok": ok, "seconds": seconds, "rps": ok / seconds, "errors": errors,
            "completed_total": raw["requests"],
            **{f"p{q}_ms": raw[f"p{q}_us"] / 1e3 for q in (50, 90, 99)},
            "mean_ms": raw["mean_us"] / 1e3, "max_ms": raw["max_us"] / 1e3}


def proc_cpu(pids: set[int] | None = None, pgid: int | None = None) -> dict[int, float]:
    """pid -> user+system CPU seconds of the live processes with these pids / in this group."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if (pids is not None and pid in pids) or (pgid is not None and int(fields[2]) == pgid):
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def runqueue_wait_s(pids: list[int]) -> dict[int, float]:
    """pid -> seconds its main thread (the event loop, which does a request's work) spent
    runnable but waiting for a core (/proc/<pid>/schedstat). CPU it wanted and did not get."""
    out: dict[int, float] = {}
    for pid in pids:
        try:
            out[pid] = int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            continue
    return out


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def worker_pids(pgid: int) -> list[int]:
    """The processes of a server's group that serve: uvicorn's spawned workers (not the
    supervisor, not multiprocessing's resource tracker), or the leader itself if it has none."""
    pids = sorted(proc_cpu(pgid=pgid))
    workers = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            workers.append(pid)
    return workers or [pgid]


def cpu_split(before: dict[int, float], after: dict[int, float], seconds: float,
              workers: list[int]) -> dict[str, Any]:
    """Per-process CPU use over a point (cores busy): each worker, in the order given, and the
    rest of the group (supervisor, resource tracker) together."""
    delta = {p: after[p] - before.get(p, 0.0) for p in after}
    mine = [delta.get(p, 0.0) / seconds for p in workers]
    rest = sum(v for p, v in delta.items() if p not in workers)
    return {"workers_cores": [round(w, 3) for w in mine],
            "supervisor_cores": round(rest / seconds, 3), "total_s": sum(delta.values())}


class Bench:
    """The servers, Redis and the request bodies of one run."""

    def __init__(self, args: argparse.Namespace, workdir: Path, procs: Processes,
                 redis_url: str, redis_pid: int, version_dir: Path) -> None:
        self.args, self.workdir, self.procs = args, workdir, procs
        self.redis_url, self.redis_pid, self.version_dir = redis_url, redis_pid, version_dir
        self.bodies = workdir / "bodies.jsonl"
        self.script = workdir / "bodies.lua"
        self.script.write_text(WRK_SCRIPT)
        self.servers: dict[int, tuple[str, int]] = {}  # workers -> (base url, pgid)
        self.workers: dict[int, list[int]] = {}  # workers -> their pids

    def start(self, workers: int) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "launch.cli", "serve", "--host", HOST, "--port", str(port),
               "--workers", str(workers), "--model-repo", str(self.version_dir.parents[1]),
               "--model-name", self.version_dir.parent.name, "--redis-url", self.redis_url,
               "--watch-interval", "0", "--log-level", "warning"]
        env = ({"PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(dir=self.workdir, prefix="prom-")}
               if workers > 1 else {})
        if self.args.request_timeout is not None:
            env["RANKER_REQUEST_TIMEOUT_S"] = str(self.args.request_timeout)
        proc = self.procs.start(f"service-w{workers}", cmd, env)
        base = f"http://{HOST}:{port}"
        wait_http(base + "/readyz", proc, timeout_s=120)
        deadline = time.monotonic() + 60
        while len(worker_pids(proc.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.2)  # every worker up (each one answers /readyz only for itself)
        self.servers[workers] = (base, proc.pid)
        self.workers[workers] = worker_pids(proc.pid)

    def pin(self, pinned: bool) -> None:
        """Each worker on its own core (1-worker server: core 0), or all cores allowed."""
        cores = sorted(os.sched_getaffinity(0))
        for pids in self.workers.values():
            for i, pid in enumerate(pids):
                os.sched_setaffinity(pid, {cores[i % len(cores)]} if pinned else set(cores))

    def point(self, design: str, workers: int, connections: int) -> dict[str, Any]:
        """One measured closed-loop point against the server with `workers` workers."""
        a = self.args
        base, pgid = self.servers[workers]
        url = base + "/rank"
        if design.startswith("wrk"):
            # wrk takes whole seconds
            warm = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(a.warmup))}s", "-s",
                    str(self.script), url, "--", str(self.bodies)]
            subprocess.run(warm, capture_output=True, check=True, timeout=a.warmup + 30)
            cmd = [*warm[:3], f"-d{max(1, round(a.duration))}s", "--timeout",
                   f"{max(1, round(a.timeout))}s", *warm[4:]]
        else:
            cmd = [sys.executable, "-m", "bench.loadgen", "--url", url, "--bodies",
                   str(self.bodies), "--candidates", str(a.candidates), "--concurrency",
                   str(connections), "--duration", str(a.duration), "--warmup", str(a.warmup)]
        server0 = proc_cpu(pgid=pgid)
        wait0 = runqueue_wait_s(self.workers[workers])
        redis0 = proc_cpu(pids={self.redis_pid}).get(self.redis_pid, 0.0)
        client0, busy0, t0 = children_cpu_s(), machine_busy_s(), time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             timeout=a.duration + a.warmup + 60)
        wall = time.perf_counter() - t0
        client_s, busy_s = children_cpu_s() - client0, machine_busy_s() - busy0
        server1 = proc_cpu(pgid=pgid)
        wait1 = runqueue_wait_s(self.workers[workers])
        redis_s = proc_cpu(pids={self.redis_pid}).get(self.redis_pid, 0.0) - redis0
        if res.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {res.stderr[-2000:]}")
        if design.startswith("wrk"):
            out = parse_wrk(res.stdout)
        else:
            out = json.loads(res.stdout)
            out["errors"] = out.get("errors", {})
        # CPU over the whole load-generator process (warm-up included for pyloadgen)
        split = cpu_split(server0, server1, wall, self.workers[workers])
        done = max(out.get("completed_total", out["ok"]), 1)
        out.update(
            design=design, workers=workers, connections=connections, wall_s=wall,
            loadgen_cores=client_s / wall, server_cores=split["total_s"] / wall,
            workers_cores=split["workers_cores"], supervisor_cores=split["supervisor_cores"],
            # per worker: seconds per second runnable but not running (wanted a core, got none)
            workers_waiting=[round((wait1.get(p, 0.0) - wait0.get(p, 0.0)) / wall, 3)
                             for p in self.workers[workers]],
            redis_cores=redis_s / wall, machine_busy_cores=busy_s / wall,
            others_cores=max(0.0, (busy_s - client_s - split["total_s"] - redis_s) / wall),
            server_cpu_ms_per_req=split["total_s"] / done * 1e3,
            redis_cpu_ms_per_req=redis_s / done * 1e3,
            loadgen_cpu_ms_per_req=client_s / done * 1e3,
            loadavg_1m=os.getloadavg()[0],
        )
        if design == "pyloadgen" and "seconds" in out:
            out["wall_s"] = wall  # keep the measured window's own seconds for rps
        return out


def ratios(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Per design: 2-worker rps / 1-worker rps of each consecutive pair, and their spread."""
    out: dict[str, Any] = {}
    for design in dict.fromkeys(p["design"] for p in points):
        mine = [p for p in points if p["design"] == design]
        w1 = [p["rps"] for p in mine if p["workers"] == 1]
        w2 = [p["rps"] for p in mine if p["workers"] == 2]
        pairs = [b / a for a, b in zip(w1, w2, strict=False) if a > 0]
        if not pairs:
            continue
        out[design] = {
            "ratio": {"median": float(np.median(pairs)), "min": min(pairs), "max": max(pairs)},
            "pairs": pairs, "rps_w1": w1, "rps_w2": w2, "met": float(np.median(pairs))
            >= TARGET_RATIO,
        }
    return out


def cpu_ceiling(points: list[dict[str, Any]]) -> dict[str, Any]:
    """What the cores allow if the machine were the servers', Redis's and the load generator's
    alone, from the CPU per request each measured: one worker is bounded by its one core, two
    by every core shared with Redis and the load generator (at the 2-worker CPU per request,
    which includes what a second process costs: the multiprocess metrics files, say)."""
    out: dict[str, Any] = {}
    cores = len(os.sched_getaffinity(0))
    for design in dict.fromkeys(p["design"] for p in points):
        per: dict[int, tuple[float, float, float]] = {}
        for w in (1, 2):
            mine = [p for p in points if p["design"] == design and p["workers"] == w]
            if not mine:
                break
            per[w] = tuple(float(np.median([p[k] for p in mine])) for k in (  # type: ignore[assignment]
                "server_cpu_ms_per_req", "redis_cpu_ms_per_req", "loadgen_cpu_ms_per_req"))
        if len(per) < 2:
            continue
        one = min(1e3 / per[1][0], cores * 1e3 / sum(per[1]))
        two = min(cores * 1e3 / sum(per[2]), 2 * 1e3 / per[2][0])
        out[design] = {"server_ms": per[1][0], "redis_ms": per[1][1], "loadgen_ms": per[1][2],
                       "server_ms_w2": per[2][0], "redis_ms_w2": per[2][1],
                       "loadgen_ms_w2": per[2][2],
                       "w1_bound_rps": one, "w2_bound_rps": two, "ratio_bound": two / one}
    return out


def markdown(report: dict[str, Any]) -> str:
    a = report["args"]
    lines = [f"# 1 vs 2 uvicorn workers, {a['connections']} connections, N = {a['candidates']} "
             f"({report['date']})", "", "```bash", report["command"], "```", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, shared; "
             f"load average {report['loadavg_start']:.2f} at the start, "
             f"{report['loadavg_end']:.2f} at the end. {a['duration']} s measured per point "
             f"after {a['warmup']} s of warm-up; {a['reps']} pairs per design, 1 and 2 workers "
             f"alternating. Wall time {report['wall_s']:.0f} s.", "",
             f"## 2 workers / 1 worker, saturation throughput (target ≥ {TARGET_RATIO}×)", "",
             "| design | ratio, median [min, max] | 1 worker req/s | 2 workers req/s | target |",
             "|---|---|---|---|---|"]
    for d, r in report["ratios"].items():
        s = r["ratio"]
        lines.append(f"| {d} | **{s['median']:.2f}×** [{s['min']:.2f}, {s['max']:.2f}] | "
                     + ", ".join(f"{x:,.0f}" for x in r["rps_w1"]) + " | "
                     + ", ".join(f"{x:,.0f}" for x in r["rps_w2"]) + " | "
                     + ("met" if r["met"] else "**missed**") + " |")
    lines += ["", "## Where the CPU went (cores busy during each point)", "",
              "Per worker: cores used, and (in brackets, where measured) the share of the time "
              "its event loop's thread was runnable but waiting for a core "
              "(/proc/<pid>/schedstat).", "",
              "| design | workers | rep | req/s | p50 / p99 ms | errors | per worker (waiting) | "
              "server | Redis | load generator | others | machine busy | server + Redis CPU "
              "ms/req | load generator ms/req |", "|---|---|---|---|---|---|---|---|---|---|---|"
              "---|---|---|"]
    seen: dict[tuple[str, int], int] = {}
    for p in report["points"]:
        k = (p["design"], p["workers"])
        seen[k] = seen.get(k, 0) + 1
        per = " + ".join(f"{w:.2f}" for w in p["workers_cores"])
        if "workers_waiting" in p:
            per += " (" + " + ".join(f"{w:.2f}" for w in p["workers_waiting"]) + ")"
        lines.append(
            f"| {p['design']} | {p['workers']} | {seen[k]} | {p['rps']:,.0f} | "
            f"{p.get('p50_ms', float('nan')):.1f} / {p.get('p99_ms', float('nan')):.1f} | "
            f"{sum(p['errors'].values()) if p['errors'] else 0} | {per} | "
            f"{p['server_cores']:.2f} | {p['redis_cores']:.2f} | {p['loadgen_cores']:.2f} | "
            f"{p['others_cores']:.2f} | {p['machine_busy_cores']:.2f} | "
            f"{p['server_cpu_ms_per_req'] + p['redis_cpu_ms_per_req']:.2f} | "
            f"{p['loadgen_cpu_ms_per_req']:.3f} |")
    lines += ["", "## What the cores allow if nothing else ran (from the CPU per request)", "",
              "CPU ms per request (medians), 1 worker → 2 workers; the 1-worker server is bounded "
              "by its one core, the 2-worker one by all cores shared with Redis and the load "
              "generator.", "",
              "| design | server ms/req | Redis ms/req | load generator ms/req | 1 worker bound "
              "| 2 workers bound | ratio bound |",
              "|---|---|---|---|---|---|---|"]
    for d, c in report["cpu_ceiling"].items():
        lines.append(f"| {d} | {c['server_ms']:.3f} → {c['server_ms_w2']:.3f} | "
                     f"{c['redis_ms']:.3f} → {c['redis_ms_w2']:.3f} | "
                     f"{c['loadgen_ms']:.3f} → {c['loadgen_ms_w2']:.3f} | "
                     f"{c['w1_bound_rps']:,.0f} req/s | {c['w2_bound_rps']:,.0f} req/s | "
                     f"{c['ratio_bound']:.2f}× |")
    lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Throughput of every point, 1 vs 2 workers per design, and the CPU bound; False without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    designs = list(report["ratios"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, d in enumerate(designs):
        r = report["ratios"][d]
        for w, key, color in ((1, "rps_w1", "tab:blue"), (2, "rps_w2", "tab:orange")):
            xs = [i + (w - 1.5) * 0.3] * len(r[key])
            ax.plot(xs, r[key], "o", color=color, label=f"{w} worker{'s' * (w > 1)}"
                    if i == 0 else None)
        c = report["cpu_ceiling"].get(d)
        if c:
            ax.hlines([c["w1_bound_rps"]], i - 0.45, i - 0.05, colors="tab:blue",
                      linestyles="dashed")
            ax.hlines([c["w2_bound_rps"]], i + 0.05, i + 0.45, colors="tab:orange",
                      linestyles="dashed")
        ax.annotate(f"{r['ratio']['median']:.2f}x", (i, 0), textcoords="offset points",
                    xytext=(0, 5), ha="center")
    ax.set_xticks(range(len(designs)), designs)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("req/s (200s), closed loop")
    a = report["args"]
    ax.set_title(f"1 vs 2 workers, {a['connections']} connections, N={a['candidates']}; dashed: "
                 "what the cores allow if nothing else ran", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path)
    return True


def write(report: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """JSON, Markdown and (with matplotlib) PNG of a report."""
    return write_files(report, out_dir, stem, markdown=markdown, plot=plot, indent=2)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from bench.inprocess import request_bodies
    from bench.measure import export_model, load_features
    from launch.local_redis import RedisServer

    rng = np.random.default_rng(0)
    bodies = request_bodies(rng, args.bodies, args.items, args.candidates)
    points: list[dict[str, Any]] = []
    with RedisServer() as rs, Processes(workdir / "logs") as procs:
        vdir = export_model(workdir / "repo", args.items)
        load_features(rs.url, vdir, args.items)
        assert rs.pid is not None
        bench = Bench(args, workdir, procs, rs.url, rs.pid, vdir)
        bench.bodies.write_bytes(b"\n".join(bodies) + b"\n")
        for w in (1, 2):
            bench.start(w)
        print(f"servers up: {bench.servers}", file=sys.stderr)
        for design in args.designs:
            bench.pin(design == "wrk-pinned")
            for rep in range(args.reps):
                for w in ((1, 2) if rep % 2 == 0 else (2, 1)):
                    p = bench.point(design, w, args.connections)
                    p["rep"] = rep
                    points.append(p)
                    print(f"  {design} w{w} rep {rep}: {p['rps']:,.0f} req/s, loadgen "
                          f"{p['loadgen_cores']:.2f} cores, workers {p['workers_cores']}, "
                          f"waiting {p['workers_waiting']}, redis {p['redis_cores']:.2f}, "
                          f"others {p['others_cores']:.2f}, "
                          f"errors {p['errors']}", file=sys.stderr)
        bench.pin(False)
    return {"points": points}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--bodies", type=int, default=200, help="distinct request bodies, cycled")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="1-worker/2-worker pairs per design")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=5.0, help="wrk's per-request timeout, s")
    p.add_argument("--designs", default=",".join(DESIGNS))
    p.add_argument("--request-timeout", type=float, help="the servers' RANKER_REQUEST_TIMEOUT_S "
                   "(default: the service's, 0.5 s; at saturation behind 64 connections a "
                   "request's queueing may pass it, and a 503 is work thrown away)")
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--name", help="file stem (default workers-<UTC date>)")
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="rewrite the Markdown and PNG of a report's JSON (no measurement)")
    args = p.parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        saved["ratios"] = ratios(saved["points"])
        saved["cpu_ceiling"] = cpu_ceiling(saved["points"])
        for path in write(saved, args.replot.parent, args.replot.stem):
            print(path)
        return 0
    args.designs = [d for d in args.designs.split(",") if d]
    unknown = set(args.designs) - set(DESIGNS)
    if unknown:
        p.error(f"unknown design(s) {sorted(unknown)}; choose from {DESIGNS}")
    if any(d.startswith("wrk") for d in args.designs) and shutil.which("wrk") is None:
        p.error("wrk is not on PATH (Debian: apt-get install wrk); or --designs pyloadgen")
    if not 1 <= args.connections <= 1024 or not 0 < args.duration <= 120:
        p.error("--connections in [1, 1024], --duration in (0, 120]")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through Processes: every child stopped

    signal.signal(signal.SIGTERM, on_term)
    from bench.report import machine

    started = datetime.now(UTC)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="ranker-workers-"))
    try:
        report = run(args, workdir)
    except KeyboardInterrupt:
        print("interrupted; every child process was stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report |= {
        "date": started.strftime("%Y-%m-%d"), "started_at": started.isoformat(timespec="seconds"),
        "command": "python -m bench.workers_bench " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "args": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "machine": machine(), "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
        "wall_s": time.perf_counter() - t0,
    }
    report["ratios"] = ratios(report["points"])
    report["cpu_ceiling"] = cpu_ceiling(report["points"])
    publish(report, args.out_dir, args.name or f"workers-{report['date']}", markdown=markdown,
            write=write)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
