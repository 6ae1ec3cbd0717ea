"""Training loop and evaluation: weighted per-task BCE, Adam, early stopping on validation loss.

The same loop runs on one process or on the ranks of a torch.distributed group
(`training/distributed.py`): with a group, the model is wrapped in DistributedDataParallel, each
rank trains on its shard of every global batch and evaluates its shard of the validation split,
and the validation loss is all-reduced so that every rank takes the same early-stopping decision.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ranker.manifest import GATES_OUTPUT
from training.calibration import calibrate, ece, reliability
from training.data import Encoded, Gathered
from training.distributed import LOCAL, Dist, current, rank_zero_only, unwrap, wrap
from training.losses import LossBalancer, make_balancer
from training.metrics import auc, log_loss
from training.model import ModelConfig, MultiTaskModel
from training.report import gate_health

EVAL_BATCH = 8192
# one JSON line per training step, written by rank 0 when a handler is attached (`step_log`)
STEPS = logging.getLogger("training.steps")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained. Its defaults are the project's: `ranker train` takes its flag
    defaults from here and the main job's short run (`ensure_default_model`) changes only the
    epochs."""

    epochs: int = 20
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-5  # Adam L2 on all weights: the id embeddings overfit without it
    patience: int = 2  # epochs without a better validation loss before stopping
    loss_weights: dict[str, float] = field(default_factory=dict)  # task -> weight (default 1)
    seed: int = 0
    progress: bool = True
    # training/losses.py: equal | uncertainty | gradnorm | pcgrad (the last three: one process)
    loss_balance: str = "equal"
    gradnorm_alpha: float = 1.5
    # training/calibration.py: none | platt | isotonic, fitted on validation, part of the graph
    calibration: str = "none"
    # the id embeddings' own optimiser settings (issue 17): None / 1.0 = the same as the other
    # weights, today's training. Embedding rows of rare ids see few gradients and overfit first.
    embedding_weight_decay: float | None = None  # None: `weight_decay`
    embedding_lr_mult: float = 1.0  # embedding lr = lr * this

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def param_groups(model: MultiTaskModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Adam's parameter groups: the embedding tables with their own lr and weight decay, and
    every other weight. One group when the embeddings take the defaults (the optimiser is then
    exactly the one before the option existed)."""
    emb_wd = cfg.weight_decay if cfg.embedding_weight_decay is None else cfg.embedding_weight_decay
    if emb_wd == cfg.weight_decay and cfg.embedding_lr_mult == 1.0:
        return [{"params": list(model.parameters())}]
    emb = list(model.encoders.parameters())
    ids = {id(p) for p in emb}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": rest},
        {"params": emb, "lr": cfg.lr * cfg.embedding_lr_mult, "weight_decay": emb_wd},
    ]


# called after every epoch with (epoch, validation loss, per-task validation losses); it may
# raise to end training (the tuner's pruning raises optuna.TrialPruned)
EpochCallback = Callable[[int, float, dict[str, float]], None]


@dataclass
class History:
    """Per-epoch curves, the best epoch and wall time."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_task_loss: list[dict[str, float]] = field(default_factory=list)
    task_weights: list[dict[str, float]] = field(default_factory=list)  # balancer's, per epoch
    best_epoch: int = -1
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_tensors(inputs: dict[str, Any]) -> dict[str, Any]:
    """numpy inputs as tensors; a `Gathered` input stays gathered (its table and rows)."""
    return {k: Gathered(torch.from_numpy(v.table), torch.from_numpy(v.rows))
            if isinstance(v, Gathered) else torch.from_numpy(np.ascontiguousarray(v))
            for k, v in inputs.items()}


def task_losses(out: dict[str, torch.Tensor], y: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """Per-task mean binary cross-entropy: (T,)."""
    # the model emits probabilities; BCE on them is stable enough because torch clamps log at -100
    return torch.stack(
        [F.binary_cross_entropy(out[t], y[:, j]) for j, t in enumerate(tasks)]
    )


def train_one_epoch(
    model: nn.Module,
    data: Encoded,
    opt: torch.optim.Optimizer,
    weights: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    epoch: int,
    dist: Dist = LOCAL,
    balancer: LossBalancer | None = None,
) -> float:
    """One pass over shuffled minibatches; returns the mean weighted training loss.

    `model` is a MultiTaskModel, or its DistributedDataParallel wrapper when `dist` is a group:
    then every rank draws the same permutation (same generator, same seed), takes its rows of
    each global batch of `cfg.batch_size` (`Dist.shard`) and DDP averages the gradients, so a
    step is the single process's step on the same global batch.
    """
    model.train()
    core = unwrap(model)
    assert isinstance(core, MultiTaskModel)
    tasks = core.config.tasks
    dev = dist.device
    inputs = to_tensors(data.inputs)
    labels = torch.from_numpy(data.labels)
    perm = torch.randperm(len(data), generator=gen)
    batches = perm.split(cfg.batch_size)
    losses: list[float] = []  # this rank's loss per step
    running = 0.0
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False,
               disable=not (cfg.progress and dist.is_main))
    for i, batch in enumerate(bar):
        idx = dist.shard(batch)  # (B / world_size,)
        out = model({k: v[idx].to(dev) for k, v in inputs.items()})
        if balancer is None:
            loss = _step_loss(out, labels[idx].to(dev), tasks, weights, len(batch), dist)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP: all-reduces (averages) the gradients over the ranks here
            opt.step()
        else:  # one process: the balancer fills the gradients (training/losses.py)
            opt.zero_grad(set_to_none=True)
            loss = balancer.backward(task_losses(out, labels[idx].to(dev), tasks), core)
            opt.step()
            balancer.after_step()
        losses.append(float(loss.detach()))
        running = 0.98 * running + 0.02 * losses[-1] if i else losses[-1]
        if i % 20 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    if dist.enabled:
        # the global batch's loss per step: the mean over ranks of the (scaled) rank losses
        losses = [x / dist.world_size for x in dist.all_sum(losses)]
    if dist.is_main and STEPS.isEnabledFor(logging.INFO):
        for i, (batch, x) in enumerate(zip(batches, losses, strict=True)):
            STEPS.info(json.dumps({"model": core.config.model_type, "tasks": tasks,
                                   "epoch": epoch, "step": i, "rows": len(batch), "loss": x}))
    return sum(losses) / max(len(batches), 1)


def _step_loss(out: dict[str, torch.Tensor], y: torch.Tensor, tasks: list[str],
               weights: torch.Tensor, global_rows: int, dist: Dist) -> torch.Tensor:
    """The weighted loss this rank backpropagates; DDP's average of it over the ranks is the
    global batch's mean loss."""
    if not dist.enabled:
        return (task_losses(out, y, tasks) * weights).sum()
    rows = len(y)
    if rows == 0:
        # a last batch smaller than the world leaves this rank no rows; it still joins the
        # gradient all-reduce, with zero gradients for every parameter
        return sum((o.sum() for o in out.values()), torch.zeros((), device=y.device)) * 0.0
    loss = (task_losses(out, y, tasks) * weights).sum()
    # mean over this rank's rows -> its share of the global mean (x1.0 when shards are equal)
    scale = rows * dist.world_size / global_rows
    return loss if scale == 1.0 else loss * scale


@torch.no_grad()
def predict(model: MultiTaskModel, data: Encoded) -> dict[str, np.ndarray]:
    """Model outputs for every row, in eval batches: task -> (N,), gates -> (N, T, M)."""
    model.eval()
    dev = next(model.parameters()).device
    inputs = to_tensors(data.inputs)
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(data), EVAL_BATCH):
        out = model({k: v[start : start + EVAL_BATCH].to(dev) for k, v in inputs.items()})
        for k, v in out.items():
            chunks.setdefault(k, []).append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}


