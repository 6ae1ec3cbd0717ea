"""Training throughput, one process vs DistributedDataParallel on two: samples/s, default world.

    python -m bench.ddp_bench [--data data/synthetic] [--repeats 3] [--steps 200]

The default world is `ranker data`'s (1000 users, 500 items, 350 000 training impressions;
generated into --data when it has no dataset.json), the default model and `TrainConfig`'s
global batch (1024). Each run is a fresh process (or a `torch.distributed.run` of two, gloo on
loopback) that trains `--warmup` steps, then times `--steps` steps of the real loop
(`training.train.train_one_epoch`, the ranks meeting at a barrier before and after). Three
configurations, interleaved in every repeat so load drift hits them alike:

    1 process, 1 thread      the default (`run_training` sets one intra-op thread)
    1 process, 2 threads     the same cores given to one process instead
    2 processes x 1 thread   torchrun --nproc-per-node 2, per-rank batch 512

Results go to bench/results/ddp-<date>.json and .md: samples/s per run, the 2-process/1-process
ratios per repeat with their median and range, and the load average around every run (the
machine is shared; read the ratios with it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.procs import Processes
from launch.procs import HOST, free_port

RESULTS = Path(__file__).parent / "results"
CONFIGS = {  # name -> (processes, threads per process)
    "1 process, 1 thread": (1, 1),
    "1 process, 2 threads": (1, 2),
    "2 processes x 1 thread": (2, 1),
}
RUN_TIMEOUT_S = 600.0


def worker(data: Path, threads: int, steps: int, warmup: int, result: Path) -> None:
    """One timed run on this process's rank (or alone); rank 0 writes `result`."""
    import numpy as np
    import torch

    from training.data import build_schema, encode_split, load_raw
    from training.distributed import process_group, wrap
    from training.model import ModelConfig, MultiTaskModel, inputs_from_schema
    from training.spec import load_spec
    from training.train import TrainConfig, train_one_epoch

    torch.set_num_threads(threads)
    spec = load_spec("synthetic")
    raw = load_raw(spec, data)
    schema = build_schema(spec, raw)
    train = encode_split(spec, schema, raw, "train")
    cfg = TrainConfig(progress=False)
    b = cfg.batch_size
    if (warmup + steps) * b > len(train):
        raise SystemExit(f"{warmup + steps} steps of {b} need more than {len(train)} rows")
    warm, timed = train.take(np.arange(warmup * b)), train.take(np.arange(steps * b) + warmup * b)
    with process_group() as dist:
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = MultiTaskModel(ModelConfig(inputs=inputs_from_schema(schema),
                                           tasks=spec.task_names))
        net = wrap(model, dist)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        weights = torch.ones(len(spec.task_names))
        train_one_epoch(net, warm, opt, weights, cfg, gen, 0, dist)
        dist.all_sum([0.0])  # a barrier through the same collective the loop uses
        t0 = time.perf_counter()
        train_one_epoch(net, timed, opt, weights, cfg, gen, 1, dist)
        dist.all_sum([0.0])
        seconds = time.perf_counter() - t0
        allreduce_ms = allreduce_latency_ms(model, dist) if dist.enabled else None
        if dist.is_main:
            result.write_text(json.dumps({
                "world_size": dist.world_size, "threads": threads, "steps": steps,
                "batch_size": b, "samples": len(timed), "seconds": seconds,
                "samples_per_s": len(timed) / seconds, "allreduce_ms": allreduce_ms,
                "params": sum(p.numel() for p in model.parameters()),
            }))


def allreduce_latency_ms(model: Any, dist: Any, n: int = 50) -> float:
    """Median wall time of one all_reduce of a buffer the size of all the gradients: what DDP
    adds to a step at least (it overlaps it with the backward pass where it can)."""
    import torch
    import torch.distributed as tdist

    buf = torch.zeros(sum(p.numel() for p in model.parameters()))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        tdist.all_reduce(buf)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def proc_name(name: str) -> str:
    return name.replace(" ", "_").replace(",", "")


