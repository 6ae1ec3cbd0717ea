"""List-valued features (issue 20): the contract's encoding, pooling, and ONNX parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
import torch

from ranker.examples import HISTORY_FEATURE, golden_inputs, tiny_list_schema, tiny_schema
from ranker.manifest import load_manifest, load_schema
from ranker.schema import (
    LIST_PADDING,
    FeatureSchema,
    ListColumnError,
    ListFeature,
    ListTooLongError,
)
from training.export import check_parity, export_model, torch_outputs
from training.model import ModelConfig, MultiTaskModel, inputs_from_schema

# the tiny schema's version before list features existed: a schema without lists keeps it
TINY_SCHEMA_VERSION = "79945a60fe62"


def model_for(schema: FeatureSchema, seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(inputs=inputs_from_schema(schema), n_experts=4, expert_hidden=[8],
                      tower_hidden=[4])
    return MultiTaskModel(cfg).eval()


def history() -> ListFeature:
    s = tiny_list_schema(max_len=5)
    user = s.group("user")
    assert user is not None
    return user.lists[0]


def test_a_schema_without_lists_is_described_as_before() -> None:
    s = tiny_schema()
    assert s.version == TINY_SCHEMA_VERSION
    assert all("lists" not in g for g in s.describe()["groups"])
    assert s.input_names() == ["user_cat", "user_dense", "item_cat", "item_dense", "context_cat"]
    user = s.group("user")
    assert user is not None and "list" not in (user.record_dtype().names or ())
    cfg = ModelConfig(inputs=inputs_from_schema(s))
    assert all(not g["list_lengths"] for g in cfg.to_dict()["inputs"])
    # a checkpoint's config from before list features still loads
    old = cfg.to_dict()
    for g in old["inputs"]:
        for k in [k for k in g if k.startswith("list_")]:
            del g[k]
    assert ModelConfig.from_dict(old) == cfg


def test_encoding_pads_drops_unknown_ids_and_defaults_missing() -> None:
    f = history()
    # ids in order, then padding; an unknown id encodes to 0 like padding; None / [] = default
    enc, unknown = f.encode(pa.array([["i1", "i2"], None, [], ["nope", "i199", "i3"]]), 4)
    np.testing.assert_array_equal(enc, [[2, 3, 0, 0, 0], [0] * 5, [0] * 5, [0, 200, 4, 0, 0]])
    assert unknown == 1 and enc.dtype == np.int32
    # python lists and a chunked column give the same
    chunked = pa.chunked_array([pa.array([["i1", "i2"]]), pa.array([None, []],
                                                                   pa.list_(pa.string()))])
    np.testing.assert_array_equal(f.encode(chunked, 3)[0], enc[:3])
    np.testing.assert_array_equal(f.encode([["i1", "i2"], None, []], 3)[0], enc[:3])
    # integer ids compare as their string spelling, as categoricals do
    ints = ListFeature("h", 3, "item.item_id", f.vocab)
    assert ints.encode(pa.array([[1, 2]]), 1)[0].tolist() == [[0, 0, 0]]  # "1" is not "i1"


def test_a_list_over_the_cap_is_an_error_naming_the_feature() -> None:
    f = history()
    with pytest.raises(ListTooLongError, match=r"recent_items: 1 row\(s\).*max_len = 5.*row 1"):
        f.encode(pa.array([["i1"], ["i1"] * 6]), 2)
    with pytest.raises(ListColumnError, match="must be a list"):
        f.encode(pa.array(["i1", "i2"]), 2)
    with pytest.raises(ListColumnError, match="strings or integers"):
        f.encode(pa.array([[["i1"]]]), 1)


def test_description_round_trips_and_checks_the_shared_vocabulary() -> None:
    s = tiny_list_schema(max_len=7, pooling="attention")
    back = FeatureSchema.from_description(s.describe(), s.vocabularies())
    assert back.version == s.version and back.input_specs() == s.input_specs()
    user = back.group("user")
    assert user is not None and user.lists[0].max_len == 7
    assert user.lists[0].pooling == "attention" and user.lists[0].table == "item.item_id"
    desc = s.describe()
    desc["groups"][0]["lists"][0]["vocab_sha256"] = "0" * 64
    del desc["version"]
    with pytest.raises(ValueError, match=r"vocabulary of user\.recent_items"):
        FeatureSchema.from_description(desc, s.vocabularies())
    spec = next(x for x in s.input_specs() if x.name == "user_list")
    assert (spec.dtype, spec.width, spec.batch_axis) == ("int64", 7, "user_batch")


def test_mean_pooling_ignores_padding_and_empty_history_pools_to_zero() -> None:
    s = tiny_list_schema(max_len=5)
    model = model_for(s)
    g = model.config.inputs[0]
    table = model.encoders["item"].embeddings[0]
    lists = torch.tensor([[3, 7, 0, 0, 0], [0, 0, 0, 0, 0], [0, 3, 0, 7, 0]])
    pooled = model.pooled_lists(g, {"user_list": lists})[0]  # (3, d)
    want = (table.weight[3] + table.weight[7]) / 2
    torch.testing.assert_close(pooled[0], want)
    torch.testing.assert_close(pooled[1], torch.zeros_like(want))  # no history: zeros
    torch.testing.assert_close(pooled[2], want)  # where the padding sits does not matter


def test_the_list_changes_the_prediction_and_shares_the_item_table() -> None:
    s = tiny_list_schema(max_len=5)
    model = model_for(s)
    x = {k: torch.from_numpy(v) for k, v in golden_inputs(s, n=3).items()}
    x["user_list"] = torch.tensor([[5, 6, 0, 0, 0]])
    a = model(x)["click"]
    x["user_list"] = torch.tensor([[9, 0, 0, 0, 0]])
    b = model(x)["click"]
    assert not torch.allclose(a, b)
    names = [n for n, _ in model.named_parameters()]
    assert not any("list" in n for n in names)  # no table of its own: the item id's


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_onnx_matches_torch_at_batch_1_odd_and_max(tmp_path: Path, pooling: str) -> None:
    s = tiny_list_schema(max_len=6, pooling=pooling)  # type: ignore[arg-type]
    vdir = export_model(model_for(s, seed=3), s, tmp_path, "m", golden_inputs(s, n=5))
    manifest = load_manifest(vdir)
    assert [t.name for t in manifest.inputs][2] == "user_list"
    assert load_schema(vdir, manifest).version == s.version
    sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    model = model_for(s, seed=3)
    for n, seed in ((1, 1), (37, 2), (1000, 3)):
        x = golden_inputs(s, n=n, seed=seed)
        x["user_list"][0, :3] = [4, 0, 9]  # a history with a hole, padding after
        check_parity(sess, torch_outputs(model, x), x, atol=1e-5)
        # the user at batch N (training's layout) gives the same scores as at batch 1
        tiled = s.tiled_inputs(x)
        check_parity(sess, torch_outputs(model, x), tiled, atol=1e-5)
    empty = golden_inputs(s, n=4)
    empty["user_list"][:] = LIST_PADDING
    check_parity(sess, torch_outputs(model, empty), empty, atol=1e-5)


def test_a_history_item_ranks_its_own_neighbourhood_under_attention() -> None:
    """Attention weighs the history by each candidate: a candidate equal to a history item gets
    that item's vector (mostly), so it differs from mean pooling of the same history."""
    s = tiny_list_schema(max_len=4, pooling="attention")
    model = model_for(s)
    g = model.config.inputs[0]
    cands = torch.tensor([[3, 1], [8, 1]])  # item_cat: item_id, category
    lists = torch.tensor([[3, 8, 0, 0]])
    pooled = model.pooled_lists(g, {"user_list": lists, "item_cat": cands})[0]  # (2, d)
    assert pooled.shape[0] == 2 and not torch.allclose(pooled[0], pooled[1])
    none = model.pooled_lists(g, {"user_list": torch.zeros(1, 4, dtype=torch.long),
                                  "item_cat": cands})[0]
    torch.testing.assert_close(none, torch.zeros_like(none))
    assert HISTORY_FEATURE == "recent_items"


