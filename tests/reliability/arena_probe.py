"""Measure onnxruntime's CPU memory arena under varying batch sizes: RSS with and without it.

    python -m tests.reliability.arena_probe [--calls 1500] [--out runs/reliability/arena.json]

Exports a mid-size MMoE (8 experts of 512-256 units: big enough for activations to matter),
then, in a fresh process per mode, runs `calls` batches of 1..1000 candidates and samples RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("arena", "arena_no_warmup", "no_arena")


def export_mid_model(repo: Path) -> Path:
    import torch

    from ranker.examples import golden_inputs, tiny_schema
    from tests.tiny import TASKS
    from training.export import export_model
    from training.model import ModelConfig, MultiTaskModel, inputs_from_schema

    torch.manual_seed(0)
    schema = tiny_schema()
    cfg = ModelConfig(inputs=inputs_from_schema(schema), tasks=TASKS, n_experts=8,
                      expert_hidden=[512, 256], tower_hidden=[128])
    return export_model(MultiTaskModel(cfg), schema, repo, "mmoe", golden_inputs(schema))


def run_mode(version_dir: Path, mode: str, calls: int) -> dict[str, object]:
    """One mode, in this process: RSS (MiB) every calls/10 calls."""
    import numpy as np
    import onnxruntime as ort

    from service.registry import load_version
    from tests.support import rss_kib

    model = load_version(version_dir, warmup_sizes=())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = mode != "no_arena"
    model.session = ort.InferenceSession(str(version_dir / "model.onnx"), sess_options=opts,
                                         providers=["CPUExecutionProvider"])
    if mode == "arena":  # what the service does: warm up at the largest allowed batch
        for n in (1, 100, 500, 1000):
            model.run(model.synthetic_inputs(n))
    rng = np.random.default_rng(0)
    rss, t0 = [], time.perf_counter()
    for i in range(calls):
        model.run(model.synthetic_inputs(int(rng.integers(1, 1001))))
        if i % max(1, calls // 10) == 0 or i == calls - 1:
            rss.append(rss_kib(os.getpid()) // 1024)
    return {"mode": mode, "rss_mib": rss, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=1500)
    p.add_argument("--out", type=Path, default=Path("runs/reliability/arena.json"))
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--model", type=Path)
    args = p.parse_args()
    if args.mode:  # child: one mode, result as JSON on stdout
        print(json.dumps(run_mode(args.model, args.mode, args.calls)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        version_dir = export_mid_model(Path(tmp))
        results = []
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", "tests.reliability.arena_probe",
                                  "--mode", mode, "--model", str(version_dir), "--calls",
                                  str(args.calls)], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
