"""What a shadow model costs /rank: shadow off against a shadow of the same size, same run.

    python -m bench.shadow_cost --candidates 500 --requests 300 --runs 3

Two instances of the real app (`create_app`, middleware, lifespan) in one process on one real
redis-server, both serving the default-size MMoE of `bench.measure` as version 1; one has an
experiments file with `[shadow] model_version = 2` (a copy of version 1: its own onnxruntime
session of the same size). They take turns in short blocks (A B B A ...) on the same requests,
one at a time, called at the ASGI level (bench.inprocess's `call`), with a short idle gap
after each response (a client's round trip). A block of the shadow app ends when its shadow
queue is empty, so the next block of the other app does not run beside leftover shadow work.
Per run and setting: p50 and p99 of the call time, process CPU per request (the shadow's
inference included); the shadow's scored and dropped counts.

Needs the `train` extra (bench.measure exports the default-size MMoE with torch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.inprocess import ab_runs, add_ab_arguments, latency_ms, run_on_default_model, timed_calls


async def block(app: Any, shadow: Any, bodies: list[bytes], gap_s: float) -> dict[str, Any]:
    c0 = time.process_time()
    times = await timed_calls(app, bodies, gap_s)
    if shadow is not None:
        while not shadow.queue.empty():  # the shadow's work for this block counts in its CPU
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)  # the job in hand
    return {"times": times, "cpu": time.process_time() - c0}


def merged(blocks: list[dict[str, Any]]) -> dict[str, float]:
    times = [t for b in blocks for t in b["times"]]
    return {**latency_ms(times), "cpu_ms": sum(b["cpu"] for b in blocks) / len(times) * 1e3}


def copy_version(repo: Path, name: str, src: int, dst: int) -> None:
    """Version `dst` as a copy of `src` (its manifest renumbered)."""
    d = repo / name / str(dst)
    shutil.copytree(repo / name / str(src), d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["version"] = dst
    (d / "manifest.json").write_text(json.dumps(manifest))


async def measure(args: argparse.Namespace, repo: Path, url: str) -> dict[str, Any]:
    from asgi_lifespan import LifespanManager
    from prometheus_client import REGISTRY

    from service.app import create_app
    from service.settings import Settings

    exp = repo / "experiments.toml"
    exp.write_text("[shadow]\nmodel_version = 2\n")
    base = {"model_repo": repo, "model_name": "mmoe", "redis_url": url, "model_version": 1,
            "request_timeout_s": 5.0, "max_candidates": max(args.candidates, 1000)}
    apps = {"off": create_app(Settings(**base)),
            "on": create_app(Settings(**base, experiments_file=exp))}
    out: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    async with LifespanManager(apps["off"]) as m_off, LifespanManager(apps["on"]) as m_on:
        managed = {"off": m_off.app, "on": m_on.app}
        shadows = {"off": None, "on": apps["on"].state.ranker.pipeline.shadow}
        assert shadows["on"] is not None
        async for got in ab_runs(args, lambda name, part: block(
                managed[name], shadows[name], part, args.gap_ms / 1e3)):
            for name in out:
                out[name].append(merged(got[name]))

    def runs(result: str) -> float:
        return REGISTRY.get_sample_value("ranker_shadow_runs_total", {"result": result}) or 0.0

    return {"runs": out, "scored": runs("scored"), "dropped": runs("dropped"),
            "failed": runs("failed"),
            "tau_count": REGISTRY.get_sample_value("ranker_shadow_kendall_tau_count") or 0.0}


def summarise(res: dict[str, Any]) -> list[str]:
    on, off = res["runs"]["on"], res["runs"]["off"]
    lines = ["| run | p50 off (ms) | p50 on (ms) | p50 ratio | p99 off / on (ms) | "
             "CPU/req off / on (ms) |", "|---|---|---|---|---|---|"]
    ratios = []
    for i, (a, b) in enumerate(zip(off, on, strict=True)):
        ratios.append(b["p50_ms"] / a["p50_ms"])
        lines.append(f"| {i + 1} | {a['p50_ms']:.3f} | {b['p50_ms']:.3f} | {ratios[-1]:.3f} | "
                     f"{a['p99_ms']:.2f} / {b['p99_ms']:.2f} | "
                     f"{a['cpu_ms']:.3f} / {b['cpu_ms']:.3f} |")
    lines += ["", f"p50 ratio on/off: median {statistics.median(ratios):.3f}, range "
              f"{min(ratios):.3f}-{max(ratios):.3f}; shadow scored {res['scored']:.0f}, "
              f"dropped {res['dropped']:.0f}, failed {res['failed']:.0f}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shadow_cost")
    add_ab_arguments(p, requests=300, runs=3)
    args = p.parse_args(argv)

    res = run_on_default_model(args, measure, lambda repo, vdir: copy_version(
        repo, vdir.parent.name, int(vdir.name), 2))
    print("\n".join(summarise(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
