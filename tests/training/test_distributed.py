"""DistributedDataParallel on this machine: 2 gloo ranks on loopback train the tiny model step
for step like one process on the same global batches, and the run exports like any other.

The main model and its baselines (Shared-Bottom, single-task, OMoE) all train through the same
loop, so all of them are compared. The data is chosen so the sharding's hard cases happen: 6001
training rows in global batches of 375 split 188/187 between the two ranks on every step, and
the last batch has a single row, so rank 1 has none and joins the gradient all-reduce with zero
gradients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from launch.cli import main as ranker
from launch.procs import HOST, free_port
from ranker.examples import golden_inputs
from ranker.manifest import load_manifest, verify_files
from ranker.schema import FeatureSchema
from training.distributed import LOCAL, Dist, without_option
from training.export import check_parity, torch_outputs
from training.train import load_checkpoint

IMPRESSIONS = 8573  # -> round(0.7 * 8573) = 6001 training rows
BATCH = 375  # 6001 = 16 x 375 + 1
TRAIN = ["--epochs", "3", "--patience", "1", "--batch-size", str(BATCH), "--experts", "3",
         "--expert-hidden", "8", "--bottom-hidden", "8", "--tower-hidden", "4", "--no-progress"]
MODELS = {"mmoe", "shared_bottom", "single_click", "single_like", "single_share", "omoe"}
# float32 losses; the ranks sum the gradients of half batches and DDP averages them, a
# different order of the same additions than one process's, which moves the weights by a few
# ulps a step; Adam keeps that relative. Measured: at most 3.2e-7 relative; the bound is 30x that.
RTOL = 1e-5
RUN_TIMEOUT_S = 300


def steps(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def torchrun(nproc: int, args: list[str], log: Path) -> None:
    """`python -m torch.distributed.run` on loopback with a free port, bounded in time."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-addr={HOST}", f"--master-port={free_port()}", "-m", "launch.cli", *args]
    with log.open("wb") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                           timeout=RUN_TIMEOUT_S, check=False)
    assert r.returncode == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same training, once in this process and once on 2 ranks, each with its step log."""
    base = tmp_path_factory.mktemp("ddp")
    data = base / "data"
    assert ranker(["data", "--small", "--impressions", str(IMPRESSIONS), "--out", str(data)]) == 0
    one, two = base / "one", base / "two"
    assert ranker(["train", "--data", str(data), "--out", str(one),
                   "--step-log", str(base / "one.jsonl"), *TRAIN]) == 0
    torchrun(2, ["train", "--data", str(data), "--out", str(two),
                 "--step-log", str(base / "two.jsonl"), *TRAIN], base / "two.log")
    return {"base": base, "data": data, "one": one, "two": two}


def test_two_ranks_match_one_process_step_for_step(runs: dict[str, Path]) -> None:
    one, two = steps(runs["base"] / "one.jsonl"), steps(runs["base"] / "two.jsonl")
    assert len(one) == len(two) > 0
    def key(s: dict[str, object]) -> tuple[object, ...]:
        return s["model"], s["tasks"], s["epoch"], s["step"], s["rows"]

    assert [key(s) for s in one] == [key(s) for s in two]
    assert len({(str(s["model"]), str(s["tasks"])) for s in one}) == len(MODELS)
    assert sorted({int(str(s["rows"])) for s in one}) == [1, BATCH]  # the uneven last batch ran
    a = np.array([s["loss"] for s in one], dtype=np.float64)
    b = np.array([s["loss"] for s in two], dtype=np.float64)
    rel = np.abs(a - b) / np.abs(a)
    assert rel.max() <= RTOL, f"step {int(rel.argmax())}: {a[rel.argmax()]} vs {b[rel.argmax()]}"


def test_ranks_agree_on_evaluation_and_early_stopping(runs: dict[str, Path]) -> None:
    r1 = json.loads((runs["one"] / "report.json").read_text())
    r2 = json.loads((runs["two"] / "report.json").read_text())
    assert "distributed" not in r1 and r2["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert set(r1["models"]) == set(r2["models"]) == MODELS
    stopped_early = 0
    for name, m1 in r1["models"].items():
        h1, h2 = m1["history"], r2["models"][name]["history"]
        # the validation loss all-reduced over the ranks' halves is the whole split's
        np.testing.assert_allclose(h2["val_loss"], h1["val_loss"], rtol=RTOL, err_msg=name)
        assert (h2["best_epoch"], len(h2["val_loss"])) == (h1["best_epoch"], len(h1["val_loss"]))
        stopped_early += len(h1["val_loss"]) < 3
        for task in m1["tasks"]:
            assert r2["models"][name]["test"][task]["log_loss"] == pytest.approx(
                m1["test"][task]["log_loss"], rel=RTOL), (name, task)
    assert stopped_early  # patience 1 stopped some of these seeded runs early: both alike


def test_rank_zero_writes_the_run_and_it_exports_with_parity(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    two = runs["two"]
    assert {"model.pt", "report.json", "report.md", "training_curves.png"} <= {
        p.name for p in two.iterdir()}
    assert (runs["base"] / "two.log").read_text().count("| mmoe |") == 1  # printed by rank 0
    repo = tmp_path / "models"
    assert ranker(["export", "--run", str(two), "--repo", str(repo)]) == 0
    vdir = repo / "mmoe" / "1"
    m = load_manifest(vdir)
    verify_files(vdir, m)
    sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {k: np.asarray(v, dtype=np.int64 if k.endswith("_cat") else np.float32)
             for k, v in m.golden.inputs.items()}
    check_parity(sess, {k: np.asarray(v, np.float32) for k, v in m.golden.outputs.items()},
                 feeds, m.golden.atol)
    # the export parity test's batch sizes: 1, an odd one and the largest candidate batch
    model, ckpt = load_checkpoint(two / "model.pt")
    schema = FeatureSchema.from_description(ckpt["features"], ckpt["vocab"])
    for n in (1, 37, 2048):
        x = golden_inputs(schema, n=n, seed=n)
        check_parity(sess, torch_outputs(model, x), x, 1e-5)


def test_ranker_train_nproc_spawns_torchrun(runs: dict[str, Path]) -> None:
    """`ranker train --nproc 2` is the same 2-rank run (same steps, same numbers)."""
    out, log = runs["base"] / "nproc", runs["base"] / "nproc.jsonl"
    cmd = [sys.executable, "-m", "launch.cli", "train", "--nproc", "2", "--data",
           str(runs["data"]), "--out", str(out), "--step-log", str(log), *TRAIN]
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                       check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert steps(log) == steps(runs["base"] / "two.jsonl")
    assert (out / "model.pt").is_file()


def test_shard_is_distributed_samplers_split_of_each_global_batch() -> None:
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    ranks = [Dist(rank=r, world_size=3, backend="gloo") for r in range(3)]
    for batch in perm.split(6):
        parts = [d.shard(batch) for d in ranks]
        assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())
    # over the epoch, rank r's rows are DistributedSampler's perm[r::W] (when W divides B)
    for d in ranks:
        mine = torch.cat([d.shard(b) for b in perm[:18].split(6)])
        assert mine.tolist() == perm[:18][d.rank :: 3].tolist()
    assert LOCAL.shard(perm) is perm and not LOCAL.enabled and LOCAL.is_main


def test_without_option() -> None:
    argv = ["--data", "d", "--nproc", "2", "--out", "o", "--nproc=4"]
    assert without_option(argv, "--nproc") == ["--data", "d", "--out", "o"]
