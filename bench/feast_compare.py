"""Feast's `get_online_features` next to our `FeatureStore.fetch`, same Redis, same run.

    python -m bench.feast_compare [--reps 200] [--runs 3] [--out-dir bench/results] \
        [--ours-python .venv/bin/python]

The world is the feature-store bench's (`bench.featurestore_bench`: 2,000 users with 4
categorical + 8 dense features, 20,000 items with 6 + 12, 5 % of candidate ids unknown). One
private redis-server holds both layouts: our packed records (`load_tables`) and Feast's Redis
online store (`bench.feast_store`: a generated repo, Parquet `FileSource`s, `materialize`).
For 1 user + N items (N = 100, 500, 1000), each iteration draws the ids once and times, back to
back in one process, alternating which goes first:

  ours        `FeatureStore.fetch` (one MGET, decoded into the model's arrays)
  feast       `get_online_features` with every feature of both views (the same 12 + 18 values)
  feast_3     the same call asking for 3 item features only (+ the user's 12)
  feast_full  `feast`, then `.to_dict()` and numpy arrays: what a ranker needs from the answer

Each run is a fresh pass (its own seed); ratios are Feast median / our median per run, and the
report gives their median and range over the runs, by wall time and by the calling thread's CPU
time. `--ours-python` also times our fetch alone in that interpreter (the project's venv: the
lock's redis-py, where feast pins redis<8) on the same draws right after each run.

Feast is not a dependency of the project: it lives in the `feast` extra, installed in a venv
of its own (it pins packages the service's lock moves); without it this prints why and exits 0
having measured nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bench.report import publish, save_figure, write_files
from ranker.schema import FeatureSchema, GroupSchema

VIEW_NAMES = {"user": "user_features", "item": "item_features"}
NARROW_ITEM_FEATURES = 3
FEAST_MISSING = (
    "feast is not importable here ({error}); the Feast comparison is skipped, nothing was "
    "measured. It needs the `feast` extra in a venv of its own, never the project's venv:\n"
    "    python3.11 -m venv /work/venvs/feast\n"
    "    /work/venvs/feast/bin/pip install 'feast[redis]>=0.67' prometheus-client\n"
    "    PYTHONPATH=$PWD PATH=/work/venvs/feast/bin:.venv/bin:$PATH "
    "python -m bench.feast_compare"
)
METHODS = ("ours", "feast", "feast_3", "feast_full")


def feast_missing() -> str | None:
    """None if feast imports, else the message saying why the comparison is skipped."""
    try:
        import feast  # noqa: F401
    except ImportError as e:
        return FEAST_MISSING.format(error=f"{type(e).__name__}: {e}")
    return None


def encoded_columns(g: GroupSchema, table: pa.Table) -> dict[str, Any]:
    """The group's key column and its encoded features (int64 indices, float32 values): what
    our records hold, as columns for Feast's Parquet source."""
    assert g.key is not None
    cat, dense = g.encode_columns({n: table.column(n) for n in g.feature_names}, table.num_rows)
    cols: dict[str, Any] = {g.key: table.column(g.key)}
    for j, f in enumerate(g.categorical):
        cols[f.name] = pa.array(cat[:, j].astype(np.int64))
    for j, d in enumerate(g.dense):
        cols[d.name] = pa.array(dense[:, j])
    return cols


def feature_refs(schema: FeatureSchema, item_features: int | None = None) -> list[str]:
    """`view:feature` references: every user feature, and all item features or the first
    `item_features` of them (categorical first)."""
    out = []
    for entity in ("user", "item"):
        g = schema.group(entity)
        assert g is not None
        names = g.feature_names
        if entity == "item" and item_features is not None:
            names = names[:item_features]
        out += [f"{VIEW_NAMES[entity]}:{n}" for n in names]
    return out


def spread(values: list[float]) -> dict[str, float]:
    """Median and range of one figure over the runs."""
    return {"median": float(np.median(values)), "min": float(min(values)),
            "max": float(max(values))}


