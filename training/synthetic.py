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

Each s_k is standardised to std `signal` with the mean and std it has over the sampled
impressions. All of it (users, items, latent vectors, the parameters of each s_k, those
standardisation constants, the intercepts, rho, leak) is a `World`, written next to the tables
(world.npz, world.json), so that `World.probabilities` answers "what is the true p(click),
p(like), p(share) of user u for item i in context (hour, surface)?" for any pair, which is what
`ranker simulate` draws its users' behaviour from.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass, fields
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
    # position bias (off at 0): each impression gets a position 0..n_positions-1 from a logging
    # policy that favours "promoted" items (a per-item propensity unrelated to relevance), and
    # is clicked with e(p) * p_click, e(p) = (1 + p)^-position_bias (sim/core.py's PositionModel)
    position_bias: float = 0.0
    n_positions: int = 10
    promotion: float = 1.5  # std of the items' promotion propensity in the logging policy
    # the users' recent items (off at 0): up to history_len item ids per user, drawn from the
    # categories the user's own latent vector prefers (so the history says what the user
    # likes), popular items more often; a share of the users has none (a new user)
    history_len: int = 0
    history_empty_share: float = 0.1
    history_focus: float = 0.7  # how strongly the history follows the user's preferences
    # wider entities (off at 0): that many extra dense and categorical columns per user and
    # per item, noise the labels do not depend on (record size, encode and load cost)
    extra_user_features: int = 0
    extra_item_features: int = 0

    @classmethod
    def small(cls, **kw: Any) -> SyntheticConfig:
        """A dataset of seconds, for tests."""
        base = {"n_users": 200, "n_items": 150, "n_impressions": 20_000}
        return cls(**{**base, **kw})

    @classmethod
    def production(cls, scale: float = 1.0, **kw: Any) -> SyntheticConfig:
        """The production-size world (issue 20): 1 M users, 100 k items, 10 M impressions, a
        20-item history and tens of features per entity; `scale` shrinks every count (0.01:
        the same shape at 1 %, for tests and measured fractions)."""
        base: dict[str, Any] = {
            "n_users": max(10, round(1_000_000 * scale)),
            "n_items": max(10, round(100_000 * scale)),
            "n_impressions": max(1000, round(10_000_000 * scale)),
            "history_len": 20, "extra_user_features": 20, "extra_item_features": 20,
        }
        return cls(**{**base, **kw})

    @property
    def is_wide(self) -> bool:
        return bool(self.history_len or self.extra_user_features or self.extra_item_features)


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


def hour_probabilities() -> np.ndarray:
    """P(hour) of an impression: a daily cycle peaking in the evening."""
    hour_p = 1.0 + 0.8 * np.sin((np.arange(24) - 14) / 24 * 2 * np.pi + np.pi / 2)
    return hour_p / hour_p.sum()


SURFACE_P = (0.6, 0.25, 0.15)  # P(surface), in SURFACES order
SCORES = ("shared", *TASKS)  # the score functions s_k: one shared by all tasks, one per task
WORLD_NPZ = "world.npz"
WORLD_JSON = "world.json"
WORLD_FORMAT = 1