def evaluate(model: MultiTaskModel, data: Encoded) -> dict[str, Any]:
    """AUC, log loss and expected calibration error per task, the reliability bins (binary
    tasks), and when gated the mean gate weight per task and expert and the gates' health."""
    pred = predict(model, data)
    out: dict[str, Any] = {}
    binary = model.config.task_kind == "binary"
    for j, t in enumerate(model.config.tasks):
        y = data.labels[:, j]
        out[t] = {"auc": auc(y, pred[t]), "log_loss": log_loss(y, pred[t])}
        if binary:
            out[t]["ece"] = ece(y, pred[t])
    if binary:
        out["reliability"] = {t: reliability(data.labels[:, j], pred[t])
                              for j, t in enumerate(model.config.tasks)}
    if GATES_OUTPUT in pred:
        out["gates_mean"] = pred[GATES_OUTPUT].mean(axis=0).tolist()  # (T, M)
        out["gate_health"] = gate_health(pred[GATES_OUTPUT], model.config.tasks)
    return out


def val_loss(
    model: MultiTaskModel, data: Encoded, weights: np.ndarray, dist: Dist = LOCAL
) -> tuple[float, list[float]]:
    """Weighted validation log loss and its per-task terms.

    In a group each rank scores its rows (rank, rank + W, ...) and the per-task sums and the
    row count are all-reduced: every rank gets the same numbers, over the whole split.
    """
    tasks = model.config.tasks
    if not dist.enabled:
        pred = predict(model, data)
        per_task = [log_loss(data.labels[:, j], pred[t]) for j, t in enumerate(tasks)]
        return float(np.dot(weights, per_task)), per_task
    part = data.take(np.arange(dist.rank, len(data), dist.world_size))
    pred = predict(model, part)
    sums = [log_loss(part.labels[:, j], pred[t]) * len(part) if len(part) else 0.0
            for j, t in enumerate(tasks)]
    *totals, rows = dist.all_sum([*sums, float(len(part))])
    per_task = [x / rows for x in totals]
    return float(np.dot(weights, per_task)), per_task