def summarize_ms(samples_ns: list[int]) -> dict[str, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e6
    return {"p10_ms": float(np.percentile(a, 10)), "median_ms": float(np.median(a)),
            "p99_ms": float(np.percentile(a, 99))}


def headline(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per N and Feast variant: the ratio Feast median / our median, over the runs."""
    out: dict[str, Any] = {}
    for n in runs[0]:
        row: dict[str, Any] = {}
        for m in METHODS[1:]:
            row[f"{m}_over_ours"] = spread([r[n][m]["median_ms"] / r[n]["ours"]["median_ms"]
                                            for r in runs])
        for m in METHODS:
            row[f"{m}_median_ms"] = spread([r[n][m]["median_ms"] for r in runs])
        if all("ours_cpu" in r[n] for r in runs):  # client CPU per call, same process
            row["cpu_feast_over_ours"] = spread(
                [r[n]["feast_cpu"]["median_ms"] / r[n]["ours_cpu"]["median_ms"] for r in runs])
            row["cpu_feast_3_over_ours"] = spread(
                [r[n]["feast_3_cpu"]["median_ms"] / r[n]["ours_cpu"]["median_ms"] for r in runs])
        if all("ours_lock" in r[n] for r in runs):  # our fetch in the project's venv
            row["ours_lock_median_ms"] = spread([r[n]["ours_lock"]["median_ms"] for r in runs])
            row["feast_over_ours_lock"] = spread(
                [r[n]["feast"]["median_ms"] / r[n]["ours_lock"]["median_ms"] for r in runs])
            row["feast_3_over_ours_lock"] = spread(
                [r[n]["feast_3"]["median_ms"] / r[n]["ours_lock"]["median_ms"] for r in runs])
        out[n] = row
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report's Markdown: command, setup, per-run medians, the ratios with their spread."""
    lines = [
        f"# Feast vs FeatureStore.fetch ({report['date']})", "",
        "```bash", report["command"], "```", "",
        f"Machine: {report['machine']}; Python {report['python']}, feast {report['feast']}, "
        f"redis-py {report['redis_py']}; load average at the start {report['loadavg_start']:.2f}"
        f", at the end {report['loadavg_end']:.2f}.",
        f"World: {report['records']['users']:,} users, {report['records']['items']:,} items; "
        f"Feast apply {report['feast_load_s']['apply']:.1f} s, materialize "
        f"{report['feast_load_s']['materialize']:.1f} s; our load_tables "
        f"{report['ours_load_s']:.1f} s. {report['reps']} timed iterations per N and run, "
        f"{len(report['runs'])} runs.", "",
        "## Ratio Feast / ours (median over runs, [min, max])", "",
        "| N | ours fetch+decode (ms) | feast get_online_features (ms) | feast / ours "
        "| feast, 3 item features / ours | feast + to_dict + arrays / ours |",
        "|---|---|---|---|---|---|",
    ]

    def r(s: dict[str, float], unit: str = "×", fmt: str = ".1f") -> str:
        return f"{s['median']:{fmt}}{unit} [{s['min']:{fmt}}, {s['max']:{fmt}}]"

    for n, h in report["headline"].items():
        lines.append(
            f"| {n} | {r(h['ours_median_ms'], '', '.3f')} | {r(h['feast_median_ms'], '', '.2f')}"
            f" | **{r(h['feast_over_ours'])}** | {r(h['feast_3_over_ours'])} "
            f"| {r(h['feast_full_over_ours'])} |")
    cpu = [(n, h) for n, h in report["headline"].items() if "cpu_feast_over_ours" in h]
    if cpu:
        lines += ["", "Client CPU per call (this thread's CPU time, same process; Redis's own "
                  "work not included), Feast / ours:", "",
                  "| N | feast / ours | feast, 3 item features / ours |", "|---|---|---|"]
        for n, h in cpu:
            lines.append(f"| {n} | {r(h['cpu_feast_over_ours'])} "
                         f"| {r(h['cpu_feast_3_over_ours'])} |")
    lock = [(n, h) for n, h in report["headline"].items() if "ours_lock_median_ms" in h]
    if lock:
        lines += ["", "Our fetch alone in the project's venv (the lock's redis-py "
                  f"{report.get('ours_redis_py', '?')}; feast pins redis<8), same redis-server, "
                  "right after each run:", "",
                  "| N | ours, project venv (ms) | feast / it | feast, 3 item features / it |",
                  "|---|---|---|---|"]
        for n, h in lock:
            lines.append(f"| {n} | {r(h['ours_lock_median_ms'], '', '.3f')} "
                         f"| **{r(h['feast_over_ours_lock'])}** "
                         f"| {r(h['feast_3_over_ours_lock'])} |")
    lines += ["", "## Every run (p10 / median / p99, ms)", "",
              "| run | N | ours | feast | feast, 3 item features | feast + to_dict + arrays |",
              "|---|---|---|---|---|---|"]
    for i, run in enumerate(report["runs"], 1):
        for n, row in run.items():
            cells = [f"{row[m]['p10_ms']:.3f} / {row[m]['median_ms']:.3f} / "
                     f"{row[m]['p99_ms']:.3f}" for m in METHODS]
            lines.append(f"| {i} | {n} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Median latency per N (log scale) of each method, every run a point; False without
    matplotlib (the feast venv may not have it: `--replot` the JSON from the project's venv)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"ours": "ours: FeatureStore.fetch + decode", "ours_lock": "ours, project venv",
              "feast": "feast get_online_features", "feast_3": "feast, 3 item features",
              "feast_full": "feast + to_dict + arrays"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = [int(n) for n in report["runs"][0]]
    for m, label in labels.items():
        if m not in report["runs"][0][str(ns[0])]:
            continue
        med = [float(np.median([r[str(n)][m]["median_ms"] for r in report["runs"]])) for n in ns]
        (line,) = ax.plot(ns, med, "-o", label=label)
        for r in report["runs"]:
            ax.plot(ns, [r[str(n)][m]["median_ms"] for n in ns], ".", color=line.get_color(),
                    alpha=0.4)
    ax.set_yscale("log")
    ax.set_xlabel("items per request (+ 1 user)")
    ax.set_ylabel("median latency per call, ms (log)")
    h = report["headline"].get("500", {}).get("feast_over_ours")
    title = "Feast vs ours, same Redis, same run"
    if h:
        title += f": {h['median']:.0f}x at N=500 [{h['min']:.0f}, {h['max']:.0f}]"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def write(report: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """JSON, Markdown and (with matplotlib) PNG of a report."""
    return write_files(report, out_dir, stem, markdown=markdown, plot=plot, indent=2)


async def timed_ours(fs: Any, user: str, ids: list[str]) -> tuple[int, int]:
    """(wall, this thread's CPU) ns of one fetch; the CPU time is the client's own work, far
    less disturbed than the wall time when other processes compete for the cores."""
    t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    await fs.fetch(user, ids)
    return time.perf_counter_ns() - t0, time.thread_time_ns() - c0


async def one_run(url: str, reader: Any, schema: FeatureSchema, reps: int, seed: int,
                  sizes: tuple[int, ...], n_users: int, n_items: int) -> dict[str, Any]:
    """One pass over the sizes: ours and the three Feast calls on the same ids, interleaved."""
    from service.featurestore.reader import FeatureStore, make_client

    client = make_client(url, socket_timeout_s=2.0)
    fs = FeatureStore(client, schema)
    await fs.fetch("u0", ["i0"])  # learn the load pointers
    narrow = reader.narrow
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for n in sizes:
        samples: dict[str, list[int]] = {m: [] for m in METHODS}
        cpu: dict[str, list[int]] = {m: [] for m in METHODS}
        for rep in range(reps + 5):  # the first 5 are warm-up
            ids = [f"i{i}" for i in rng.integers(0, int(n_items * 1.05), n)]  # ~5 % unknown
            user = f"u{rng.integers(0, n_users)}"
            calls = [("feast", reader.full.get), ("feast_3", narrow.get),
                     ("feast_full", reader.full.get_arrays)]
            if rep % 20 == 0:
                gc.collect()  # outside the timings; the collector is off while timing
            times: dict[str, tuple[int, int]] = {}
            if rep % 2 == 0:  # ours first on even iterations, last on odd ones
                times["ours"] = await timed_ours(fs, user, ids)
            for name, fn in calls if rep % 4 < 2 else reversed(calls):
                t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                fn(user, ids)
                times[name] = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
            if rep % 2:
                times["ours"] = await timed_ours(fs, user, ids)
            if rep >= 5:
                for k, (wall, c) in times.items():
                    samples[k].append(wall)
                    cpu[k].append(c)
        out[str(n)] = {m: summarize_ms(v) for m, v in samples.items()}
        out[str(n)] |= {f"{m}_cpu": summarize_ms(v) for m, v in cpu.items()}
        row = out[str(n)]
        print(f"  N={n}: ours {row['ours']['median_ms']:.3f} ms, feast "
              f"{row['feast']['median_ms']:.2f} ms "
              f"({row['feast']['median_ms'] / row['ours']['median_ms']:.1f}x)", file=sys.stderr)
    await fs.aclose()
    return out


async def ours_only(url: str, schema: FeatureSchema, reps: int, seed: int,
                    sizes: tuple[int, ...], n_users: int, n_items: int) -> dict[str, Any]:
    """Our fetch alone on the same draws as `one_run` (for `--ours-python`: the project's venv,
    whose redis-py is the lock's, not the one feast pins)."""
    from service.featurestore.reader import FeatureStore, make_client

    fs = FeatureStore(make_client(url, socket_timeout_s=2.0), schema)
    await fs.fetch("u0", ["i0"])
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for n in sizes:
        samples: list[int] = []
        for rep in range(reps + 5):
            ids = [f"i{i}" for i in rng.integers(0, int(n_items * 1.05), n)]
            user = f"u{rng.integers(0, n_users)}"
            if rep % 20 == 0:
                gc.collect()
            wall, _ = await timed_ours(fs, user, ids)
            if rep >= 5:
                samples.append(wall)
        out[str(n)] = {"ours_lock": summarize_ms(samples)}
    await fs.aclose()
    return out


def run_ours_python(python: str, url: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """`ours_only` in another interpreter (the project's venv) against the same redis-server."""
    import subprocess

    cmd = [python, "-m", "bench.feast_compare", "--ours-only", url, "--reps", str(args.reps),
           "--sizes", args.sizes, "--seed", str(seed)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    out: dict[str, Any] = json.loads(res.stdout)
    return out


class _Readers:
    def __init__(self, full: Any, narrow: Any) -> None:
        self.full, self.narrow = full, narrow


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=200, help="timed iterations per N and run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sizes", default="100,500,1000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, help="write feast-<date>.json and .md here")
    p.add_argument("--name", help="file stem (default feast-<UTC date>)")
    p.add_argument("--ours-python", help="also time our fetch alone in this interpreter (the "
                   "project's venv: the lock's redis-py; feast pins redis<8) after each run")
    p.add_argument("--ours-only", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="rewrite the Markdown and PNG of a report's JSON (no measurement)")
    args = p.parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        for path in write(saved, args.replot.parent, args.replot.stem):
            print(path)
        return 0
    if args.ours_only:
        from bench.featurestore_bench import N_ITEMS, N_USERS, bench_schema

        sizes = tuple(int(s) for s in args.sizes.split(","))
        gc.disable()
        got = asyncio.run(ours_only(args.ours_only, bench_schema(), args.reps, args.seed, sizes,
                                    N_USERS, N_ITEMS))
        import redis

        print(json.dumps({"redis_py": redis.__version__, "sizes": got}))
        return 0
    missing = feast_missing()
    if missing is not None:
        print(missing, file=sys.stderr)
        return 0
    import feast
    import redis

    from bench import feast_store
    from bench.featurestore_bench import N_ITEMS, N_USERS, bench_schema, bench_tables
    from bench.report import machine
    from launch.local_redis import RedisServer
    from service.featurestore.writer import load_tables

    sizes = tuple(int(s) for s in args.sizes.split(","))
    schema = bench_schema()
    users, items = bench_tables(schema, args.seed)
    started = datetime.now(UTC)
    m = machine()
    report: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d"), "started_at": started.isoformat(timespec="seconds"),
        "command": "python -m bench.feast_compare " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": f"{m['cpu']}, {m['cores']} cores", "python": platform.python_version(),
        "feast": feast.__version__, "redis_py": redis.__version__, "reps": args.reps,
        "records": {"users": N_USERS, "items": N_ITEMS}, "loadavg_start": os.getloadavg()[0],
    }
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="feast-repo-") as tmp:
        client = redis.Redis.from_url(server.url)
        t0 = time.perf_counter()
        load_tables(client, schema, users, items)
        report["ours_load_s"] = time.perf_counter() - t0
        client.close()
        host, port = server.url.split("//", 1)[1].split("/")[0].rsplit(":", 1)
        store, report["feast_load_s"] = feast_store.build_store(
            Path(tmp), host, int(port), schema, users, items)
        print(f"feast: apply {report['feast_load_s']['apply']:.1f} s, materialize "
              f"{report['feast_load_s']['materialize']:.1f} s", file=sys.stderr)
        readers = _Readers(feast_store.FeastReader(store, schema),
                           feast_store.FeastReader(store, schema, NARROW_ITEM_FEATURES))
        gc.disable()
        runs = []
        try:
            for i in range(args.runs):
                print(f"run {i + 1}/{args.runs}", file=sys.stderr)
                run = asyncio.run(one_run(server.url, readers, schema, args.reps,
                                          args.seed + 1 + i, sizes, N_USERS, N_ITEMS))
                if args.ours_python:
                    lock = run_ours_python(args.ours_python, server.url, args, args.seed + 1 + i)
                    report["ours_redis_py"] = lock["redis_py"]
                    for n, row in lock["sizes"].items():
                        run[n].update(row)
                runs.append(run)
        finally:
            gc.enable()
    report["runs"] = runs
    report["headline"] = headline(runs)
    report["loadavg_end"] = os.getloadavg()[0]
    publish(report, args.out_dir, args.name or f"feast-{report['date']}", markdown=markdown,
            write=write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