@dataclass(eq=False)  # arrays: compare fields with numpy, not ==
class World:
    """Everything the generator drew: users, items and the hidden parameters of the true
    probabilities, so that p_task(user, item, context) can be asked for any pair and context.

    Arrays indexed by score k follow SCORES (shared, click, like, share). The standardisation
    constants (`score_mean`, `score_std`) and the intercepts were computed on the impressions the
    generator sampled; they are constants of the world, not recomputed on other pairs.
    """

    config: SyntheticConfig
    # users (U,)
    country: np.ndarray
    device: np.ndarray
    interest: np.ndarray
    activity: np.ndarray
    tenure: np.ndarray
    # items (I,)
    category: np.ndarray
    age_days: np.ndarray
    duration: np.ndarray
    popularity: np.ndarray  # relative chance of an item to be shown (the generator's draw)
    # latent vectors
    user_latent: np.ndarray  # (U, L)
    item_latent: np.ndarray  # (I, L)
    # standardised dense features, over users / over items (U,), (I,)
    activity_z: np.ndarray
    tenure_z: np.ndarray
    age_z: np.ndarray
    duration_z: np.ndarray
    # per score k: s_k before standardisation, see _raw_score
    affinity: np.ndarray  # (K, L, L)
    id_scale: np.ndarray  # (K,) id_bias of the score (0 for the task scores)
    user_bias: np.ndarray  # (K, U) unscaled
    item_bias: np.ndarray  # (K, I) unscaled
    country_effect: np.ndarray  # (K, len(COUNTRIES))
    device_effect: np.ndarray  # (K, len(DEVICES))
    hour_effect: np.ndarray  # (K, 24)
    surface_effect: np.ndarray  # (K, len(SURFACES))
    dense_weight: np.ndarray  # (K, 4): activity, tenure, age, duration (quadratic)
    score_mean: np.ndarray  # (K,) mean of the raw s_k over the sampled impressions
    score_std: np.ndarray  # (K,) its std
    intercept: np.ndarray  # (T,) b_task, TASKS order
    rho: float
    leak: float

    @property
    def n_users(self) -> int:
        return len(self.activity)

    @property
    def n_items(self) -> int:
        return len(self.popularity)

    def user_weights(self) -> np.ndarray:
        """P(user) of an impression: active users are shown more (the generator's draw)."""
        pu = self.activity + 1.0
        return pu / pu.sum()

    def item_weights(self) -> np.ndarray:
        """P(item) of an impression: the popularity spread (the generator's draw)."""
        return self.popularity / self.popularity.sum()

    def _raw_score(self, k: int, uid: np.ndarray, iid: np.ndarray, hour: np.ndarray,
                   surface: np.ndarray) -> np.ndarray:
        """s_k before standardisation; the generator's expression, term by term, so that on the
        sampled impressions it is bit for bit what the generator computed."""
        s = np.einsum("nl,lm,nm->n", self.user_latent[uid], self.affinity[k],
                      self.item_latent[iid])  # user-item affinity
        s = s + self.id_scale[k] * (self.user_bias[k][uid] + self.item_bias[k][iid])
        s = s + self.country_effect[k][self.country[uid]]
        s = s + self.device_effect[k][self.device[uid]]
        s = s + self.hour_effect[k][hour] + self.surface_effect[k][surface]
        w = self.dense_weight[k]
        dur_z = self.duration_z[iid]
        return (s + w[0] * self.activity_z[uid] + w[1] * self.tenure_z[uid]
                + w[2] * self.age_z[iid] + w[3] * (dur_z - 0.5 * dur_z**2))

    def _score(self, k: int, *idx: np.ndarray) -> np.ndarray:
        s = self._raw_score(k, *idx)
        return self.config.signal * ((s - self.score_mean[k]) / (self.score_std[k] + 1e-12))

    def logits(self, uid: np.ndarray, iid: np.ndarray, hour: np.ndarray,
               surface: np.ndarray) -> dict[str, np.ndarray]:
        """z_task without the intercept: rho * s_shared + sqrt(1 - rho^2) * s_task."""
        shared = self._score(0, uid, iid, hour, surface)
        return {t: self.rho * shared + np.sqrt(1 - self.rho**2) * self._score(k + 1, uid, iid,
                                                                              hour, surface)
                for k, t in enumerate(TASKS)}

    def conditionals(self, user_idx: Any, item_idx: Any, hour: Any,
                     surface: Any) -> dict[str, np.ndarray]:
        """p_click, and q_like, q_share: like | click ~ Bernoulli(q), like | no click ~
        Bernoulli(leak * q) (the same for share). Arguments broadcast; surface by index or name.
        """
        uid, iid, h, sf = self._indices(user_idx, item_idx, hour, surface)
        z = self.logits(uid, iid, h, sf)
        return {t: _sigmoid(z[t] + self.intercept[j]) for j, t in enumerate(TASKS)}

    def probabilities(self, user_idx: Any, item_idx: Any, hour: Any,
                      surface: Any) -> dict[str, np.ndarray]:
        """The true marginal p(click), p(like), p(share) of user u for item i in context
        (hour, surface); vectorised, arguments broadcast; surface by index or by name."""
        c = self.conditionals(user_idx, item_idx, hour, surface)
        reach = c["click"] + self.leak * (1 - c["click"])
        return {"click": c["click"], "like": c["like"] * reach, "share": c["share"] * reach}

    def _indices(self, user_idx: Any, item_idx: Any, hour: Any,
                 surface: Any) -> tuple[np.ndarray, ...]:
        sf = np.asarray(surface)
        if sf.dtype.kind in "USO":  # names
            sf = surface_index(sf)
        uid, iid, h, sf = np.broadcast_arrays(np.asarray(user_idx), np.asarray(item_idx),
                                              np.asarray(hour), sf)
        for name, a, n in (("user", uid, self.n_users), ("item", iid, self.n_items),
                           ("hour", h, 24), ("surface", sf, len(SURFACES))):
            if a.dtype.kind not in "iu":
                raise TypeError(f"{name} indices must be integers, got {a.dtype}")
            if a.size and (a.min() < 0 or a.max() >= n):
                raise IndexError(f"{name} index out of range [0, {n}): {a.min()}..{a.max()}")
        return tuple(np.atleast_1d(a).ravel() if a.ndim == 0 else a for a in (uid, iid, h, sf))

    def user_index(self, ids: Any) -> np.ndarray:
        """u<k> -> k; an id of no user of this world is an error that names it."""
        return _id_index(ids, "u", self.n_users, "user")

    def item_index(self, ids: Any) -> np.ndarray:
        """i<k> -> k; an id of no item of this world is an error that names it."""
        return _id_index(ids, "i", self.n_items, "item")

    def save(self, out: Path) -> None:
        """world.npz (the arrays) and world.json (config and scalars) into `out`."""
        out = Path(out)
        arrays = {f.name: getattr(self, f.name) for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        _write_npz(out / WORLD_NPZ, arrays)
        meta = {"format": WORLD_FORMAT, "config": asdict(self.config), "rho": self.rho,
                "leak": self.leak, "tasks": list(TASKS), "scores": list(SCORES),
                "countries": list(COUNTRIES), "devices": list(DEVICES),
                "surfaces": list(SURFACES),
                "npz_sha256": hashlib.sha256((out / WORLD_NPZ).read_bytes()).hexdigest()}
        (out / WORLD_JSON).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, data_dir: Path) -> World:
        """The world `write_dataset` saved in `data_dir`."""
        data_dir = Path(data_dir)
        meta_path, npz_path = data_dir / WORLD_JSON, data_dir / WORLD_NPZ
        if not meta_path.is_file() or not npz_path.is_file():
            raise FileNotFoundError(f"no world in {data_dir} (want {WORLD_JSON} and {WORLD_NPZ}; "
                                    f"`ranker data --out {data_dir}` writes them)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != WORLD_FORMAT:
            raise ValueError(f"{meta_path}: world format {meta.get('format')!r}, "
                             f"expected {WORLD_FORMAT}")
        if hashlib.sha256(npz_path.read_bytes()).hexdigest() != meta["npz_sha256"]:
            raise ValueError(f"{npz_path} does not match the sha256 in {meta_path}")
        cfg_kw = dict(meta["config"])
        cfg_kw["split"] = tuple(cfg_kw["split"])
        with np.load(npz_path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls(config=SyntheticConfig(**cfg_kw), rho=float(meta["rho"]),
                   leak=float(meta["leak"]), **arrays)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed without the time stamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)


def surface_index(names: Any) -> np.ndarray:
    """Surface names -> indices into SURFACES; an unknown surface is an error naming it."""
    arr = np.asarray(names)
    out = np.empty(arr.shape, dtype=np.int64)
    for pos, name in np.ndenumerate(arr):
        try:
            out[pos] = SURFACES.index(str(name))
        except ValueError:
            raise KeyError(f"unknown surface {str(name)!r}; surfaces are {SURFACES}") from None
    return out


def _id_index(ids: Any, prefix: str, n: int, what: str) -> np.ndarray:
    arr = np.asarray(ids)
    out = np.empty(arr.shape, dtype=np.int64)
    for pos, raw in np.ndenumerate(arr):
        text = str(raw)
        digits = text[len(prefix):]
        k = int(digits) if text.startswith(prefix) and digits.isdigit() else -1
        if not 0 <= k < n or digits != str(k):
            raise KeyError(f"unknown {what} id {text!r}: this world has {prefix}0..{prefix}{n - 1}")
        out[pos] = k
    return out


def _draw_score_params(rng: np.random.Generator, cfg: SyntheticConfig, id_bias: float,
                       nu: int, ni: int) -> dict[str, Any]:
    """The parameters of one score function s_k, in the generator's draw order."""
    a = rng.normal(size=(cfg.latent_dim, cfg.latent_dim)) / np.sqrt(cfg.latent_dim)
    # per-id propensities: only in the shared score, since a task-specific one could not be
    # learned from a sparse task's few positives per id
    ub, ib = rng.normal(size=nu), rng.normal(size=ni)
    country = 0.3 * rng.normal(size=len(COUNTRIES))
    device = 0.3 * rng.normal(size=len(DEVICES))
    hour = 0.2 * rng.normal(size=24)
    surface = 0.4 * rng.normal(size=len(SURFACES))
    w = rng.normal(scale=0.4, size=4)
    return {"affinity": a, "id_scale": id_bias, "user_bias": ub, "item_bias": ib,
            "country_effect": country, "device_effect": device, "hour_effect": hour,
            "surface_effect": surface, "dense_weight": w}


def _draw_entities(cfg: SyntheticConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The users, items, their latent vectors and the items' popularity, in the generator's draw
    order; keyed by World's field names."""
    nu, ni = cfg.n_users, cfg.n_items
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
    # items have a popularity spread (their chance to be shown)
    pi = rng.lognormal(0.0, 0.5, ni)
    return {"country": country, "device": device, "interest": interest, "activity": activity,
            "tenure": tenure, "category": category, "age_days": age_days, "duration": duration,
            "popularity": pi, "user_latent": u_lat, "item_latent": i_lat}


def _assemble_world(cfg: SyntheticConfig, rng: np.random.Generator,
                    entities: dict[str, np.ndarray]) -> World:
    """The World of `entities`: its score parameters drawn now (after everything else the
    generator draws first: that order fixes the dataset), its constants still to `_calibrate`."""
    params = [_draw_score_params(rng, cfg, cfg.id_bias if k == "shared" else 0.0,
                                 cfg.n_users, cfg.n_items) for k in SCORES]
    e = entities
    return World(
        config=cfg, **e,
        activity_z=_standardize(np.log1p(e["activity"])),
        tenure_z=_standardize(np.log1p(e["tenure"])),
        age_z=_standardize(np.log1p(e["age_days"])),
        duration_z=_standardize(np.log1p(e["duration"])),
        **{key: np.stack([np.asarray(p[key], dtype=np.float64) for p in params])
           for key in params[0]},
        score_mean=np.zeros(len(SCORES)), score_std=np.ones(len(SCORES)),
        intercept=np.zeros(len(TASKS)), rho=float(np.clip(cfg.relatedness, 0.0, 1.0)),
        leak=cfg.leak,
    )


def _calibrate(world: World, uid: np.ndarray, iid: np.ndarray, hour: np.ndarray,
               surface: np.ndarray) -> np.ndarray:
    """The standardisation constants and intercepts of `world`, computed on these impressions;
    the impressions' chance of engaging enough to like/share (`reach`)."""
    cfg = world.config
    for k in range(len(SCORES)):
        raw = world._raw_score(k, uid, iid, hour, surface)
        world.score_mean[k], world.score_std[k] = raw.mean(), raw.std()
    z = world.logits(uid, iid, hour, surface)
    world.intercept[0] = _solve_intercept(z["click"], cfg.click_rate)
    p_click = _sigmoid(z["click"] + world.intercept[0])
    reach: np.ndarray = p_click + cfg.leak * (1 - p_click)
    for j, (t, rate) in enumerate((("like", cfg.like_rate), ("share", cfg.share_rate)), 1):
        world.intercept[j] = _solve_intercept(z[t], rate, reach)
    return reach


def _draw_labels(rng: np.random.Generator, q: dict[str, np.ndarray], leak: float,
                 examination: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each impression's click (of an examined item, where `examination` is given), like and
    share, drawn from the true conditionals `q`; like and share mostly after a click (`leak`)."""
    n = len(q["click"])
    click = rng.random(n) < (q["click"] if examination is None else q["click"] * examination)
    gate = np.where(click, 1.0, leak)
    like = rng.random(n) < q["like"] * gate
    share = rng.random(n) < q["share"] * gate
    return {"click": click, "like": like, "share": share}


def _log_table(user_id: Any, item_id: Any, hour: np.ndarray, surface: np.ndarray,
               labels: dict[str, np.ndarray], q: dict[str, np.ndarray], reach: np.ndarray
               ) -> pa.Table:
    """The impression log: ids, context, the drawn labels and the true probabilities."""
    return pa.table({
        "user_id": user_id,
        "item_id": item_id,
        "hour": hour.astype(np.int32),
        "surface": pa.array(np.asarray(SURFACES)[surface]),
        **{t: labels[t].astype(np.int8) for t in TASKS},
        "p_click": q["click"].astype(np.float32),
        "p_like": (q["like"] * reach).astype(np.float32),
        "p_share": (q["share"] * reach).astype(np.float32),
    })


def generate_world(cfg: SyntheticConfig) -> tuple[World, dict[str, pa.Table]]:
    """Draw the world and the users, items and impression tables (labels, true probabilities)."""
    rng = np.random.default_rng(cfg.seed)
    nu, ni, n = cfg.n_users, cfg.n_items, cfg.n_impressions
    e = _draw_entities(cfg, rng)

    # impressions: active users see more, popular items are shown more
    pu = e["activity"] + 1.0
    uid = rng.choice(nu, n, p=pu / pu.sum())
    iid = rng.choice(ni, n, p=e["popularity"] / e["popularity"].sum())
    hour = rng.choice(24, n, p=hour_probabilities())
    surface = rng.choice(len(SURFACES), n, p=list(SURFACE_P))

    # the score parameters are drawn after the impressions: that order fixes the dataset
    world = _assemble_world(cfg, rng, e)
    # standardisation constants and intercepts: computed on the sampled impressions
    reach = _calibrate(world, uid, iid, hour, surface)
    q = world.conditionals(uid, iid, hour, surface)
    position = examination = None
    if cfg.position_bias > 0:
        # its own stream: the draws of the default dataset stay exactly as they were
        position, examination = _positions(cfg, iid, ni)
    labels = _draw_labels(rng, q, cfg.leak, examination)

    users = pa.table(
        {
            "user_id": [f"u{i}" for i in range(nu)],
            "country": [COUNTRIES[c] for c in world.country],
            "device": [DEVICES[d] for d in world.device],
            "interest": [f"g{g}" for g in world.interest],
            "activity_30d": world.activity,
            "tenure_days": world.tenure,
        }
    )
    items = pa.table(
        {
            "item_id": [f"i{i}" for i in range(ni)],
            "category": [f"c{c}" for c in world.category],
            "age_days": world.age_days,
            "duration_s": world.duration,
        }
    )
    if cfg.is_wide:  # their own streams: the default world's draws stay exactly as they were
        users, items = widen_tables(cfg, users, items, world.user_latent, world.item_latent,
                                    world.category, world.popularity, world.affinity[0])
    log = _log_table(pa.array(np.asarray(users["user_id"])[uid]),
                     pa.array(np.asarray(items["item_id"])[iid]), hour, surface, labels, q, reach)
    if position is not None and examination is not None:
        log = log.append_column("position", pa.array(position.astype(np.int32)))
        log = log.append_column("examination", pa.array(examination.astype(np.float32)))
    order = rng.permutation(n)
    cuts = np.cumsum([round(f * n) for f in cfg.split[:2]])
    parts = np.split(order, cuts)
    tables = {"users": users, "items": items}
    for name, idx in zip(SPLITS, parts, strict=True):
        tables[f"impressions_{name}"] = log.take(pa.array(np.sort(idx)))
    return world, tables


HISTORY_COLUMN = "recent_items"  # the users' list feature: their recent item ids
EXTRA_CATEGORIES = 16  # values of each extra categorical column


def widen_tables(cfg: SyntheticConfig, users: pa.Table, items: pa.Table, u_lat: np.ndarray,
                 i_lat: np.ndarray, category: np.ndarray, popularity: np.ndarray,
                 affinity: np.ndarray, user_offset: int = 0) -> tuple[pa.Table, pa.Table]:
    """The users' history column and the extra columns of both tables (config permitting)."""
    if cfg.history_len:
        hist = draw_history(cfg, u_lat, i_lat, category, popularity, affinity, user_offset)
        users = users.append_column(HISTORY_COLUMN, hist)
    users = _extra_columns(users, cfg.extra_user_features, "u", [cfg.seed, 21, user_offset])
    items = _extra_columns(items, cfg.extra_item_features, "i", [cfg.seed, 22])
    return users, items


def _extra_columns(table: pa.Table, n: int, code: str, seed: list[int]) -> pa.Table:
    """n extra columns, alternating dense (lognormal) and categorical (k0..k15), of noise."""
    rng = np.random.default_rng(seed)
    rows = table.num_rows
    names = np.array([f"k{v}" for v in range(EXTRA_CATEGORIES)])
    for j in range(n):
        if j % 2 == 0:
            table = table.append_column(f"{code}_x{j}", pa.array(
                np.round(rng.lognormal(1.0, 1.0, rows), 3)))
        else:
            table = table.append_column(f"{code}_k{j}", pa.array(
                names[rng.integers(0, EXTRA_CATEGORIES, rows)]))
    return table


def draw_history(cfg: SyntheticConfig, u_lat: np.ndarray, i_lat: np.ndarray,
                 category: np.ndarray, popularity: np.ndarray, affinity: np.ndarray,
                 user_offset: int = 0, chunk: int = 50_000) -> pa.ListArray:
    """Each user's recent item ids (list<string>, most recent first, up to history_len):
    categories drawn by softmax(focus * u A c) over the category centroids c, an item of the
    category by popularity. Vectorised in chunks of users (bounded memory)."""
    rng = np.random.default_rng([cfg.seed, 20, user_offset])
    nu, ni, h = len(u_lat), len(i_lat), cfg.history_len
    n_cat = cfg.n_categories
    counts = np.bincount(category, minlength=n_cat).astype(np.float64)  # (C,)
    centroid = np.stack([np.bincount(category, i_lat[:, d], n_cat) for d in range(i_lat.shape[1])],
                        1) / np.maximum(counts, 1)[:, None]  # (C, L)
    present = counts > 0
    order = np.argsort(category, kind="stable")  # items grouped by category
    pop = popularity[order]
    cum = np.cumsum(pop)  # (I,)
    cat_end = np.cumsum(np.bincount(category, popularity, n_cat))  # (C,) cum popularity
    cat_start = cat_end - np.bincount(category, popularity, n_cat)
    lengths = np.where(rng.random(nu) < cfg.history_empty_share, 0, rng.integers(1, h + 1, nu))
    picks = np.empty((nu, h), np.int64)
    for a in range(0, nu, chunk):
        b = min(nu, a + chunk)
        logits = cfg.history_focus * (u_lat[a:b] @ affinity @ centroid.T)  # (n, C)
        logits[:, ~present] = -np.inf
        p = np.exp(logits - logits.max(1, keepdims=True))
        cdf = np.cumsum(p / p.sum(1, keepdims=True), axis=1)  # (n, C)
        r = rng.random((b - a, h))
        cats = np.minimum((r[:, :, None] > cdf[:, None, :]).sum(-1), n_cat - 1)  # (n, H)
        u = cat_start[cats] + rng.random((b - a, h)) * (cat_end[cats] - cat_start[cats])
        picks[a:b] = order[np.minimum(np.searchsorted(cum, u, side="right"), ni - 1)]
    keep = np.arange(h)[None, :] < lengths[:, None]  # (U, H)
    flat = picks[keep]  # row-major: each user's ids in order
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = pa.array(np.char.add("i", flat.astype(str))) if len(flat) else pa.array([], pa.string())
    if isinstance(ids, pa.ChunkedArray):  # pyarrow chunks a large numpy string conversion
        ids = ids.combine_chunks()
    return pa.ListArray.from_arrays(pa.array(offsets), ids)


def _positions(cfg: SyntheticConfig, iid: np.ndarray, ni: int) -> tuple[np.ndarray, np.ndarray]:
    """(position, e(position)) per impression: promoted items are shown higher."""
    prng = np.random.default_rng([cfg.seed, 18])
    promo = cfg.promotion * prng.normal(size=ni)  # (I,)
    score = promo[iid] + prng.normal(size=len(iid))  # (N,) the logging policy's score
    top = 1.0 / (1.0 + np.exp(score))  # in (0, 1): high score -> near 0 (the top)
    position = np.minimum((top * cfg.n_positions).astype(np.int64), cfg.n_positions - 1)
    return position, (1.0 + position) ** -cfg.position_bias


def generate(cfg: SyntheticConfig) -> dict[str, pa.Table]:
    """Build the users, items and impression tables (with labels and true probabilities)."""
    return generate_world(cfg)[1]


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
    """Generate and write the parquet files, the world (world.npz, world.json) and dataset.json
    into `out`; return dataset.json."""
    if cfg.is_wide:  # the production profile: streamed in chunks (bounded memory)
        from training.bigworld import write_streamed

        return write_streamed(cfg, out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world, tables = generate_world(cfg)
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
        "sha256": h.hexdigest(),  # of the parquet files
    }
    world.save(out)  # the hidden parameters, for `ranker simulate` (World.load)
    info["world_sha256"] = hashlib.sha256((out / WORLD_NPZ).read_bytes()).hexdigest()
    # dataset.json last: its presence means the directory is complete
    (out / DATASET_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_dataset_info(data_dir: Path) -> dict[str, Any] | None:
    path = Path(data_dir) / DATASET_FILE
    return json.loads(path.read_text()) if path.is_file() else None