@pytest.fixture(scope="module")
def production_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.synthetic import SyntheticConfig, write_dataset

    out = tmp_path_factory.mktemp("production")
    write_dataset(SyntheticConfig.production(0.002), out)  # streamed: a wide config
    return out


def test_the_streamed_world_is_deterministic_and_has_the_production_shape(
        production_data: Path, tmp_path: Path) -> None:
    from training.bigworld import write_streamed
    from training.synthetic import HISTORY_COLUMN, SyntheticConfig, World, read_dataset_info

    info = read_dataset_info(production_data)
    assert info is not None and "streamed" in info
    cfg = SyntheticConfig.production(0.002)
    sizes = info["sizes"]
    assert sum(sizes[f"impressions_{s}"] for s in ("train", "val", "test")) == cfg.n_impressions
    assert (sizes["users"], sizes["items"]) == (cfg.n_users, cfg.n_items)
    assert abs(info["rates"]["train"]["click"] - cfg.click_rate) < 0.02
    assert info["oracle_auc"]["click"] > 0.6
    again = write_streamed(cfg, tmp_path / "again", chunk=5_000)
    other = write_streamed(cfg, tmp_path / "other", chunk=5_000)
    assert again["sha256"] == other["sha256"]  # the same config and chunk: the same bytes
    world = World.load(production_data)
    p = world.probabilities(np.array([0, 1]), np.array([3, 4]), np.array([20, 8]),
                            np.array(["home", "search"]))
    assert all(v.min() > 0 and v.max() < 1 for v in p.values())
    import pyarrow.parquet as pq

    users = pq.read_table(production_data / "users.parquet")
    lengths = np.array([len(h or []) for h in users.column(HISTORY_COLUMN).to_pylist()])
    assert lengths.max() <= cfg.history_len and (lengths == 0).mean() > 0.03
    assert users.num_columns == 6 + 1 + cfg.extra_user_features


