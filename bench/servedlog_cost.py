"""What the served log costs /rank: logging off against 100 % sampling, in the same run.

    python -m bench.servedlog_cost --candidates 500 --requests 400 --runs 6

Two instances of the real app (`create_app`, its middleware stack and lifespan) live in one
process on one real redis-server: one with `log_sample_rate=0`, one with `log_sample_rate=1`.
They take turns in short blocks (A B B A A B ..., `--block` requests each) on the same request
sequence, one request at a time, called at the ASGI level (no HTTP client in the measured
process, so its CPU is the app's). Per run and setting:

- p50 of the call time (request in, response body out);
- process CPU per request (`time.process_time`), including the writer task's work for the
  records: a block of the logging app ends when the writer's queue is drained;
- redis-server CPU per request (`INFO cpu` before/after): the XADDs' cost on the server.

Needs the `train` extra (bench.measure exports the default-size MMoE with torch).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.inprocess import (
    add_ab_arguments,
    alternating,
    call,
    latency_ms,
    request_bodies,
    run_on_default_model,
    timed_calls,
)


def redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def block(app: Any, log: Any, bodies: list[bytes], rclient: Any,
                gap_s: float) -> dict[str, Any]:
    """One setting on a short run of requests: call times, and CPU including the writer's."""
    r0, c0 = redis_cpu(rclient), time.process_time()
    times = await timed_calls(app, bodies, gap_s)
    await log.queue.join()  # the writer's work for this block counts in its CPU
    return {"times": times, "cpu": time.process_time() - c0, "redis": redis_cpu(rclient) - r0}


def merged(blocks: list[dict[str, Any]]) -> dict[str, float]:
    times = [t for b in blocks for t in b["times"]]
    n = len(times)
    return {**latency_ms(times), "cpu_ms": sum(b["cpu"] for b in blocks) / n * 1e3,
            "redis_cpu_ms": sum(b["redis"] for b in blocks) / n * 1e3}


async def measure(args: argparse.Namespace, repo: Path, url: str) -> dict[str, Any]:
    import redis
    from asgi_lifespan import LifespanManager

    from service.app import create_app
    from service.settings import Settings

    base = {"model_repo": repo, "model_name": "mmoe", "redis_url": url,
            "request_timeout_s": 5.0, "max_candidates": max(args.candidates, 1000),
            "log_stream_maxlen": args.stream_maxlen}
    apps = {"off": create_app(Settings(**base, log_sample_rate=0.0)),
            "on": create_app(Settings(**base, log_sample_rate=1.0))}
    rclient = redis.Redis.from_url(url)
    rng = np.random.default_rng(1)
    top_k = {"top_k": args.top_k} if args.top_k else {}
    out: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    async with LifespanManager(apps["off"]) as m_off, LifespanManager(apps["on"]) as m_on:
        managed = {"off": m_off.app, "on": m_on.app}
        logs = {k: a.state.ranker.pipeline.log for k, a in apps.items()}
        for run in range(args.warmup_runs + args.runs):
            bodies = request_bodies(rng, args.requests, args.items, args.candidates, **top_k)
            got = await alternating(bodies, args.block, lambda name, part: block(
                managed[name], logs[name], part, rclient, args.gap_ms / 1e3))
            if run >= args.warmup_runs:
                for name in out:
                    out[name].append(merged(got[name]))
    rclient.close()
    # the writer's work per record, alone: build + encode one of the run's records, and the
    # packed XADD of a batch of 16 (CPU of this process; the same record each time)
    from ranker.servedlog import encode_served
    from service.servedlog.writer import Served, pack_xadd, served_record, xadd_packed

    captured: list[Served] = []
    async with LifespanManager(apps["on"]) as again:
        log_on = apps["on"].state.ranker.pipeline.log

        def capture(stream: str, payload: Served, n: int) -> bool:
            captured.append(payload)
            return True

        log_on._offer = capture
        await call(again.app, bodies[0])
        ref = captured[0]
        c0 = time.process_time()
        for _ in range(500):
            fields = encode_served(served_record(ref))
        encode_ms = (time.process_time() - c0) / 500 * 1e3
        c0 = time.process_time()
        for _ in range(50):
            await xadd_packed(log_on.client, [pack_xadd("bench:xadd", 100, fields)] * 16)
        xadd_ms = (time.process_time() - c0) / (50 * 16) * 1e3
    micro = {"encode_ms": encode_ms, "xadd_ms": xadd_ms,
             "record_bytes": sum(len(v) for v in fields.values())}
    from prometheus_client import REGISTRY

    written = REGISTRY.get_sample_value("ranker_served_log_written_total", {"stream": "served"})
    dropped = sum(s.value for m in REGISTRY.collect() if m.name == "ranker_served_log_dropped"
                  for s in m.samples if s.name.endswith("_total"))
    return {"runs": out, "written": written, "dropped": dropped, "micro": micro}


def summarise(res: dict[str, Any]) -> list[str]:
    on, off = res["runs"]["on"], res["runs"]["off"]
    lines = ["| run | p50 off (ms) | p50 on (ms) | p50 ratio | CPU/req off (ms) | "
             "CPU/req on (ms) | CPU ratio | redis CPU/req off / on (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    p50r, cpur = [], []
    for i, (a, b) in enumerate(zip(off, on, strict=True)):
        p50r.append(b["p50_ms"] / a["p50_ms"])
        cpur.append(b["cpu_ms"] / a["cpu_ms"])
        lines.append(f"| {i + 1} | {a['p50_ms']:.3f} | {b['p50_ms']:.3f} | {p50r[-1]:.3f} | "
                     f"{a['cpu_ms']:.3f} | {b['cpu_ms']:.3f} | {cpur[-1]:.3f} | "
                     f"{a['redis_cpu_ms']:.3f} / {b['redis_cpu_ms']:.3f} |")
    lines.append("")
    lines.append(f"p50 ratio on/off: median {statistics.median(p50r):.3f}, "
                 f"range {min(p50r):.3f}-{max(p50r):.3f}; CPU ratio: median "
                 f"{statistics.median(cpur):.3f}, range {min(cpur):.3f}-{max(cpur):.3f}; "
                 f"records written {res['written']:.0f}, dropped {res['dropped']:.0f}")
    m = res["micro"]
    cpu_off = statistics.median(r["cpu_ms"] for r in off)
    lines.append(f"writer alone, per record of {m['record_bytes'] / 1e3:.1f} kB: build + encode "
                 f"{m['encode_ms'] * 1e3:.0f} us, packed XADD (batches of 16) "
                 f"{m['xadd_ms'] * 1e3:.0f} us CPU = "
                 f"{(m['encode_ms'] + m['xadd_ms']) / cpu_off:.1%} of a request's CPU with "
                 "logging off (median)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.servedlog_cost")
    add_ab_arguments(p, requests=400, runs=6)
    p.add_argument("--top-k", type=int, default=0, help="0 = every candidate is returned")
    p.add_argument("--stream-maxlen", type=int, default=2000,
                   help="log_stream_maxlen (records of 500 items are ~25 kB)")
    args = p.parse_args(argv)

    res = run_on_default_model(args, measure)
    print("\n".join(summarise(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