def fit(
    mcfg: ModelConfig,
    train: Encoded,
    val: Encoded,
    cfg: TrainConfig,
    on_epoch: EpochCallback | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
) -> tuple[MultiTaskModel, History]:
    """Train from a seeded init (or from `init_state`, a model's weights of the same config:
    warm-starting); keep the weights of the epoch with the best validation loss.

    Inside a torch.distributed group (`distributed.process_group`) this is data-parallel: every
    rank calls it with the same arguments and returns the same model. `on_epoch` sees every
    epoch's validation loss (the tuner reports it to Optuna's pruner).
    """
    dist = current()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = MultiTaskModel(mcfg)
    if init_state is not None:
        model.load_state_dict(init_state)  # strict: the same parameters, or it raises
    elif mcfg.task_kind == "binary":
        model.init_output_bias(train.labels.mean(axis=0).tolist())
    model.to(dist.device)
    net = wrap(model, dist)  # DDP broadcasts rank 0's initial weights (they are equal anyway)
    opt = torch.optim.Adam(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    w = np.array([cfg.loss_weights.get(t, 1.0) for t in mcfg.tasks], dtype=np.float64)
    weights = torch.tensor(w, dtype=torch.float32, device=dist.device)
    balancer: LossBalancer | None = None
    if cfg.loss_balance != "equal":
        if dist.enabled:
            raise ValueError(f"loss balance {cfg.loss_balance!r} runs on one process only")
        balancer = make_balancer(cfg.loss_balance, weights, alpha=cfg.gradnorm_alpha,
                                 seed=cfg.seed).to(dist.device)
        if cfg.loss_balance == "uncertainty":  # the log-variances train with the model
            opt.add_param_group({"params": list(balancer.parameters()), "weight_decay": 0.0})
    hist = History()
    best_loss, best_state, bad = float("inf"), copy.deepcopy(model.state_dict()), 0
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        tr = train_one_epoch(net, train, opt, weights, cfg, gen, epoch, dist, balancer)
        vl, per_task = val_loss(model, val, w, dist)
        if balancer is not None:
            hist.task_weights.append(dict(zip(mcfg.tasks, balancer.task_weights(), strict=True)))
        hist.train_loss.append(tr)
        hist.val_loss.append(vl)
        hist.val_task_loss.append(dict(zip(mcfg.tasks, per_task, strict=True)))
        if cfg.progress and dist.is_main:
            tqdm.write(f"epoch {epoch}: train loss {tr:.5f}  val loss {vl:.5f}")
        if on_epoch is not None:
            on_epoch(epoch, vl, hist.val_task_loss[-1])
        improved = vl < best_loss - 1e-6
        stop = not improved and bad + 1 >= cfg.patience
        # the all-reduced loss is the same on every rank; rank 0's decision is still the one
        # taken, so no rank can ever leave the loop (or keep other weights) on its own
        improved, stop = dist.broadcast_flags([improved, stop])
        if improved:
            best_loss, best_state, bad = vl, copy.deepcopy(model.state_dict()), 0
            hist.best_epoch = epoch
        else:
            bad += 1
            if stop:
                break
    model.load_state_dict(best_state)
    model.cpu().eval()
    if cfg.calibration != "none":
        model = calibrate(model, val, cfg.calibration)
    hist.seconds = time.perf_counter() - t0
    return model, hist


@contextlib.contextmanager
def step_log(path: Path | None) -> Iterator[None]:
    """Write every training step's global loss to `path` as JSON lines (rank 0 only)."""
    if path is None:
        yield
        return
    # delay: the file is opened at the first line, which only rank 0 writes
    handler = logging.FileHandler(path, mode="w", delay=True)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = STEPS.level, STEPS.propagate
    STEPS.addHandler(handler)
    STEPS.setLevel(logging.INFO)
    STEPS.propagate = False  # not on the console
    try:
        yield
    finally:
        STEPS.removeHandler(handler)
        STEPS.setLevel(level)
        STEPS.propagate = propagate
        handler.close()


@rank_zero_only
def save_checkpoint(path: Path, model: MultiTaskModel, **extra: Any) -> None:
    """Weights plus everything needed to rebuild the model, loadable with weights_only=True.

    Written by rank 0 only in a torch.distributed group (the ranks hold the same weights)."""
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(path: Path) -> tuple[MultiTaskModel, dict[str, Any]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = MultiTaskModel(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
