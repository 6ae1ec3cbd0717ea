"""The synthetic generator: deterministic, realistic rates, like/share after click, oracle AUC."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.synthetic import (
    SPLITS,
    TASKS,
    SyntheticConfig,
    World,
    generate,
    generate_world,
    write_dataset,
)

EXPECTED_FILES = {
    "users.parquet",
    "items.parquet",
    "impressions_train.parquet",
    "impressions_val.parquet",
    "impressions_test.parquet",
    "dataset.json",
    "world.npz",
    "world.json",
}


def test_writes_the_files_the_feature_loader_reads(small_data: Path) -> None:
    assert {p.name for p in small_data.iterdir()} == EXPECTED_FILES
    users = pq.read_table(small_data / "users.parquet")
    items = pq.read_table(small_data / "items.parquet")
    log = pq.read_table(small_data / "impressions_test.parquet")
    assert users.column_names[0] == "user_id" and users["user_id"][0].as_py() == "u0"
    assert items.column_names[0] == "item_id" and items["item_id"][0].as_py() == "i0"
    for col in ("user_id", "item_id", "hour", "surface", "click", "like", "share",
                "p_click", "p_like", "p_share"):
        assert col in log.column_names, col


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path: Path) -> None:
    cfg = SyntheticConfig.small(n_impressions=3000)
    a = write_dataset(cfg, tmp_path / "a")
    b = write_dataset(cfg, tmp_path / "b")
    c = write_dataset(SyntheticConfig.small(n_impressions=3000, seed=1), tmp_path / "c")
    assert a["sha256"] == b["sha256"]
    assert a["sha256"] != c["sha256"]
    text = [(tmp_path / d / "dataset.json").read_text() for d in "ab"]
    assert text[0] == text[1]


def test_rates_and_click_dependence(small_data: Path) -> None:
    info = json.loads((small_data / "dataset.json").read_text())
    train = info["rates"]["train"]
    assert 0.05 <= train["click"] <= 0.15
    assert 0.01 <= train["like"] <= 0.03
    assert 0.0 < train["share"] < 0.01
    assert train["share"] < train["like"] < train["click"]
    # like and share mostly happen after a click
    assert info["after_click"]["like"] > 0.7
    assert info["after_click"]["share"] > 0.7
    log = pq.read_table(small_data / "impressions_train.parquet")
    click = log["click"].to_numpy().astype(bool)
    like = log["like"].to_numpy().astype(bool)
    assert like[click].mean() > 5 * like[~click].mean()


def test_oracle_auc_is_sane_and_true_probabilities_are_calibrated(small_data: Path) -> None:
    info = json.loads((small_data / "dataset.json").read_text())
    for task, value in info["oracle_auc"].items():
        assert 0.65 < value < 0.97, (task, value)
    log = pq.read_table(small_data / "impressions_train.parquet")
    for task in ("click", "like"):
        p = log[f"p_{task}"].to_numpy()
        y = log[task].to_numpy()
        assert abs(p.mean() - y.mean()) < 0.2 * y.mean() + 0.002, task


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def test_relatedness_knob_controls_task_correlation() -> None:
    def corr(rho: float) -> float:
        t = generate(SyntheticConfig.small(n_impressions=5000, relatedness=rho))[
            "impressions_train"
        ]
        pc, pl = t["p_click"].to_numpy(), t["p_like"].to_numpy()
        leak = SyntheticConfig().leak
        q_like = pl / (pc + leak * (1 - pc))  # like given click: the task's own score
        return float(np.corrcoef(_logit(pc), _logit(np.clip(q_like, 1e-6, 1 - 1e-6)))[0, 1])

    low, high = corr(0.0), corr(1.0)
    assert high > 0.95
    assert abs(low) < 0.3


# Computed on main before the world refactor (commit 1127bb2): the refactor must not change one
# bit of the dataset. The content hash covers every column of every table (robust to pyarrow's
# writer version); the parquet sha256 of dataset.json is also pinned for the pyarrow it was
# computed with, since the file bytes carry the writer version.
SMALL_CONTENT_SHA256 = "3306c75b052ec158325ee3385a4e803d16b44e9db039398917b2ba35c5b50265"
DEFAULT_CONTENT_SHA256 = "402b71cabac567be34b991bdbe73c75760920bd445c941767108304312e3ec94"
SMALL_PARQUET_SHA256 = "6dd6f2349691fc75dcb43981fbfc27656d61d3af083fe65016dfdeab06c346a1"
PARQUET_SHA_PYARROW = "26.0.1"


def content_sha256(tables: dict[str, pa.Table]) -> str:
    """sha256 over each table's name and each column's name, type and values."""
    h = hashlib.sha256()
    for name in sorted(tables):
        t = tables[name]
        h.update(name.encode())
        for col in t.column_names:
            a = t[col].combine_chunks()
            h.update(col.encode())
            h.update(str(a.type).encode())
            if pa.types.is_string(a.type):
                h.update("\0".join(a.to_pylist()).encode())
            else:
                h.update(np.ascontiguousarray(a.to_numpy()).tobytes())
    return h.hexdigest()


def test_small_dataset_is_bit_for_bit_what_it_was(small_data: Path) -> None:
    assert content_sha256(generate(SyntheticConfig.small())) == SMALL_CONTENT_SHA256
    if pa.__version__ == PARQUET_SHA_PYARROW:  # the file bytes name the writer's version
        info = json.loads((small_data / "dataset.json").read_text())
        assert info["sha256"] == SMALL_PARQUET_SHA256


def test_default_dataset_is_bit_for_bit_what_it_was() -> None:
    assert content_sha256(generate(SyntheticConfig())) == DEFAULT_CONTENT_SHA256


def _pairs(world: World, t: pa.Table) -> tuple[np.ndarray, ...]:
    return (world.user_index(t["user_id"].to_numpy(zero_copy_only=False)),
            world.item_index(t["item_id"].to_numpy(zero_copy_only=False)),
            t["hour"].to_numpy(), t["surface"].to_numpy(zero_copy_only=False))


def test_saved_world_reproduces_the_logged_true_probabilities(small_data: Path) -> None:
    world = World.load(small_data)
    assert world.config == SyntheticConfig.small()
    for split in SPLITS:
        t = pq.read_table(small_data / f"impressions_{split}.parquet")
        p = world.probabilities(*_pairs(world, t))
        for task in TASKS:
            np.testing.assert_allclose(p[task], t[f"p_{task}"].to_numpy(), rtol=0, atol=1e-6,
                                       err_msg=f"{split} {task}")


def test_world_of_generate_world_equals_the_loaded_one(small_data: Path) -> None:
    world, _ = generate_world(SyntheticConfig.small())
    loaded = World.load(small_data)
    for f in ("user_latent", "affinity", "score_mean", "score_std", "intercept", "popularity"):
        np.testing.assert_array_equal(getattr(world, f), getattr(loaded, f), err_msg=f)
    assert (world.rho, world.leak) == (loaded.rho, loaded.leak)
    info = json.loads((small_data / "dataset.json").read_text())
    assert info["world_sha256"] == hashlib.sha256((small_data / "world.npz").read_bytes()
                                                  ).hexdigest()


def test_probabilities_vectorise_broadcast_and_depend_on_context(small_data: Path) -> None:
    world = World.load(small_data)
    items = np.arange(world.n_items)
    full = world.probabilities(np.full(world.n_items, 7), items, np.full(world.n_items, 21),
                               np.zeros(world.n_items, dtype=np.int64))
    bcast = world.probabilities(7, items, 21, "home")
    for task in TASKS:
        np.testing.assert_array_equal(full[task], bcast[task])
        assert full[task].shape == (world.n_items,)
        assert np.all((full[task] > 0) & (full[task] < 1))
        # like/share are bounded by the chance of engaging at all
        if task != "click":
            assert np.all(full[task] <= full["click"] + world.leak)
    other = world.probabilities(7, items, 4, "related")
    assert not np.allclose(other["click"], full["click"])
    cond = world.conditionals(7, items, 21, "home")
    reach = cond["click"] + world.leak * (1 - cond["click"])
    np.testing.assert_allclose(cond["like"] * reach, full["like"])


def test_unknown_ids_and_contexts_are_errors_that_name_them(small_data: Path) -> None:
    world = World.load(small_data)
    assert world.user_index(["u0", "u199"]).tolist() == [0, 199]
    assert world.item_index("i149").tolist() == 149
    for bad in ("u200", "x1", "u01", "u-1", "u"):
        with pytest.raises(KeyError, match=repr(bad)):
            world.user_index(["u0", bad])
    with pytest.raises(KeyError, match="'i150'"):
        world.item_index(["i150"])
    with pytest.raises(KeyError, match="'lobby'"):
        world.probabilities(0, 0, 0, "lobby")
    with pytest.raises(IndexError, match="hour"):
        world.probabilities(0, 0, 24, "home")


def test_world_files_are_deterministic_and_checked(tmp_path: Path) -> None:
    cfg = SyntheticConfig.small(n_impressions=2000)
    write_dataset(cfg, tmp_path / "a")
    write_dataset(cfg, tmp_path / "b")
    for name in ("world.npz", "world.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(FileNotFoundError, match="ranker data"):
        World.load(tmp_path)
    npz = tmp_path / "a" / "world.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        World.load(tmp_path / "a")
