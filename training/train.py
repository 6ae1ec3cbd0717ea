"""Training loop and evaluation: weighted per-task BCE, Adam, early stopping on validation loss."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ranker.manifest import GATES_OUTPUT
from training.data import Encoded
from training.metrics import auc, log_loss
from training.model import ModelConfig, MultiTaskModel

EVAL_BATCH = 8192


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class History:
    """Per-epoch curves, the best epoch and wall time."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_task_loss: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_tensors(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}


def task_losses(out: dict[str, torch.Tensor], y: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """Per-task mean binary cross-entropy: (T,)."""
    # the model emits probabilities; BCE on them is stable enough because torch clamps log at -100
    return torch.stack(
        [F.binary_cross_entropy(out[t], y[:, j]) for j, t in enumerate(tasks)]
    )


def train_one_epoch(
    model: MultiTaskModel,
    data: Encoded,
    opt: torch.optim.Optimizer,
    weights: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    epoch: int,
) -> float:
    """One pass over shuffled minibatches; returns the mean weighted training loss."""
    model.train()
    tasks = model.config.tasks
    inputs = to_tensors(data.inputs)
    labels = torch.from_numpy(data.labels)
    perm = torch.randperm(len(data), generator=gen)
    batches = perm.split(cfg.batch_size)
    total, running = 0.0, 0.0
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not cfg.progress)
    for i, idx in enumerate(bar):
        out = model({k: v[idx] for k, v in inputs.items()})
        loss = (task_losses(out, labels[idx], tasks) * weights).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        running = 0.98 * running + 0.02 * float(loss.detach()) if i else float(loss.detach())
        if i % 20 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    return total / max(len(batches), 1)


@torch.no_grad()
def predict(model: MultiTaskModel, data: Encoded) -> dict[str, np.ndarray]:
    """Model outputs for every row, in eval batches: task -> (N,), gates -> (N, T, M)."""
    model.eval()
    inputs = to_tensors(data.inputs)
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(data), EVAL_BATCH):
        out = model({k: v[start : start + EVAL_BATCH] for k, v in inputs.items()})
        for k, v in out.items():
            chunks.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}


def evaluate(model: MultiTaskModel, data: Encoded) -> dict[str, Any]:
    """AUC and log loss per task, and the mean gate weight per task and expert when gated."""
    pred = predict(model, data)
    out: dict[str, Any] = {}
    for j, t in enumerate(model.config.tasks):
        y = data.labels[:, j]
        out[t] = {"auc": auc(y, pred[t]), "log_loss": log_loss(y, pred[t])}
    if GATES_OUTPUT in pred:
        out["gates_mean"] = pred[GATES_OUTPUT].mean(axis=0).tolist()  # (T, M)
    return out


def val_loss(
    model: MultiTaskModel, data: Encoded, weights: np.ndarray
) -> tuple[float, list[float]]:
    """Weighted validation log loss and its per-task terms."""
    pred = predict(model, data)
    per_task = [log_loss(data.labels[:, j], pred[t]) for j, t in enumerate(model.config.tasks)]
    return float(np.dot(weights, per_task)), per_task


def fit(
    mcfg: ModelConfig, train: Encoded, val: Encoded, cfg: TrainConfig
) -> tuple[MultiTaskModel, History]:
    """Train from a seeded init; keep the weights of the epoch with the best validation loss."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = MultiTaskModel(mcfg)
    if mcfg.task_kind == "binary":
        model.init_output_bias(train.labels.mean(axis=0).tolist())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    w = np.array([cfg.loss_weights.get(t, 1.0) for t in mcfg.tasks], dtype=np.float64)
    weights = torch.tensor(w, dtype=torch.float32)
    hist = History()
    best_loss, best_state, bad = float("inf"), copy.deepcopy(model.state_dict()), 0
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        tr = train_one_epoch(model, train, opt, weights, cfg, gen, epoch)
        vl, per_task = val_loss(model, val, w)
        hist.train_loss.append(tr)
        hist.val_loss.append(vl)
        hist.val_task_loss.append(dict(zip(mcfg.tasks, per_task, strict=True)))
        if cfg.progress:
            tqdm.write(f"epoch {epoch}: train loss {tr:.5f}  val loss {vl:.5f}")
        if vl < best_loss - 1e-6:
            best_loss, best_state, bad = vl, copy.deepcopy(model.state_dict()), 0
            hist.best_epoch = epoch
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    hist.seconds = time.perf_counter() - t0
    return model, hist


def save_checkpoint(path: Path, model: MultiTaskModel, **extra: Any) -> None:
    """Weights plus everything needed to rebuild the model, loadable with weights_only=True."""
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(path: Path) -> tuple[MultiTaskModel, dict[str, Any]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = MultiTaskModel(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