def run_one(procs: Processes, name: str, nproc: int, threads: int, args: argparse.Namespace,
            tmp: Path) -> dict[str, Any]:
    result = tmp / f"{proc_name(name)}.json"
    result.unlink(missing_ok=True)
    target = ["-m", "bench.ddp_bench", "worker", "--data", str(args.data), "--threads",
              str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--result", str(result)]
    if nproc == 1:
        cmd = [sys.executable, *target]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-addr={HOST}", f"--master-port={free_port()}", *target]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    load_before = os.getloadavg()[0]
    proc = procs.start(proc_name(name), cmd, env=env)
    code = proc.wait(timeout=RUN_TIMEOUT_S)
    if code != 0:
        raise RuntimeError(f"{name}: exit {code}\n{procs.log_tail(proc_name(name), 40)}")
    out: dict[str, Any] = json.loads(result.read_text())
    out["load_1m"] = [load_before, os.getloadavg()[0]]
    return out


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rate = {k: [r["samples_per_s"] for r in v] for k, v in runs.items()}
    two = rate["2 processes x 1 thread"]
    ratios = {
        "2p/1p1t": [a / b for a, b in zip(two, rate["1 process, 1 thread"], strict=True)],
        "2p/1p2t": [a / b for a, b in zip(two, rate["1 process, 2 threads"], strict=True)],
    }
    loads = [x for v in runs.values() for r in v for x in r["load_1m"]]
    allreduce = [r["allreduce_ms"] for r in runs["2 processes x 1 thread"]]
    return {
        "params": runs["2 processes x 1 thread"][0]["params"],
        "allreduce_ms": {"median": statistics.median(allreduce), "min": min(allreduce),
                         "max": max(allreduce)},
        "samples_per_s": {k: {"median": statistics.median(v), "min": min(v), "max": max(v),
                              "runs": v} for k, v in rate.items()},
        "ratios": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                   for k, v in ratios.items()},
        "load_1m": {"min": min(loads), "max": max(loads)},
    }


def markdown(meta: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [
        f"# DDP training throughput, {meta['date']}",
        "",
        f"`{meta['command']}` on {meta['cpus']} CPUs, torch {meta['torch']}, gloo on loopback.",
        f"Data: {meta['data']} ({meta['train_rows']} training rows; the default world has "
        "350000), default model, global batch "
        f"{meta['batch_size']}; {meta['steps']} timed steps after {meta['warmup']} warm-up, "
        f"{meta['repeats']} repeats, configurations interleaved.",
        "",
        "| configuration | samples/s (median) | min | max |",
        "|---|---|---|---|",
    ]
    for k, v in summary["samples_per_s"].items():
        lines.append(f"| {k} | {v['median']:.0f} | {v['min']:.0f} | {v['max']:.0f} |")
    lines += ["", "| ratio (per repeat) | median | min | max |", "|---|---|---|---|"]
    for k, v in summary["ratios"].items():
        lines.append(f"| {k} | {v['median']:.2f} | {v['min']:.2f} | {v['max']:.2f} |")
    load, ar = summary["load_1m"], summary["allreduce_ms"]
    lines += ["", f"One gloo all_reduce of the {summary['params']} gradients (float32) between the "
              f"2 ranks: median {ar['median']:.2f} ms (runs: {ar['min']:.2f} to {ar['max']:.2f})."]
    lines += ["", f"1-minute load average before/after the runs: {load['min']:.1f} to "
              f"{load['max']:.1f} (the machine is shared).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", nargs="?", choices=["bench", "worker"], default="bench")
    p.add_argument("--data", type=Path, default=Path("data/synthetic"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="worker: intra-op threads per rank")
    p.add_argument("--result", type=Path, help="worker: where rank 0 writes its numbers")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if a.mode == "worker":
        assert a.result is not None
        worker(a.data, a.threads, a.steps, a.warmup, a.result)
        return 0
    from training.synthetic import SyntheticConfig, read_dataset_info, write_dataset

    if read_dataset_info(a.data) is None:
        print(f"generating the default world into {a.data}", flush=True)
        write_dataset(SyntheticConfig(), a.data)
    info = read_dataset_info(a.data)
    assert info is not None
    import torch

    from training.train import TrainConfig

    date = datetime.now(UTC).strftime("%Y-%m-%d")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in CONFIGS}
    # the workers' logs and result files; removed afterwards, also on failure or Ctrl-C
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp, Processes(Path(tmp)) as procs:
        for rep in range(a.repeats):
            for name, (nproc, threads) in CONFIGS.items():
                r = run_one(procs, name, nproc, threads, a, Path(tmp))
                runs[name].append(r)
                print(f"repeat {rep + 1}: {name}: {r['samples_per_s']:.0f} samples/s "
                      f"(load {r['load_1m'][0]:.1f})", flush=True)
    summary = summarise(runs)
    meta = {
        "date": date, "command": "python -m bench.ddp_bench " + " ".join(argv),
        "cpus": os.cpu_count(), "torch": torch.__version__, "data": str(a.data),
        "train_rows": info["sizes"]["impressions_train"],
        "batch_size": TrainConfig().batch_size, "steps": a.steps, "warmup": a.warmup,
        "repeats": a.repeats,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"ddp-{date}.json").write_text(
        json.dumps({"meta": meta, "runs": runs, "summary": summary}, indent=2) + "\n")
    md = markdown(meta, summary)
    (a.out / f"ddp-{date}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