def test_the_factorized_join_equals_the_materialised_one(production_data: Path) -> None:
    from training.data import (
        Gathered,
        build_schema,
        encode_split,
        factorized,
        joined_columns,
        load_raw,
    )
    from training.spec import load_spec

    spec = load_spec("synthetic_production")
    raw = load_raw(spec, production_data)
    assert factorized(spec, raw)
    schema = build_schema(spec, raw)
    enc = encode_split(spec, schema, raw, "val")
    assert isinstance(enc.inputs["user_list"], Gathered)
    log = raw.splits["val"]
    for g in schema.groups:
        want = g.encode_inputs(joined_columns(spec, raw, log, g.entity), log.num_rows)
        for name, arr in want.items():
            np.testing.assert_array_equal(np.asarray(enc.inputs[name]), arr)
    idx = np.array([5, 0, 17])
    np.testing.assert_array_equal(enc.inputs["user_list"][idx], np.asarray(
        enc.inputs["user_list"])[idx])


def test_a_spec_list_feature_is_checked_field_by_field() -> None:
    from training.spec import SpecError, parse_spec

    def spec(**feature: object) -> dict:
        return {"name": "s", "tasks": ["click"], "source": {
            "kind": "tables", "users": "u.parquet", "items": "i.parquet", "user_key": "user_id",
            "item_key": "item_id", "splits": {"train": "a", "val": "b", "test": "c"}},
            "features": [{"name": "item_id", "entity": "item", "type": "categorical"},
                         {"name": "h", "entity": "user", "type": "list", **feature}]}

    ok = parse_spec(spec(max_len=5, table="item.item_id"))
    assert (ok.features[1].max_len, ok.features[1].table, ok.features[1].pooling) == (
        5, "item.item_id", "mean")
    for bad, msg in (({"table": "item.item_id"}, "max_len"),
                     ({"max_len": 0, "table": "item.item_id"}, "max_len"),
                     ({"max_len": 5}, "table"),
                     ({"max_len": 5, "table": "item.nope"}, "no categorical feature"),
                     ({"max_len": 5, "table": "item.item_id", "pooling": "max"}, "pooling"),
                     ({"max_len": 5, "table": "item.item_id", "embedding_dim": 4},
                      "do not apply")):
        with pytest.raises(SpecError, match=msg):
            parse_spec(spec(**bad))
    with pytest.raises(SpecError, match="apply to a list feature only"):
        parse_spec({**spec(max_len=5, table="item.item_id"), "features": [
            {"name": "item_id", "entity": "item", "type": "categorical", "max_len": 3}]})
