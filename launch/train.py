"""`ranker data`, `ranker train` and `ranker export`: argument parsing only; work is in pipeline."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import get_args

from training.spec import load_spec


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e


def _weights(s: str) -> dict[str, float]:
    """'click=1,like=2' -> {'click': 1.0, 'like': 2.0}."""
    out = {}
    for part in filter(None, s.split(",")):
        task, _, value = part.partition("=")
        try:
            out[task.strip()] = float(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected task=weight, got {part!r}") from e
    return out


def data_main(argv: list[str]) -> int:
    """Generate the synthetic dataset."""
    from training.synthetic import SyntheticConfig, write_dataset

    p = argparse.ArgumentParser(prog="ranker data", description=data_main.__doc__)
    p.add_argument("--out", type=Path, default=Path("data/synthetic"))
    p.add_argument("--small", action="store_true", help="a tiny dataset (tests, smoke runs)")
    p.add_argument("--impressions", type=int, help="number of impressions (all splits)")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--relatedness", type=float, help="task relatedness knob in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    kw: dict[str, object] = {"seed": a.seed}
    for field, value in (("n_impressions", a.impressions), ("n_users", a.users),
                         ("n_items", a.items), ("relatedness", a.relatedness)):
        if value is not None:
            kw[field] = value
    cfg = SyntheticConfig.small(**kw) if a.small else SyntheticConfig(**kw)  # type: ignore[arg-type]
    info = write_dataset(cfg, a.out)
    keys = ("sizes", "rates", "after_click", "oracle_auc")
    print(json.dumps({k: info[k] for k in keys}, indent=2))
    print(f"wrote {a.out}")
    return 0


def train_main(argv: list[str]) -> int:
    """Train a model and its baselines, evaluate on test, write a run directory."""
    from training.model import ModelConfig, ModelType
    from training.pipeline import DEFAULT_SPEC, run_training
    from training.report import markdown
    from training.train import TrainConfig

    m, t = ModelConfig(inputs=[]), TrainConfig()  # the defaults are declared there, once
    p = argparse.ArgumentParser(prog="ranker train", description=train_main.__doc__)
    p.add_argument("--spec", default=DEFAULT_SPEC, help="dataset spec (path or name in datasets/)")
    p.add_argument("--data", type=Path, help="data directory of a tables spec")
    p.add_argument("--out", type=Path, help="run directory (default runs/<dataset>)")
    p.add_argument("--model", choices=get_args(ModelType), default=m.model_type)
    p.add_argument("--experts", type=int, default=m.n_experts)
    p.add_argument("--expert-hidden", type=_ints, default=m.expert_hidden)
    p.add_argument("--bottom-hidden", type=_ints, default=m.bottom_hidden)
    p.add_argument("--tower-hidden", type=_ints, default=m.tower_hidden)
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--patience", type=int, default=t.patience)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--loss-weights", type=_weights, default=t.loss_weights,
                   help="e.g. click=1,like=2,share=4")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-train-rows", type=int, help="subsample the train split (csv specs)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--nproc", type=int, help="data-parallel on N local processes (torchrun)")
    p.add_argument("--step-log", type=Path, help="every step's loss as JSON lines (rank 0)")
    from launch.logs import add_from_logs_args, train_from_logs

    add_from_logs_args(p)
    a = p.parse_args(argv)
    if a.nproc:
        from training.distributed import run_local, without_option

        return run_local(a.nproc, ["-m", "launch.cli", "train", *without_option(argv, "--nproc")])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_kw = {
        "model_type": a.model,
        "n_experts": a.experts,
        "expert_hidden": a.expert_hidden,
        "bottom_hidden": a.bottom_hidden,
        "tower_hidden": a.tower_hidden,
    }
    tc = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, patience=a.patience,
                     weight_decay=a.weight_decay,
                     loss_weights=a.loss_weights, seed=a.seed, progress=not a.no_progress)
    from training.distributed import is_main_process, process_group
    from training.train import step_log

    if a.from_logs:
        with process_group(), step_log(a.step_log):  # a group only under torchrun
            return train_from_logs(p, a, model_kw, tc)
    spec = load_spec(a.spec)
    unknown = set(a.loss_weights) - set(spec.task_names)
    if unknown:
        p.error(f"--loss-weights: unknown tasks {sorted(unknown)}; tasks are {spec.task_names}")
    if a.max_train_rows:
        import dataclasses

        spec = dataclasses.replace(
            spec, source=dataclasses.replace(spec.source, max_train_rows=a.max_train_rows)
        )
    out = a.out or Path("runs") / spec.name
    with process_group(), step_log(a.step_log):  # a group only under torchrun (WORLD_SIZE set)
        report = run_training(spec, out, model_kw, tc, data_dir=a.data, baselines=a.baselines)
    if is_main_process():
        print(markdown(report))
        print(f"wrote {out}")
    return 0


def export_main(argv: list[str]) -> int:
    """Export a run's checkpoint to the model repository as a new version."""
    from training.pipeline import export_run

    p = argparse.ArgumentParser(prog="ranker export", description=export_main.__doc__)
    p.add_argument("--run", type=Path, required=True, help="run directory written by ranker train")
    p.add_argument("--repo", type=Path, default=Path("models"))
    p.add_argument("--name", help="model name (default: the spec's model_name, e.g. mmoe)")
    a = p.parse_args(argv)
    path = export_run(a.run, a.repo, a.name)
    print(f"exported {path}")
    return 0
