"""The MMoE paper's synthetic task-correlation experiment (Ma et al., KDD 2018, section 5).

Two regression tasks whose relatedness is set exactly by p, the cosine of their weight vectors:

    w1 = c·u1,  w2 = c·(p·u1 + sqrt(1 − p²)·u2),  u1 ⟂ u2 unit vectors in R^d
    y_i = w_iᵀx + Σ_j sin(α_j·w_iᵀx + β_j) + ε_i,   x ~ N(0, I_d),  ε_i ~ N(0, σ²)

α_j, β_j ~ N(0, 1) are drawn once from a fixed seed and shared by every run (as PLE did); u1, u2,
the data and the model initialisation are fresh per repeat. ε's 0.01 is read as the variance
(the paper's N(μ, σ²) notation), so σ = 0.1. MMoE, OMoE and Shared-Bottom (the project's own
`MultiTaskModel`) are trained with Adam on the sum of the two tasks' MSE.

Run: `ranker experiment mmoe-synthetic --out runs/mmoe-synthetic` (see `--help`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from ranker.schema import input_name

MODELS = ("mmoe", "omoe", "shared_bottom")
CORRELATIONS = (1.0, 0.9, 0.5, 0.0)
# One hidden layer of 126 units gives Shared-Bottom 14,776 parameters, the closest any width
# gets to MMoE's 14,834 (127 gives 14,893). The paper's "about 113" (13,255) matches MMoE's
# experts + towers without its gates (13,218), so we count the gates too.
SHARED_BOTTOM_WIDTH = 126
CONTEXT_DENSE = input_name("context", "dense")  # the model's one input: x as dense context


@dataclass(frozen=True)
class DataConfig:
    """The generator's constants (section 5.1); `sin_seed` fixes α, β for all runs."""

    d: int = 100
    c: float = 1.0
    m: int = 10
    noise_var: float = 0.01
    sin_seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Data sizes and optimiser settings of one run."""

    n_train: int = 10_000
    n_test: int = 2_000
    steps: int = 3_000
    batch_size: int = 128
    lr: float = 1e-3
    log_every: int = 50
    shared_bottom_width: int = SHARED_BOTTOM_WIDTH


def sin_params(data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """α, β ~ N(0, 1), m of each, drawn once from `data.sin_seed`."""
    rng = np.random.default_rng(data.sin_seed)
    return rng.standard_normal(data.m), rng.standard_normal(data.m)


def task_weights(p: float, rng: np.random.Generator, data: DataConfig) -> np.ndarray:
    """w1, w2 (shape (2, d)) with cosine exactly p, from a random orthonormal pair u1, u2."""
    q, _ = np.linalg.qr(rng.standard_normal((data.d, 2)))  # orthonormal columns
    u1, u2 = q[:, 0], q[:, 1]
    w1 = data.c * u1
    w2 = data.c * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)
    return np.stack([w1, w2])


def make_data(
    n: int, w: np.ndarray, rng: np.random.Generator, data: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """x (n, d) float32 and labels y (n, 2) float32 for task weights w (2, d)."""
    alpha, beta = sin_params(data)
    x = rng.standard_normal((n, data.d))
    z = x @ w.T  # (n, 2): w_iᵀx
    waves = np.sin(z[:, :, None] * alpha + beta).sum(axis=-1)  # Σ_j sin(α_j·w_iᵀx + β_j)
    noise = rng.standard_normal((n, 2)) * math.sqrt(data.noise_var)
    return x.astype(np.float32), (z + waves + noise).astype(np.float32)


def run_seeds(seed: int, p: float, repeat: int, model_type: str) -> tuple[int, int]:
    """(data seed, init seed): data shared by the models of one (p, repeat), init per model."""
    key = [seed, repeat, round(p * 1000)]
    data_seed = int(np.random.SeedSequence(key).generate_state(1)[0])
    init_key = [*key, MODELS.index(model_type) + 1]
    init_seed = int(np.random.SeedSequence(init_key).generate_state(1)[0])
    return data_seed, init_seed


def model_config(model_type: str, shared_bottom_width: int = SHARED_BOTTOM_WIDTH) -> Any:
    """The paper's equal-budget models as the project's `ModelConfig`."""
    from training.model import InputGroup, ModelConfig

    return ModelConfig(
        inputs=[InputGroup("context", [], [], 100)],
        tasks=["t1", "t2"],
        task_kind="regression",
        model_type=model_type,  # type: ignore[arg-type]
        n_experts=8,
        expert_hidden=[16],
        tower_hidden=[8],
        bottom_hidden=[shared_bottom_width],
    )


def train_run(
    model_type: str,
    p: float,
    repeat: int,
    seed: int = 0,
    train: TrainConfig | None = None,
    data: DataConfig | None = None,
) -> dict[str, Any]:
    """Train one model on fresh data for one correlation; return losses and the loss curves."""
    import torch

    from training.model import MultiTaskModel

    train = train or TrainConfig()
    data = data or DataConfig()
    data_seed, init_seed = run_seeds(seed, p, repeat, model_type)
    rng = np.random.default_rng(data_seed)
    w = task_weights(p, rng, data)
    x_np, y_np = make_data(train.n_train, w, rng, data)
    xt_np, yt_np = make_data(train.n_test, w, rng, data)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    xt, yt = torch.from_numpy(xt_np), torch.from_numpy(yt_np)

    torch.manual_seed(init_seed)
    model = MultiTaskModel(model_config(model_type, train.shared_bottom_width))
    opt = torch.optim.Adam(model.parameters(), lr=train.lr)
    gen = torch.Generator().manual_seed(init_seed)

    def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = model({CONTEXT_DENSE: xb})
        return ((out["t1"] - yb[:, 0]) ** 2).mean() + ((out["t2"] - yb[:, 1]) ** 2).mean()

    def full_loss(xb: torch.Tensor, yb: torch.Tensor) -> float:
        with torch.no_grad():
            return float(loss_of(xb, yb))

    curve_steps: list[int] = []
    train_curve: list[float] = []
    test_curve: list[float] = []
    order = torch.randperm(train.n_train, generator=gen)
    pos, window = 0, 0.0
    t0 = time.perf_counter()
    for step in range(1, train.steps + 1):
        if pos + train.batch_size > train.n_train:  # new epoch: reshuffle, drop the ragged tail
            order, pos = torch.randperm(train.n_train, generator=gen), 0
        idx = order[pos : pos + train.batch_size]
        pos += train.batch_size
        loss = loss_of(x[idx], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        window += float(loss.detach())
        if step % train.log_every == 0:
            curve_steps.append(step)
            train_curve.append(window / train.log_every)  # mean minibatch loss over the window
            test_curve.append(full_loss(xt, yt))
            window = 0.0
    return {
        "model": model_type,
        "correlation": p,
        "repeat": repeat,
        "data_seed": data_seed,
        "init_seed": init_seed,
        "cosine_w": float(w[0] @ w[1] / (np.linalg.norm(w[0]) * np.linalg.norm(w[1]))),
        "n_params": sum(t.numel() for t in model.parameters()),
        "final_train_loss": full_loss(x, y),
        "final_test_loss": full_loss(xt, yt),
        "seconds": time.perf_counter() - t0,
        "curve_steps": curve_steps,
        "train_curve": [_sig(v) for v in train_curve],
        "test_curve": [_sig(v) for v in test_curve],
    }


def _sig(v: float) -> float:
    """Five significant digits: keeps runs.json small without losing anything a plot shows."""
    return float(f"{v:.5g}")


def _job(args: tuple[str, float, int, int, TrainConfig, DataConfig]) -> dict[str, Any]:
    """One run in a worker process, single-threaded so 2 workers use 2 cores without contention."""
    import torch

    torch.set_num_threads(1)
    return train_run(*args)


def run_all(
    models: list[str],
    correlations: list[float],
    repeats: int,
    seed: int,
    train: TrainConfig,
    data: DataConfig,
    workers: int,
    max_seconds: float | None = None,
) -> list[dict[str, Any]]:
    """Every (repeat, correlation, model) run over `workers` processes, repeat by repeat.

    With `max_seconds`, no result is awaited past the budget and only whole repeats are kept,
    so every model and correlation still has the same, paired repeats.
    """
    jobs = [
        (m, p, r, seed, train, data) for r in range(repeats) for p in correlations for m in models
    ]
    deadline = time.perf_counter() + (max_seconds if max_seconds else math.inf)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    pool = (
        ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
        if workers > 1
        else None
    )
    try:
        futures = [pool.submit(_job, j) for j in jobs] if pool is not None else []
        for i, job in enumerate(jobs):
            if time.perf_counter() > deadline:
                print(f"time budget of {max_seconds:.0f} s spent; stopping", file=sys.stderr)
                break
            results.append(futures[i].result() if pool is not None else _job(job))
            if (i + 1) % 10 == 0 or i + 1 == len(jobs):
                elapsed = time.perf_counter() - t0
                print(f"[{elapsed:7.1f}s] {i + 1}/{len(jobs)} runs", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    per_repeat = len(models) * len(correlations)
    done = [r for r in range(repeats) if sum(x["repeat"] == r for x in results) == per_repeat]
    return [x for x in results if x["repeat"] in done]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="ranker experiment mmoe-synthetic",
        description="Reproduce the MMoE paper's synthetic task-correlation experiment.",
    )
    d, t = DataConfig(), TrainConfig()
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--repeats", type=int, default=40, help="runs per model and correlation")
    ap.add_argument("--correlations", type=float, nargs="+", default=list(CORRELATIONS))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--seed", type=int, default=0, help="base seed of data and init")
    ap.add_argument("--n-train", type=int, default=t.n_train)
    ap.add_argument("--n-test", type=int, default=t.n_test)
    ap.add_argument("--steps", type=int, default=t.steps)
    ap.add_argument("--batch-size", type=int, default=t.batch_size)
    ap.add_argument("--lr", type=float, default=t.lr)
    ap.add_argument("--log-every", type=int, default=t.log_every)
    ap.add_argument("--shared-bottom-width", type=int, default=t.shared_bottom_width)
    ap.add_argument("--c", type=float, default=d.c, help="scale of the task weights")
    ap.add_argument("--noise-var", type=float, default=d.noise_var)
    ap.add_argument("--sin-seed", type=int, default=d.sin_seed, help="seed of α, β")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--max-minutes",
        type=float,
        help="time budget: stop after this long and keep the repeats completed by then",
    )
    ap.add_argument(
        "--from-runs", type=Path, help="skip training: rebuild the report from this runs.json"
    )
    args = ap.parse_args(argv)
    for name in ("repeats", "n_train", "n_test", "steps", "batch_size", "log_every", "workers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size > args.n_train:
        ap.error("--batch-size must be <= --n-train")
    if any(not -1.0 <= p <= 1.0 for p in args.correlations):
        ap.error("--correlations must lie in [-1, 1]")
    return args


def main(argv: list[str]) -> int:
    """`ranker experiment mmoe-synthetic`: run everything, write runs.json, results.md, PNGs."""
    args = parse_args(argv)
    if args.from_runs is not None:
        saved = json.loads(args.from_runs.read_text())
        meta, runs = saved["meta"], saved["runs"]
    else:
        meta, runs = _run(args, argv)
        args.out.mkdir(parents=True, exist_ok=True)
        # written before the report so a plotting failure never loses a long run
        (args.out / "runs.json").write_text(json.dumps({"meta": meta, "runs": runs}))
    from training.experiments.report import write_report

    write_report(args.out, meta, runs)
    summary = {"out": str(args.out), "runs": len(runs), "wall_seconds": meta["wall_seconds"]}
    print(json.dumps(summary))
    return 0


def _run(args: argparse.Namespace, argv: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train every run the arguments ask for; return (meta, runs)."""
    data = replace(DataConfig(), c=args.c, noise_var=args.noise_var, sin_seed=args.sin_seed)
    train = TrainConfig(
        n_train=args.n_train,
        n_test=args.n_test,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        log_every=args.log_every,
        shared_bottom_width=args.shared_bottom_width,
    )
    t0 = time.perf_counter()
    budget = args.max_minutes * 60 if args.max_minutes else None
    runs = run_all(
        args.models, args.correlations, args.repeats, args.seed, train, data, args.workers, budget
    )
    if not runs:
        raise SystemExit("no repeat completed within the time budget")
    meta = {
        "command": " ".join(["ranker experiment mmoe-synthetic", *argv]),
        "data": asdict(data),
        "train": asdict(train),
        "models": list(args.models),
        "correlations": list(args.correlations),
        "repeats": len({r["repeat"] for r in runs}),
        "repeats_requested": args.repeats,
        "max_minutes": args.max_minutes,
        "seed": args.seed,
        "workers": args.workers,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": _machine(),
    }
    return meta, runs


def _machine() -> dict[str, Any]:
    """Where the run happened, for the report."""
    import platform

    import torch

    model = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "processor": model,
        "load_avg_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
