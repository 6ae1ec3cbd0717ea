"""One fit per seed on a generated world with option overrides; prints each task's gap to the
oracle, the best epoch and the validation curves (issue 17's diagnosis: docs/experiments/
world-grid/diagnosis.md). No run directory, no baselines: a probe, not a report.

    python -m training.experiments.probe data/grid/r0 --model-kw '{"interaction_dim": 32}' \\
        --train-kw '{"loss_weights": {"like": 3}}' --id-min-count 10 --id-dim 4 --seeds 0

`--id-min-count` / `--id-dim` set `min_count` / `embedding_dim` of user_id and item_id only
(`ranker train --min-count` sets every listed categorical); a huge min count sends every id to
the out-of-vocabulary bucket (the model without ids).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from training.data import build_schema, encode_split, load_raw
from training.metrics import auc
from training.model import ModelConfig, inputs_from_schema
from training.spec import load_spec
from training.train import TrainConfig, evaluate, fit

IDS = ("user_id", "item_id")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--model", default="mmoe")
    ap.add_argument("--model-kw", default="{}", help="ModelConfig fields, JSON")
    ap.add_argument("--train-kw", default="{}", help="TrainConfig fields, JSON")
    ap.add_argument("--id-min-count", type=int)
    ap.add_argument("--id-dim", type=int)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    spec = load_spec("synthetic")
    ids = {k: v for k, v in (("min_count", a.id_min_count), ("embedding_dim", a.id_dim))
           if v is not None}
    if ids:
        spec = dataclasses.replace(spec, features=[
            dataclasses.replace(f, **ids) if f.name in IDS else f for f in spec.features])
    raw = load_raw(spec, a.data)
    schema = build_schema(spec, raw)
    tr, va, te = (encode_split(spec, schema, raw, s) for s in ("train", "val", "test"))
    assert te.oracle is not None, "a generated world (with true probabilities) is needed"
    tasks = spec.task_names
    oracle = {t: auc(te.labels[:, j], te.oracle[:, j]) for j, t in enumerate(tasks)}
    for seed in (int(s) for s in a.seeds.split(",")):
        cfg = ModelConfig(inputs=inputs_from_schema(schema), tasks=tasks, model_type=a.model,
                          **json.loads(a.model_kw))
        t0 = time.perf_counter()
        model, h = fit(cfg, tr, va, TrainConfig(progress=False, seed=seed,
                                                **json.loads(a.train_kw)))
        ev = evaluate(model, te)
        print(json.dumps({
            "data": str(a.data), "tag": a.tag, "model": a.model, "seed": seed,
            "auc": {t: round(ev[t]["auc"], 4) for t in tasks},
            "gap": {t: round(oracle[t] - ev[t]["auc"], 4) for t in tasks},
            "best_epoch": h.best_epoch, "epochs": len(h.val_loss),
            "val_task_loss": {t: [round(x[t], 5) for x in h.val_task_loss] for t in tasks},
            "train_loss": [round(x, 5) for x in h.train_loss],
            "seconds": round(time.perf_counter() - t0)}), flush=True)


if __name__ == "__main__":
    main()
