"""`ranker data`, `ranker train` and `ranker export`: argument parsing only; work is in pipeline."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from launch.argtypes import add_default_flags
from training.spec import load_spec

if TYPE_CHECKING:
    from training.tracking import Tracker


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


def _chain(s: str) -> dict[str, str]:
    """'like:click,share:click' -> {'like': 'click', 'share': 'click'}."""
    out = {}
    for part in filter(None, s.split(",")):
        child, sep, parent = part.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"want child:parent, got {part!r}")
        out[child.strip()] = parent.strip()
    return out


def _crosses(s: str) -> list[str]:
    """'interest:category,country:category' -> ['interest:category', 'country:category']."""
    out = [part.strip() for part in s.split(",") if part.strip()]
    for part in out:
        if part.count(":") != 1:
            raise argparse.ArgumentTypeError(f"want feature:feature, got {part!r}")
    return out


def data_main(argv: list[str]) -> int:
    """Generate the synthetic dataset."""
    from training.synthetic import SyntheticConfig, write_dataset

    p = argparse.ArgumentParser(prog="ranker data", description=data_main.__doc__)
    p.add_argument("--out", type=Path, default=Path("data/synthetic"))
    p.add_argument("--small", action="store_true", help="a tiny dataset (tests, smoke runs)")
    p.add_argument("--profile", choices=["default", "production"], default="default",
                   help="production: 1 M users, 100 k items, 10 M impressions, a 20-item "
                        "history, 20 extra features per entity (train with "
                        "--spec synthetic_production)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="with --profile production: every count times this (0.1 = 10 %%)")
    p.add_argument("--impressions", type=int, help="number of impressions (all splits)")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--relatedness", type=float, help="task relatedness knob in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--position-bias", type=float,
                   help="clicks through e(p) = (1 + p)^-eta at a logged position (off: 0)")
    a = p.parse_args(argv)
    kw: dict[str, object] = {"seed": a.seed}
    for field, value in (("n_impressions", a.impressions), ("n_users", a.users),
                         ("n_items", a.items), ("relatedness", a.relatedness),
                         ("position_bias", a.position_bias)):
        if value is not None:
            kw[field] = value
    if a.profile == "production":
        if a.small:
            p.error("--small and --profile production: use --scale for a smaller production world")
        cfg = SyntheticConfig.production(a.scale, **kw)
    else:
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
    add_default_flags(p, m, "dropout", "embedding_dropout", "gate_dropout",
                      dropout="dropout after the hidden layers of experts/bottom and towers")
    add_default_flags(p, m, "interaction_dim",
                      interaction_dim="products of the feature groups' projections of this "
                                      "width in the first layer (0: none)")
    p.add_argument("--wide", action=argparse.BooleanOptionalAction, default=m.wide,
                   help="a linear logit per task over the inputs (and the interactions)")
    p.add_argument("--cross", type=_crosses, default=m.crosses, metavar="A:B[,C:D]",
                   help="cross features: a table per declared pair of categoricals, e.g. "
                        "interest:category (or user.interest:item.category)")
    add_default_flags(p, m, "cross_max", "cross_buckets", "cross_dim",
                      cross_max="also every user x item pair of categoricals, ids excepted, "
                                "whose vocabulary product is at most this (0: none)",
                      cross_buckets="rows of a cross table; a larger pair space is hashed",
                      cross_dim="with --cross-mode embedding: the cross vector's width")
    p.add_argument("--cross-mode", choices=["wide", "embedding"], default=m.cross_mode,
                   help="wide: a logit per task and pair; embedding: a vector into the "
                        "first layer")
    add_default_flags(p, t, "epochs", "patience", "lr", "weight_decay", "embedding_lr_mult",
                      "gradnorm_alpha", embedding_lr_mult="embedding learning rate = --lr x this")
    p.add_argument("--embedding-weight-decay", type=float, default=t.embedding_weight_decay,
                   help="weight decay of the embedding tables (default: --weight-decay)")
    p.add_argument("--min-count", type=int,
                   help="every listed categorical: values seen fewer times in train -> OOV "
                        "(default: each feature's min_count in the spec)")
    add_default_flags(p, t, "batch_size")
    p.add_argument("--loss-weights", type=_weights, default=t.loss_weights,
                   help="e.g. click=1,like=2,share=4")
    add_default_flags(p, t, "seed")
    p.add_argument("--seeds", type=_ints,
                   help="e.g. 0,1,2,3,4: every model once per seed; mean ± std, paired tests")
    p.add_argument("--tune", type=int, metavar="N",
                   help="search N configurations with Optuna on the validation split first")
    p.add_argument("--tune-timeout-min", type=float, help="stop the search after M minutes")
    p.add_argument("--track", action=argparse.BooleanOptionalAction, default=None,
                   help="track in MLflow (runs/mlruns or $MLFLOW_TRACKING_URI); default: on "
                        "when mlflow is installed, unless RANKER_TRACK=0")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-train-rows", type=int, help="subsample the train split (csv specs)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--nproc", type=int, help="data-parallel on N local processes (torchrun)")
    p.add_argument("--step-log", type=Path, help="every step's loss as JSON lines (rank 0)")
    p.add_argument("--loss-balance", choices=["equal", "uncertainty", "gradnorm", "pcgrad"],
                   default=t.loss_balance)
    p.add_argument("--calibration", choices=["none", "platt", "isotonic"], default=t.calibration,
                   help="fitted on validation after training, exported in the graph")
    p.add_argument("--chain", type=_chain, default=m.chain,
                   help="ESMM: like:click,share:click means p(like) = p(click) p(like | click)")
    p.add_argument("--task-experts", type=int, default=m.task_experts, help="ple/cgc")
    p.add_argument("--shared-experts", type=int, default=m.shared_experts, help="ple/cgc")
    p.add_argument("--levels", type=int, default=m.levels, help="ple")
    p.add_argument("--position-tower", type=int, default=m.position_buckets, metavar="BUCKETS",
                   help="shallow position tower over the log's position column (0: none)")
    from launch.logs import add_from_logs_args, train_from_logs

    add_from_logs_args(p)
    a = p.parse_args(argv)
    if (a.tune or a.seeds) and (a.from_logs or a.nproc or os.environ.get("WORLD_SIZE")):
        p.error("--tune and --seeds run on one process, not with --from-logs or --nproc")
    if a.from_logs and a.min_count is not None:
        p.error("--min-count applies to a dataset spec, not to --from-logs")
    if a.seeds is not None and (not a.seeds or len(set(a.seeds)) != len(a.seeds)):
        p.error(f"--seeds: distinct seeds, each once, got {a.seeds}")
    if a.tune is not None and a.tune < 1:
        p.error("--tune: at least 1 trial")
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
        "chain": a.chain,
        "gate_dropout": a.gate_dropout,
        "task_experts": a.task_experts,
        "shared_experts": a.shared_experts,
        "levels": a.levels,
        "position_buckets": a.position_tower,
        "dropout": a.dropout,
        "embedding_dropout": a.embedding_dropout,
        "interaction_dim": a.interaction_dim,
        "wide": a.wide,
        "crosses": a.cross,
        "cross_max": a.cross_max,
        "cross_buckets": a.cross_buckets,
        "cross_mode": a.cross_mode,
        "cross_dim": a.cross_dim,
    }
    tc = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, patience=a.patience,
                     weight_decay=a.weight_decay,
                     embedding_weight_decay=a.embedding_weight_decay,
                     embedding_lr_mult=a.embedding_lr_mult,
                     loss_weights=a.loss_weights, seed=a.seed, progress=not a.no_progress,
                     loss_balance=a.loss_balance, gradnorm_alpha=a.gradnorm_alpha,
                     calibration=a.calibration)
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
    if a.min_count is not None:
        spec = spec.with_min_count(a.min_count)
    out = a.out or Path("runs") / spec.name
    tracker = _tracker(a.track, spec.name) if is_main_process() else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(process_group())  # a group only under torchrun (WORLD_SIZE set)
        stack.enter_context(step_log(a.step_log))
        if tracker:
            stack.enter_context(tracker.run(out.name, {"argv": " ".join(argv), "out": str(out)}))
        if a.tune:
            from training.tune import tune_and_train

            timeout = a.tune_timeout_min * 60 if a.tune_timeout_min else None
            report = tune_and_train(spec, out, model_kw, tc, n_trials=a.tune, timeout_s=timeout,
                                    data_dir=a.data, baselines=a.baselines, seeds=a.seeds,
                                    tracker=tracker)
        else:
            report = run_training(spec, out, model_kw, tc, data_dir=a.data,
                                  baselines=a.baselines, seeds=a.seeds, tracker=tracker)
    if is_main_process():
        print(markdown(report))
        print(f"wrote {out}")
    return 0


def _tracker(flag: bool | None, experiment: str) -> Tracker | None:
    """The MLflow tracker `--track` asks for: on, off, or (unset) on when mlflow is installed
    and RANKER_TRACK is not 0. Off without mlflow, with a one-line notice."""
    from training.tracking import NOT_INSTALLED, mlflow_available, open_tracker

    if flag is False or (flag is None and os.environ.get("RANKER_TRACK", "1") == "0"):
        return None
    if not mlflow_available():
        print(NOT_INSTALLED, file=sys.stderr)
        return None
    return open_tracker(experiment)


def tune_main(argv: list[str]) -> int:
    """Search hyperparameters with Optuna on the validation split, then train with the best
    (`ranker train --tune N`; every `ranker train` option applies)."""
    p = argparse.ArgumentParser(prog="ranker tune", description=tune_main.__doc__,
                                epilog="other options: see `ranker train --help`")
    p.add_argument("--trials", type=int, required=True, help="the search's budget in trials")
    p.add_argument("--timeout-min", type=float, help="and in minutes: stop after M minutes")
    a, rest = p.parse_known_args(argv)
    extra = ["--tune", str(a.trials)]
    if a.timeout_min:
        extra += ["--tune-timeout-min", str(a.timeout_min)]
    return train_main([*rest, *extra])


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
