"""Seeded synthetic impression log: users, items, impressions with click, like and share labels.

Each impression's true probabilities are known, so the generator also reports the oracle AUC
(the AUC of the true probabilities on the test split): the ceiling any model can reach.

How a label is drawn (per impression, user u, item i, context c):

    s_k(u, i, c) = interest(u) . A_k . category(i) + user_bias_k[u] + item_bias_k[i]
                   + country_k + device_k + hour_k + surface_k + dense terms      (k = score k)
    z_task = b_task + rho * s_shared + sqrt(1 - rho^2) * s_task      (rho = relatedness knob)
    p_click = sigmoid(z_click)
    like | click ~ Bernoulli(sigmoid(z_like)), like | no click ~ Bernoulli(leak * sigmoid(z_like))

and the same for share, so like and share mostly follow a click and their true marginal
probability is sigmoid(z) * (p_click + leak * (1 - p_click)). The intercepts b_task are solved
so the mean true probabilities hit the target rates. Every term is a function of observed
features (ids, categories, dense values, context), which the model can represent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.metrics import auc

TASKS = ("click", "like", "share")
SPLITS = ("train", "val", "test")
COUNTRIES = ("us", "in", "br", "id", "mx", "de", "gb", "fr", "jp", "ng")
DEVICES = ("android", "ios", "web")
SURFACES = ("home", "search", "related")
DATASET_FILE = "dataset.json"


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes, rates and the relatedness knob of the synthetic dataset."""

    n_users: int = 1000
    n_items: int = 500
    n_impressions: int = 500_000
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train, val, test
    n_interests: int = 8
    n_categories: int = 24
    latent_dim: int = 4
    relatedness: float = 0.7  # rho: 1 = tasks share one score, 0 = independent scores
    click_rate: float = 0.10
    like_rate: float = 0.02
    share_rate: float = 0.004
    leak: float = 0.03  # like/share chance without a click, relative to with one
    signal: float = 1.1  # std of each score s_k: sets how predictable labels are
    id_bias: float = 0.25  # std of the per-user and per-item propensities (shared score)
    id_noise: float = 0.1  # per-id deviation of a user's/item's latent vector from its group
    seed: int = 0

    @classmethod
    def small(cls, **kw: Any) -> SyntheticConfig:
        """A dataset of seconds, for tests."""
        base = {"n_users": 200, "n_items": 150, "n_impressions": 20_000}
        return cls(**{**base, **kw})


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _solve_intercept(z: np.ndarray, target: float, mult: np.ndarray | None = None) -> float:
    """The b with mean(sigmoid(z + b) * mult) == target, by bisection (deterministic)."""
    lo, hi = -20.0, 20.0
    m = 1.0 if mult is None else mult
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(np.mean(_sigmoid(z + mid) * m)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def generate(cfg: SyntheticConfig) -> dict[str, pa.Table]:
    """Build the users, items and impression tables (with labels and true probabilities)."""
    rng = np.random.default_rng(cfg.seed)
    nu, ni, n = cfg.n_users, cfg.n_items, cfg.n_impressions

    # users: categorical and dense raw features, a latent interest vector
    country = rng.choice(len(COUNTRIES), nu, p=_zipf(len(COUNTRIES), 1.0))
    device = rng.choice(len(DEVICES), nu, p=[0.55, 0.35, 0.10])
    interest = rng.integers(0, cfg.n_interests, nu)
    activity = np.floor(rng.lognormal(3.0, 1.0, nu))  # sessions in the last 30 days
    tenure = np.floor(rng.exponential(400.0, nu))
    # items
    category = rng.choice(cfg.n_categories, ni, p=_zipf(cfg.n_categories, 0.6))
    age_days = np.floor(rng.exponential(30.0, ni))
    duration = np.round(rng.lognormal(3.8, 0.7, ni), 1)

    interest_vec = rng.normal(size=(cfg.n_interests, cfg.latent_dim))
    category_vec = rng.normal(size=(cfg.n_categories, cfg.latent_dim))
    u_lat = interest_vec[interest] + cfg.id_noise * rng.normal(size=(nu, cfg.latent_dim))  # (U,L)
    i_lat = category_vec[category] + cfg.id_noise * rng.normal(size=(ni, cfg.latent_dim))  # (I,L)

    # impressions: active users see more; items have a popularity spread
    pu = activity + 1.0
    pi = rng.lognormal(0.0, 0.5, ni)
    uid = rng.choice(nu, n, p=pu / pu.sum())
    iid = rng.choice(ni, n, p=pi / pi.sum())
    hour_p = 1.0 + 0.8 * np.sin((np.arange(24) - 14) / 24 * 2 * np.pi + np.pi / 2)
    hour = rng.choice(24, n, p=hour_p / hour_p.sum())
    surface = rng.choice(len(SURFACES), n, p=[0.6, 0.25, 0.15])

    act_z = _standardize(np.log1p(activity))[uid]
    ten_z = _standardize(np.log1p(tenure))[uid]
    age_z = _standardize(np.log1p(age_days))[iid]
    dur_z = _standardize(np.log1p(duration))[iid]

    def score(id_bias: float) -> np.ndarray:
        """One random score function s_k of the features, scaled to std `signal`."""
        a = rng.normal(size=(cfg.latent_dim, cfg.latent_dim)) / np.sqrt(cfg.latent_dim)
        s = np.einsum("nl,lm,nm->n", u_lat[uid], a, i_lat[iid])  # user-item affinity
        # per-id propensities: only in the shared score, since a task-specific one could not be
        # learned from a sparse task's few positives per id
        s = s + id_bias * (rng.normal(size=nu)[uid] + rng.normal(size=ni)[iid])
        s = s + 0.3 * rng.normal(size=len(COUNTRIES))[country[uid]]
        s = s + 0.3 * rng.normal(size=len(DEVICES))[device[uid]]
        s = s + 0.2 * rng.normal(size=24)[hour] + 0.4 * rng.normal(size=len(SURFACES))[surface]
        w = rng.normal(scale=0.4, size=4)
        s = s + w[0] * act_z + w[1] * ten_z + w[2] * age_z + w[3] * (dur_z - 0.5 * dur_z**2)
        return cfg.signal * _standardize(s)

    rho = float(np.clip(cfg.relatedness, 0.0, 1.0))
    shared = score(cfg.id_bias)
    z = {t: rho * shared + np.sqrt(1 - rho**2) * score(0.0) for t in TASKS}
    p_click = _sigmoid(z["click"] + _solve_intercept(z["click"], cfg.click_rate))
    reach = p_click + cfg.leak * (1 - p_click)  # chance the user engaged enough to like/share
    q = {
        t: _sigmoid(z[t] + _solve_intercept(z[t], rate, reach))
        for t, rate in (("like", cfg.like_rate), ("share", cfg.share_rate))
    }
    click = rng.random(n) < p_click
    gate = np.where(click, 1.0, cfg.leak)
    like = rng.random(n) < q["like"] * gate
    share = rng.random(n) < q["share"] * gate

    users = pa.table(
        {
            "user_id": [f"u{i}" for i in range(nu)],
            "country": [COUNTRIES[c] for c in country],
            "device": [DEVICES[d] for d in device],
            "interest": [f"g{g}" for g in interest],
            "activity_30d": activity,
            "tenure_days": tenure,
        }
    )
    items = pa.table(
        {
            "item_id": [f"i{i}" for i in range(ni)],
            "category": [f"c{c}" for c in category],
            "age_days": age_days,
            "duration_s": duration,
        }
    )
    log = pa.table(
        {
            "user_id": pa.array(np.asarray(users["user_id"])[uid]),
            "item_id": pa.array(np.asarray(items["item_id"])[iid]),
            "hour": hour.astype(np.int32),
            "surface": pa.array(np.asarray(SURFACES)[surface]),
            "click": click.astype(np.int8),
            "like": like.astype(np.int8),
            "share": share.astype(np.int8),
            "p_click": p_click.astype(np.float32),
            "p_like": (q["like"] * reach).astype(np.float32),
            "p_share": (q["share"] * reach).astype(np.float32),
        }
    )
    order = rng.permutation(n)
    cuts = np.cumsum([round(f * n) for f in cfg.split[:2]])
    parts = np.split(order, cuts)
    tables = {"users": users, "items": items}
    for name, idx in zip(SPLITS, parts, strict=True):
        tables[f"impressions_{name}"] = log.take(pa.array(np.sort(idx)))
    return tables


def _zipf(k: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, k + 1) ** a
    return w / w.sum()


def summarize(cfg: SyntheticConfig, tables: dict[str, pa.Table]) -> dict[str, Any]:
    """Sizes, base rates, how often like/share follow a click, and the oracle AUC per task."""
    stats: dict[str, Any] = {"sizes": {k: t.num_rows for k, t in tables.items()}}
    rates: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        t = tables[f"impressions_{split}"]
        rates[split] = {task: float(np.mean(t[task].to_numpy())) for task in TASKS}
    stats["rates"] = rates
    train = tables["impressions_train"]
    click = train["click"].to_numpy().astype(bool)
    stats["after_click"] = {
        task: float(click[train[task].to_numpy().astype(bool)].mean()) for task in ("like", "share")
    }
    test = tables["impressions_test"]
    stats["oracle_auc"] = {
        task: auc(test[task].to_numpy(), test[f"p_{task}"].to_numpy()) for task in TASKS
    }
    return stats


def write_dataset(cfg: SyntheticConfig, out: Path) -> dict[str, Any]:
    """Generate and write the parquet files and dataset.json into `out`; return dataset.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = generate(cfg)
    h = hashlib.sha256()
    for name in sorted(tables):
        path = out / f"{name}.parquet"
        pq.write_table(tables[name], path)
        h.update(name.encode())
        h.update(path.read_bytes())
    info = {
        "dataset": "synthetic",
        "seed": cfg.seed,
        "config": asdict(cfg),
        **summarize(cfg, tables),
        "sha256": h.hexdigest(),
    }
    # dataset.json last: its presence means the directory is complete
    (out / DATASET_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_dataset_info(data_dir: Path) -> dict[str, Any] | None:
    path = Path(data_dir) / DATASET_FILE
    return json.loads(path.read_text()) if path.is_file() else None
