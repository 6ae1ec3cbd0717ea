"""The production-size world, generated in chunks: bounded memory at 10 M impressions (issue 20).

The same model of the world as `training.synthetic` (the same `World`, score functions and
label rule), drawn in another order so that it can stream: the users and items first (they are
the world, and are held), the score parameters, then the standardisation constants and the
intercepts on a calibration sample of impressions (constants of the world, as there), then the
impressions chunk by chunk, each chunk from its own seeded stream and split into train / val /
test row by row, appended to three Parquet files. Memory is the entity tables plus one chunk;
the result depends on the config and the chunk size (`CHUNK` unless told).

`write_dataset` sends every wide config (`SyntheticConfig.is_wide`: the production profile)
here; the default world keeps its in-memory generator and its exact bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.metrics import auc
from training.synthetic import (
    COUNTRIES,
    DATASET_FILE,
    DEVICES,
    SPLITS,
    SURFACE_P,
    SURFACES,
    TASKS,
    WORLD_NPZ,
    SyntheticConfig,
    World,
    _assemble_world,
    _calibrate,
    _draw_entities,
    _draw_labels,
    _log_table,
    hour_probabilities,
    widen_tables,
)

CHUNK = 1_000_000  # impressions drawn and written per step
CALIBRATION = 1_000_000  # impressions the constants of the world are computed on


def draw_world(cfg: SyntheticConfig) -> tuple[World, pa.Table, pa.Table]:
    """The users, items and score parameters; constants from a calibration sample."""
    if cfg.position_bias > 0:
        raise ValueError("the streamed world has no position bias (use the default world)")
    rng = np.random.default_rng([cfg.seed, 30])
    nu, ni = cfg.n_users, cfg.n_items
    world = _assemble_world(cfg, rng, _draw_entities(cfg, rng))
    _calibrate(world, *draw_impressions(world, np.random.default_rng([cfg.seed, 31]),
                                        min(cfg.n_impressions, CALIBRATION)))
    users = pa.table({
        "user_id": pa.array(np.char.add("u", np.arange(nu).astype(str))),
        "country": pa.array(np.asarray(COUNTRIES)[world.country]),
        "device": pa.array(np.asarray(DEVICES)[world.device]),
        "interest": pa.array(np.char.add("g", world.interest.astype(str))),
        "activity_30d": world.activity,
        "tenure_days": world.tenure,
    })
    items = pa.table({
        "item_id": pa.array(np.char.add("i", np.arange(ni).astype(str))),
        "category": pa.array(np.char.add("c", world.category.astype(str))),
        "age_days": world.age_days,
        "duration_s": world.duration,
    })
    users, items = widen_tables(cfg, users, items, world.user_latent, world.item_latent,
                                world.category, world.popularity, world.affinity[0])
    return world, users, items


def draw_impressions(world: World, rng: np.random.Generator, n: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, hour, surface) indices of n impressions, drawn as the default world's."""
    uid = rng.choice(world.n_users, n, p=world.user_weights())
    iid = rng.choice(world.n_items, n, p=world.item_weights())
    hour = rng.choice(24, n, p=hour_probabilities())
    surface = rng.choice(len(SURFACES), n, p=list(SURFACE_P))
    return uid, iid, hour, surface


def impressions_chunk(world: World, users: pa.Table, items: pa.Table, c: int, n: int
                      ) -> tuple[pa.Table, np.ndarray]:
    """Chunk c of the log (n rows) and each row's split (0 train, 1 val, 2 test)."""
    cfg = world.config
    rng = np.random.default_rng([cfg.seed, 32, c])
    uid, iid, hour, surface = draw_impressions(world, rng, n)
    q = world.conditionals(uid, iid, hour, surface)
    labels = _draw_labels(rng, q, cfg.leak)
    reach = q["click"] + cfg.leak * (1 - q["click"])
    split = rng.choice(len(SPLITS), n, p=list(cfg.split))
    log = _log_table(pc.take(users["user_id"], pa.array(uid)),
                     pc.take(items["item_id"], pa.array(iid)), hour, surface, labels, q, reach)
    return log, split


def write_streamed(cfg: SyntheticConfig, out: Path, chunk: int = CHUNK,
                   progress: bool = False) -> dict[str, Any]:
    """Generate and write the world as `write_dataset` does (same files, same dataset.json
    keys), the impressions `chunk` at a time."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world, users, items = draw_world(cfg)
    pq.write_table(users, out / "users.parquet")
    pq.write_table(items, out / "items.parquet")
    writers: dict[str, pq.ParquetWriter] = {}
    sizes = dict.fromkeys(SPLITS, 0)
    positives = {s: np.zeros(len(TASKS)) for s in SPLITS}
    clicked_and = np.zeros(2)  # train: like / share rows that were clicked
    task_rows = np.zeros(2)
    test_y: list[np.ndarray] = []
    test_p: list[np.ndarray] = []
    chunks = range(0, cfg.n_impressions, chunk)
    try:
        for c, start in enumerate(chunks):
            log, split = impressions_chunk(world, users, items, c,
                                           min(chunk, cfg.n_impressions - start))
            for j, name in enumerate(SPLITS):
                part = log.filter(pa.array(split == j))
                if name not in writers:
                    writers[name] = pq.ParquetWriter(out / f"impressions_{name}.parquet",
                                                     part.schema)
                writers[name].write_table(part)
                sizes[name] += part.num_rows
                y = np.stack([part[t].to_numpy() for t in TASKS], 1)  # (n, T)
                positives[name] += y.sum(0)
                if name == "train":
                    for k in (1, 2):
                        task_rows[k - 1] += y[:, k].sum()
                        clicked_and[k - 1] += (y[:, k] * y[:, 0]).sum()
                if name == "test":
                    test_y.append(y.astype(np.int8))
                    test_p.append(np.stack([part[f"p_{t}"].to_numpy() for t in TASKS], 1))
            if progress:
                print(f"impressions {start + len(split):,} / {cfg.n_impressions:,} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        for w in writers.values():
            w.close()
    ty, tp = np.concatenate(test_y), np.concatenate(test_p)
    h = hashlib.sha256()
    names = ["items", *(f"impressions_{s}" for s in SPLITS), "users"]
    for name in sorted(names):
        path = out / f"{name}.parquet"
        h.update(name.encode())
        with open(path, "rb") as f:  # the generator's recipe: the name, then the bytes
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    info: dict[str, Any] = {
        "dataset": "synthetic",
        "seed": cfg.seed,
        "config": asdict(cfg),
        "sizes": {"users": users.num_rows, "items": items.num_rows,
                  **{f"impressions_{s}": sizes[s] for s in SPLITS}},
        "rates": {s: {t: float(positives[s][j] / max(sizes[s], 1))
                      for j, t in enumerate(TASKS)} for s in SPLITS},
        "after_click": {t: float(clicked_and[k] / max(task_rows[k], 1))
                        for k, t in enumerate(("like", "share"))},
        "oracle_auc": {t: auc(ty[:, j], tp[:, j]) for j, t in enumerate(TASKS)},
        "sha256": h.hexdigest(),
        "streamed": {"chunk": chunk, "calibration": min(cfg.n_impressions, CALIBRATION),
                     "seconds": round(time.perf_counter() - started, 1)},
    }
    world.save(out)
    info["world_sha256"] = hashlib.sha256((out / WORLD_NPZ).read_bytes()).hexdigest()
    (out / DATASET_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info
