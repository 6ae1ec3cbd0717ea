"""The `ranker` command: one entry point, a subcommand per job.

Each job lives in its own module and parses its own arguments; this table only dispatches, so
`ranker serve` never imports torch and `ranker train` never imports the web stack.
"""

from __future__ import annotations

import importlib
import sys

# "subcommand words" -> "module:function(argv) -> int | None"
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("train",): ("launch.train:train_main", "train a model (and its baselines) and evaluate it"),
    ("tune",): ("launch.train:tune_main", "search hyperparameters (Optuna), then train the best"),
    ("export",): ("launch.train:export_main", "export a checkpoint to the model repository"),
    ("data",): ("launch.train:data_main", "generate the synthetic dataset"),
    ("experiment", "mmoe-synthetic"): (
        "training.experiments.synthetic:main",
        "reproduce the MMoE paper's task-correlation experiment",
    ),
    ("experiment", "report"): (
        "launch.experiment:report_main",
        "an A/B experiment's report: rates, lift, CIs, sample ratio",
    ),
    ("features", "load"): ("launch.features:load_main", "load feature tables into Redis"),
    ("serve",): ("launch.serve:main", "serve the ranking API"),
    ("run",): ("launch.mainjob:main", "the main job: train if needed, Redis, load, serve"),
    ("bench",): ("bench.run:main", "run the benchmark suite and write a report"),
    ("simulate",): ("sim.cli:main", "simulated users with known truth call /rank and /feedback"),
    ("logs", "export"): ("launch.logs:export_main", "served log and feedback -> Parquet"),
}


def usage() -> str:
    lines = ["usage: ranker <command> [options]", "", "commands:"]
    for words, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<26} {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    for words, (target, _) in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(args[: len(words)]) == words:
            module_name, func_name = target.split(":")
            func = getattr(importlib.import_module(module_name), func_name)
            result = func(args[len(words) :])
            return int(result or 0)
    print(usage(), file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
    return 0 if args and args[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
