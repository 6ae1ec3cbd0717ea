"""Turn a benchmark's raw results into ratios against the targets, a Markdown report and a plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

STAGE_ORDER = ("validate", "fetch", "decode", "inference", "combine", "rerank", "serialize")


def machine() -> dict[str, Any]:
    """CPU, cores and the versions of everything on the measured path."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for pkg in ("onnxruntime", "torch", "fastapi", "uvicorn", "redis", "hiredis", "numpy",
                "orjson", "uvloop", "httptools"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    versions["redis-server"] = _redis_server_version()
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "loadavg_1m_at_end": os.getloadavg()[0], "versions": versions}


def _redis_server_version() -> str:
    from launch.local_redis import find_binary

    try:
        out = subprocess.run([find_binary(), "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), out.strip())


def _runs(results: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in results.get("runs", [])
            if all(r.get(k) == v for k, v in match.items())]


def _c1(results: dict[str, Any], system: str, n: int) -> dict[str, Any] | None:
    rows = _runs(results, system=system, workers=1, n=n, kind="sweep", concurrency=1)
    return rows[0] if rows else None


def _cpu_capacity(results: dict[str, Any], n: int, cores: int,
                  inference_floor_rps: float) -> dict[str, float]:
    """Throughput on dedicated cores estimated from CPU time per request (server + Redis).

    Taken at each sweep's best point. CPU time per request hardly depends on what else runs
    on the machine, unlike wall-clock throughput on a shared one.
    """
    out: dict[str, float] = {}
    for system in ("service", "naive"):
        for w in results["plan"]["workers"]:
            rows = [r for r in _runs(results, system=system, workers=w, n=n, kind="sweep")
                    if r.get("server_cpu_ms_per_req") and r["ok"]]
            if not rows:
                continue
            best = max(rows, key=lambda r: r["rps"])
            cpu = best["server_cpu_ms_per_req"] + best["redis_cpu_ms_per_req"]
            out[f"cpu_ms_per_req_{system}-w{w}"] = cpu
            out[f"capacity_cpu_rps_{system}-w{w}"] = cores * 1e3 / cpu
    svc = [v for k, v in out.items() if k.startswith("capacity_cpu_rps_service")]
    naive = [v for k, v in out.items() if k.startswith("capacity_cpu_rps_naive")]
    if svc:
        out["saturation_vs_inference_floor_cpu"] = max(svc) / inference_floor_rps
    if svc and naive:
        out["throughput_ratio_cpu"] = max(svc) / max(naive)
    return out


def summarise(results: dict[str, Any], targets: dict[str, float]) -> dict[str, Any]:
    """Overhead per N, ratios to the naive app, saturation vs the inference floor, pass/fail."""
    plan = results["plan"]
    cores = os.cpu_count() or 1
    per_n: dict[str, Any] = {}
    for n in plan["ns"]:
        fl = results["floors"][str(n)]
        noop = results["floors_http"][str(n)]
        floor_sum = fl["mget"]["p50_ms"] + fl["inference"]["p50_ms"] + noop["p50_ms"]
        svc, naive = _c1(results, "service", n), _c1(results, "naive", n)
        row: dict[str, Any] = {
            "mget_p50_ms": fl["mget"]["p50_ms"], "inference_p50_ms": fl["inference"]["p50_ms"],
            "noop_http_p50_ms": noop["p50_ms"], "floor_sum_ms": floor_sum,
        }
        if svc:
            row |= {"service_p50_ms": svc["p50_ms"], "service_p99_ms": svc["p99_ms"],
                    "overhead_ratio": svc["p50_ms"] / floor_sum}
        if naive:
            row |= {"naive_p50_ms": naive["p50_ms"], "naive_p99_ms": naive["p99_ms"]}
        sat = results.get("saturation_rps", {})
        for key, by_n in sat.items():
            if str(n) in by_n:
                row[f"saturation_rps_{key}"] = by_n[str(n)]
        # inference alone could do cores / t_inference requests per second on this machine
        row["inference_floor_rps"] = cores / (fl["inference"]["p50_ms"] / 1e3)
        svc_sat = [v for k, v in row.items() if k.startswith("saturation_rps_service")]
        naive_sat = [v for k, v in row.items() if k.startswith("saturation_rps_naive")]
        if svc_sat:
            row["saturation_vs_inference_floor"] = max(svc_sat) / row["inference_floor_rps"]
        if svc_sat and naive_sat:
            row["throughput_ratio_best"] = max(svc_sat) / max(naive_sat)
        w1s, w1n = row.get("saturation_rps_service-w1"), row.get("saturation_rps_naive-w1")
        if w1s and w1n:
            row["throughput_ratio_w1"] = w1s / w1n
        row.update(_cpu_capacity(results, n, cores, row["inference_floor_rps"]))
        per_n[str(n)] = row

    key = per_n[str(plan["key_n"])]
    same = {r["system"]: r for r in _runs(results, kind="same_load")}
    out: dict[str, Any] = {"per_n": per_n, "key_n": plan["key_n"], "targets": []}
    if "service" in same and "naive" in same:
        out["same_load"] = {
            "offered_rps": same["service"]["offered_rps"],
            "service_p99_ms": same["service"]["p99_ms"], "naive_p99_ms": same["naive"]["p99_ms"],
            "p99_ratio": same["service"]["p99_ms"] / same["naive"]["p99_ms"],
        }

    def target(name: str, value: float | None, limit: float, at_most: bool) -> None:
        ok = None if value is None else (value <= limit if at_most else value >= limit)
        out["targets"].append({"name": name, "value": value, "limit": limit,
                               "at_most": at_most, "pass": ok})

    kn = plan["key_n"]
    target(f"overhead ratio at N={kn}, c=1 (service p50 / sum of floors)",
           key.get("overhead_ratio"), targets["overhead_ratio_max"], True)
    target(f"throughput vs naive at N={kn} (best workers each)",
           key.get("throughput_ratio_best"), targets["throughput_ratio_min"], False)
    target(f"p99 vs naive at N={kn}, same offered load",
           out.get("same_load", {}).get("p99_ratio"), targets["p99_ratio_max"], True)
    target(f"saturation vs inference floor at N={kn}",
           key.get("saturation_vs_inference_floor"),
           targets["saturation_vs_inference_floor_min"], False)
    target(f"throughput vs naive at N={kn}, CPU-time estimate (dedicated cores)",
           key.get("throughput_ratio_cpu"), targets["throughput_ratio_min"], False)
    target(f"saturation vs inference floor at N={kn}, CPU-time estimate (dedicated cores)",
           key.get("saturation_vs_inference_floor_cpu"),
           targets["saturation_vs_inference_floor_min"], False)
    return out


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def markdown(results: dict[str, Any]) -> str:
    """The human-readable report: machine, command, every figure, targets."""
    meta, summ, plan = results["meta"], results["summary"], results["plan"]
    lines = [f"# Benchmark {meta['started_at']}", ""]
    lines += [f"Command: `{meta['command']}` (wall time {results['wall_s']:.0f} s)", "",
              f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['platform']}; 1-minute load "
              f"average {meta.get('loadavg_1m_at_start', float('nan')):.1f} at the start, "
              f"{meta['loadavg_1m_at_end']:.1f} at the end (other processes share the cores).",
              "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), ""]
    m = results["model"]
    lines += [f"Model: {m['name']} v{m['version']} ({m['model_type']}, tasks "
              f"{', '.join(m['tasks'])}) from `{m['dir']}`. Data: {results['data']['users']} "
              f"users, {results['data']['items']} items ({results['data']['source']}"
              + (f"; {results['data']['items_generated']} items generated from the schema to "
                 "reach the largest N" if results["data"].get("items_generated") else "")
              + ").", "",
              f"Each point: {plan['duration_s']} s measured after {plan['warmup_s']} s warm-up; "
              "load generator = bench/loadgen.py (asyncio + uvloop, raw HTTP/1.1 keep-alive, "
              "own process). The load generator, Redis and the server share the same cores.", ""]
    ceil = results.get("loadgen_ceiling")
    max_rps = max((r["rps"] for r in results["runs"] if r["system"] != "noop"), default=0.0)
    if ceil:
        lines += [f"Load generator ceiling: {ceil['rps']:,.0f} req/s against the noop app at "
                  f"concurrency {ceil['concurrency']} (N={ceil['n']} bodies), using "
                  f"{ceil['client_cpu_util']:.0%} of a core itself; the fastest system below "
                  f"reached {max_rps / ceil['rps']:.0%} of that.", ""]
    lines += ["## Targets", "", "| target | value | limit | pass |", "|---|---|---|---|"]
    for t in summ["targets"]:
        op = "≤" if t["at_most"] else "≥"
        lines.append(f"| {t['name']} | {_f(t['value'])} | {op} {t['limit']} | "
                     f"{ {True: 'PASS', False: 'FAIL', None: 'not measured'}[t['pass']]} |")
    lines += ["", "## Latency at concurrency 1 and the floors (p50, ms)", "",
              "| N | service p50 | service p99 | MGET floor | inference floor | noop HTTP floor "
              "| sum of floors | overhead ratio | naive p50 | naive p99 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in summ["per_n"].items():
        lines.append(
            f"| {n} | {_f(r.get('service_p50_ms'))} | {_f(r.get('service_p99_ms'))} | "
            f"{_f(r['mget_p50_ms'], 3)} | {_f(r['inference_p50_ms'], 3)} | "
            f"{_f(r['noop_http_p50_ms'], 3)} | {_f(r['floor_sum_ms'])} | "
            f"{_f(r.get('overhead_ratio'))} | {_f(r.get('naive_p50_ms'))} | "
            f"{_f(r.get('naive_p99_ms'))} |")
    lines += ["", "## Saturation (closed loop, best req/s over the concurrency sweep)", ""]
    keys = sorted({k for r in summ["per_n"].values() for k in r if k.startswith("saturation_rps")})
    lines += ["| N | " + " | ".join(k.removeprefix("saturation_rps_") for k in keys)
              + " | inference floor (cores / t_inf) | service / floor | service / naive |",
              "|---|" + "---|" * (len(keys) + 3)]
    for n, r in summ["per_n"].items():
        lines.append(f"| {n} | " + " | ".join(_f(r.get(k), 0) for k in keys)
                     + f" | {_f(r['inference_floor_rps'], 0)} | "
                     f"{_f(r.get('saturation_vs_inference_floor'))} | "
                     f"{_f(r.get('throughput_ratio_best'))} |")
    ckeys = sorted({k for r in summ["per_n"].values() for k in r
                    if k.startswith("cpu_ms_per_req_")})
    if ckeys:
        lines += ["", "CPU time per request at each sweep's best point (server processes + "
                  "redis-server, ms) and the throughput it allows on the machine's cores "
                  "(cores / CPU per request): an estimate that other load on the machine "
                  "does not distort.", "",
                  "| N | " + " | ".join(k.removeprefix("cpu_ms_per_req_") + " CPU ms"
                                      for k in ckeys)
                  + " | " + " | ".join(k.removeprefix("cpu_ms_per_req_") + " req/s"
                                       for k in ckeys)
                  + " | service / floor | service / naive |",
                  "|---|" + "---|" * (2 * len(ckeys) + 2)]
        for n, r in summ["per_n"].items():
            caps = [r.get("capacity_cpu_rps_" + k.removeprefix("cpu_ms_per_req_")) for k in ckeys]
            lines.append(f"| {n} | " + " | ".join(_f(r.get(k), 3) for k in ckeys) + " | "
                         + " | ".join(_f(c, 0) for c in caps)
                         + f" | {_f(r.get('saturation_vs_inference_floor_cpu'))} | "
                         f"{_f(r.get('throughput_ratio_cpu'))} |")
    if "same_load" in summ:
        s = summ["same_load"]
        lines += ["", f"Same offered load (open loop, {s['offered_rps']:.0f} req/s = 80 % of the "
                  f"naive app's saturation, N={summ['key_n']}): service p99 "
                  f"{s['service_p99_ms']:.2f} ms, naive p99 {s['naive_p99_ms']:.2f} ms, "
                  f"ratio {s['p99_ratio']:.3f}."]
    lines += ["", "## All load points", "",
              "| system | workers | N | kind | mode | c / rate | req/s | cand/s | p50 | p95 | p99 "
              "| errors | server CPU ms/req | redis CPU ms/req | client CPU | load avg |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        load = r["concurrency"] if r["mode"] == "closed" else f"{r['offered_rps']:.0f}/s"
        kind = r["kind"] + "".join(f" {k}={r[k]}" for k in ("top_k", "intra_op") if k in r)
        lines.append(
            f"| {r['system']} | {r['workers']} | {r['n']} | {kind} | {r['mode']} | {load} | "
            f"{_f(r['rps'], 1)} | {_f(r['candidates_per_s'], 0)} | {_f(r.get('p50_ms'))} | "
            f"{_f(r.get('p95_ms'))} | {_f(r.get('p99_ms'))} | {r['errors'] or 0} | "
            f"{_f(r.get('server_cpu_ms_per_req'), 3)} | {_f(r.get('redis_cpu_ms_per_req'), 3)} | "
            f"{r['client_cpu_util']:.0%} | {_f(r.get('loadavg_1m'), 1)} |")
    lines += _stage_lines(results) + _knob_lines(results)
    return "\n".join(lines) + "\n"


def _stage_lines(results: dict[str, Any]) -> list[str]:
    kn = str(results["plan"]["key_n"])
    stages = results.get("stages_metrics_ms", {})
    alone = results.get("stages_in_process_ms", {})
    fl = results["floors"][kn]
    lines = ["", f"## Stage breakdown of one request (N={kn}, concurrency 1)", "",
             "In the service: mean ms per request from its `ranker_stage_duration_seconds` "
             "histograms (sum/count scraped from /metrics before and after the concurrency-1 "
             "run; `fetch` includes the record decode, `decode` is the context encoding). "
             "Alone: the same functions timed in-process on the same requests (p50; `fetch` = "
             "the service's reader, redis.asyncio MGET + decode; `parse` = JSON body -> "
             "RankRequest, which FastAPI does before the handler and no histogram covers). "
             "Floor: the raw MGET / onnxruntime run.", "",
             "| stage | in the service (mean ms) | alone (p50 ms) | floor (p50 ms) |",
             "|---|---|---|---|"]
    rows = [("parse", None, alone.get("parse")), ("validate", stages.get("validate"), None),
            ("fetch", stages.get("fetch"), alone.get("fetch")),
            ("decode", stages.get("decode"), alone.get("decode")),
            ("inference", stages.get("inference"), alone.get("inference")),
            ("combine", stages.get("combine"), alone.get("combine")),
            ("serialize", stages.get("serialize"), alone.get("serialize"))]
    floor = {"fetch": fl["mget"]["p50_ms"], "inference": fl["inference"]["p50_ms"]}
    for name, in_svc, al in rows:
        lines.append(f"| {name} | {_f(in_svc, 3)} | {_f(al['p50_ms'], 3) if al else '–'} | "
                     f"{_f(floor.get(name), 3)} |")
    return lines


def _knob_lines(results: dict[str, Any]) -> list[str]:
    kn = str(results["plan"]["key_n"])
    lines = ["", f"## Knobs (N={kn})", "", "onnxruntime session, one run (p50 ms):", "",
             "| intra-op threads | graph optimisation | p50 | p99 |", "|---|---|---|---|"]
    lines += [f"| {r['intra_op']} | {r['opt']} | {_f(r['p50_ms'], 3)} | {_f(r['p99_ms'], 3)} |"
              for r in results["ort_knobs"]]
    lines += ["", "User features once per request (U=1, broadcast in the graph) vs tiled per "
              "candidate (U=N), same graph:", "",
              "| N | U=1 p50 | U=N p50 | speed-up | max abs diff |", "|---|---|---|---|---|"]
    for n, u in results["user_once"].items():
        lines.append(f"| {n} | {_f(u['user_once']['p50_ms'], 3)} | {_f(u['tiled']['p50_ms'], 3)}"
                     f" | {u['tiled']['p50_ms'] / u['user_once']['p50_ms']:.2f}x | "
                     f"{u['max_abs_diff']:.2e} |")
    e = results["eager_vs_onnx"]
    lines += ["", f"Naive app's eager PyTorch model vs the served ONNX graph: max abs diff "
              f"{e['golden_max_abs_diff']:.2e} on the golden sample, "
              f"{e['batches_max_abs_diff']:.2e} on real batches (same weights).", "",
              "Response serialisation (p50 ms):", "",
              "| items | bytes | orjson | json.dumps | FastAPI default (jsonable_encoder + json) |",
              "|---|---|---|---|---|"]
    for k, s in results["serialisation"].items():
        lines.append(f"| {k} | {s['bytes']} | {_f(s['orjson']['p50_ms'], 3)} | "
                     f"{_f(s['json']['p50_ms'], 3)} | {_f(s['fastapi_default']['p50_ms'], 3)} |")
    return lines + _int8_lines(results)


def _int8_lines(results: dict[str, Any]) -> list[str]:
    q = results.get("int8")
    if not q:
        return []
    inf = q["inference"]
    lines = ["", "int8 weights (onnxruntime dynamic quantisation) vs float32:", "",
             "| graph | file bytes | inference p50 ms | inference p99 ms |", "|---|---|---|---|"]
    lines += [f"| {k} | {q['bytes'][k]:,} | {_f(inf[k]['p50_ms'], 3)} | "
              f"{_f(inf[k]['p99_ms'], 3)} |" for k in ("fp32", "int8")]
    lines += ["", f"Max abs score difference on the bench batches: {q['max_abs_diff']:.2e}."]
    auc = q.get("auc")
    if auc:
        tasks = list(auc["fp32"])
        same = auc.get("same_data_as_training")
        note = "" if same else (" — the data directory no longer holds the data the model was "
                                "trained on, so absolute AUCs are not the model's; the change is "
                                "still a like-for-like comparison")
        lines += ["", f"Test-split AUC ({auc['rows']:,} rows){note}:", "",
                  "| graph | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        lines += [f"| {k} | " + " | ".join(f"{auc[k][t]:.4f}" for t in tasks) + " |"
                  for k in ("fp32", "int8")]
        lines.append("| change | " + " | ".join(f"{auc['int8'][t] - auc['fp32'][t]:+.4f}"
                                              for t in tasks) + " |")
    elif "auc_error" in q:
        lines += ["", f"AUC not measured: {q['auc_error']}"]
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """p99 latency against throughput, one panel per N, service vs naive (closed-loop sweeps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = results["plan"]["ns"]
    fig, axes = plt.subplots(1, len(ns), figsize=(5 * len(ns), 4), squeeze=False)
    styles = {"service": "-o", "naive": "--s"}
    colors = {("service", 1): "tab:blue", ("service", 2): "tab:cyan",
              ("naive", 1): "tab:red", ("naive", 2): "tab:orange"}
    for ax, n in zip(axes[0], ns, strict=True):
        for system in ("service", "naive"):
            for w in results["plan"]["workers"]:
                pts = [(r["rps"], r["p99_ms"]) for r in
                       _runs(results, system=system, workers=w, n=n, kind="sweep") if "p99_ms" in r]
                if pts:
                    ax.plot(*zip(*pts, strict=True), styles[system], label=f"{system} {w}w",
                            color=colors.get((system, w)))
            for kind in ("same_load", "high_load"):
                for r in _runs(results, system=system, n=n, kind=kind):
                    if "p99_ms" in r:
                        ax.plot(r["rps"], r["p99_ms"], "*" if kind == "same_load" else "P",
                                markersize=12, color="tab:green" if system == "service" else "k",
                                label=f"{system} open loop {r['offered_rps']:.0f}/s")
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_yscale("log")
        ax.set_title(f"N = {n} candidates")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"p99 latency vs throughput ({results['meta']['started_at']})")
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Every bench figure: tight layout, 110 dpi, closed after (pyplot keeps figures otherwise)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_files(
    results: dict[str, Any], out_dir: Path, stem: str, *,
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], bool | None],
    png: str = "{stem}.png",
    indent: int = 1,
) -> list[Path]:
    """A bench's result as <stem>.json, <stem>.md and a figure (named by `png`) in out_dir; a
    `plot` that returns False drew nothing (no matplotlib where it ran) and its path is left out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / png.format(stem=stem)]
    paths[0].write_text(json.dumps(results, indent=indent, default=str) + "\n")
    paths[1].write_text(markdown(results))
    if plot(results, paths[2]) is False:
        paths.pop()
    return paths


def publish(results: dict[str, Any], out_dir: Path | None, stem: str, *,
            markdown: Callable[[dict[str, Any]], str],
            write: Callable[[dict[str, Any], Path, str], list[Path]]) -> None:
    """A bench run's end: its Markdown on stdout and, with an `out_dir`, its files written
    there as <stem>.* (their paths on stderr)."""
    print(markdown(results))
    if out_dir is not None:
        for path in write(results, out_dir, stem):
            print(path, file=sys.stderr)


def write(results: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """<stem>.json, <stem>.md and <stem>-p99.png in out_dir."""
    return write_files(results, out_dir, stem, markdown=markdown, plot=plot,
                       png="{stem}-p99.png")
