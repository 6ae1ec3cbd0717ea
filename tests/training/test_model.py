"""Model shapes, gates summing to 1, and the exactness of the split first layer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from ranker.examples import golden_inputs, tiny_schema
from training.model import ModelConfig, ModelType, MultiTaskModel, inputs_from_schema

TASKS = ["click", "like", "share"]


def make_model(model_type: ModelType = "mmoe", seed: int = 0,
               interaction_dim: int = 0, wide: bool = False, **kw: Any) -> MultiTaskModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(inputs=inputs_from_schema(tiny_schema()), tasks=TASKS,
                      model_type=model_type, n_experts=4, expert_hidden=[8, 6],
                      bottom_hidden=[12, 6], tower_hidden=[4], interaction_dim=interaction_dim,
                      wide=wide, **kw)
    return MultiTaskModel(cfg).eval()


def tiled(inputs: dict[str, np.ndarray], n: int) -> dict[str, torch.Tensor]:
    """Every group repeated to n rows (the training layout, U = N)."""
    return {k: torch.from_numpy(np.repeat(v, n // len(v), axis=0)) for k, v in inputs.items()}


@pytest.mark.parametrize("model_type", ["mmoe", "omoe", "shared_bottom"])
def test_output_shapes(model_type: ModelType) -> None:
    model = make_model(model_type)
    x = {k: torch.from_numpy(v) for k, v in golden_inputs(tiny_schema(), n=7).items()}
    with torch.no_grad():
        out = model(x)
    for t in TASKS:
        assert out[t].shape == (7,)
        assert ((out[t] > 0) & (out[t] < 1)).all()
    if model_type == "shared_bottom":
        assert "gates" not in out
    else:
        assert out["gates"].shape == (7, 3, 4)
    assert set(model.output_names()) == set(out)


@pytest.mark.parametrize("model_type", ["mmoe", "omoe"])
def test_gates_are_distributions(model_type: ModelType) -> None:
    model = make_model(model_type)
    x = {k: torch.from_numpy(v) for k, v in golden_inputs(tiny_schema(), n=33).items()}
    with torch.no_grad():
        gates = model(x)["gates"]
    torch.testing.assert_close(gates.sum(-1), torch.ones(33, 3), atol=1e-6, rtol=0)
    assert (gates >= 0).all()
    if model_type == "omoe":  # one gate shared by every task
        torch.testing.assert_close(gates[:, 0], gates[:, 2])
    else:
        assert not torch.allclose(gates[:, 0], gates[:, 2])


CROSS_KW: list[dict[str, Any]] = [
    {"crosses": ["country:category"]},
    {"crosses": ["user_id:item_id", "country:hour"], "cross_buckets": 97},  # hashed; user x ctx
    {"crosses": ["country:category"], "cross_mode": "embedding", "cross_dim": 3, "wide": True},
]


@pytest.mark.parametrize(("interaction_dim", "wide", "kw"),
                         [(0, False, {}), (5, False, {}), (5, True, {}),
                          *[(0, False, kw) for kw in CROSS_KW]])
def test_user_broadcast_equals_tiled_user(interaction_dim: int, wide: bool,
                                          kw: dict[str, Any]) -> None:
    kw = dict(kw)
    wide = kw.pop("wide", wide)
    model = make_model(interaction_dim=interaction_dim, wide=wide, **kw)
    with torch.no_grad():  # the cross tables start at 0 (wide): make them count
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = golden_inputs(tiny_schema(), n=9)
    with torch.no_grad():
        a = model({k: torch.from_numpy(v) for k, v in x.items()})
        b = model(tiled(x, 9))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_split_first_layer_equals_one_linear_over_the_concatenation() -> None:
    """sum_g x_g @ W_g + b == [x_user, x_item, x_context] @ [W_user; W_item; W_context] + b."""
    model = make_model()
    x = tiled(golden_inputs(tiny_schema(), n=16, seed=3), 16)
    with torch.no_grad():
        split = model.first_layer(x)
        parts = [
            model.encoders[g.entity](x.get(f"{g.entity}_cat"), x.get(f"{g.entity}_dense"))
            for g in model.config.inputs
        ]
        concat = torch.cat(parts, dim=1)  # (B, sum of group widths)
        linear = torch.nn.Linear(concat.shape[1], model.first_width)
        linear.weight.copy_(torch.cat([model.first[g.entity] for g in model.config.inputs]).T)
        linear.bias.copy_(model.first_bias)
        torch.testing.assert_close(split, linear(concat), atol=1e-6, rtol=1e-6)
    assert concat.shape[1] == sum(g.width for g in model.config.inputs)


def test_interactions_are_products_of_the_groups_projections() -> None:
    """With `interaction_dim` D the first layer gains, for every pair of groups (a, b),
    ((x_a @ P_a) * (x_b @ P_b)) @ W_ab: the split layer plus exactly that term."""
    model = make_model(interaction_dim=5)
    c = model.config
    assert c.interaction_pairs == [(0, 1), (0, 2), (1, 2)]
    x = tiled(golden_inputs(tiny_schema(), n=16, seed=3), 16)
    with torch.no_grad():
        parts = [model.encoders[g.entity](x.get(f"{g.entity}_cat"), x.get(f"{g.entity}_dense"))
                 for g in c.inputs]
        plain = model.first_bias + sum(p @ model.first[g.entity]
                                       for p, g in zip(parts, c.inputs, strict=True))
        proj = [p @ model.interaction_proj[g.entity] for p, g in zip(parts, c.inputs, strict=True)]
        prods = torch.cat([proj[a] * proj[b] for a, b in c.interaction_pairs], dim=1)
        want = plain + prods @ model.interaction_first
        torch.testing.assert_close(model.first_layer(x), want, atol=1e-6, rtol=1e-6)
    assert model.interaction_first.shape == (3 * 5, model.first_width)


@pytest.mark.parametrize("model_type", ["mmoe", "shared_bottom", "ple"])
def test_wide_logits_start_at_zero_and_add_to_the_towers(model_type: ModelType) -> None:
    """`wide` appends T first-layer columns, initialised to 0 (the same outputs as the towers
    alone at init) and added to each task's logit."""
    model = make_model(model_type, interaction_dim=5, wide=True)
    x = tiled(golden_inputs(tiny_schema(), n=8, seed=1), 8)
    with torch.no_grad():
        h = model.first_layer(x)
        torch.testing.assert_close(h[:, -len(TASKS):], torch.zeros(8, len(TASKS)))
        before = model(x)["like"]
        model.first_bias[-2] += 1.0  # the like column of the wide part
        after = model(x)["like"]
    torch.testing.assert_close(torch.logit(after) - torch.logit(before), torch.ones(8),
                               atol=1e-4, rtol=0)


def test_first_layer_feeds_experts_and_gates() -> None:
    model = make_model()
    c = model.config
    assert model.first_width == c.n_experts * c.expert_hidden[0] + len(TASKS) * c.n_experts


def test_crosses_resolve_by_name_and_automatically() -> None:
    """Declared pairs by name or entity.name; `cross_max` adds every user x item pair of
    categoricals within the bound, the tables' keys (user_id, item_id) excepted."""
    inputs = inputs_from_schema(tiny_schema())  # user_id 51, country 5, item_id 201, category 9
    cfg = ModelConfig(inputs=inputs, crosses=["country:category", "user.country:context.hour"])
    assert [(x.name, x.rows, x.hashed) for x in cfg.cross_pairs] == [
        ("user.country:item.category", 45, False), ("user.country:context.hour", 125, False)]
    auto = ModelConfig(inputs=inputs, cross_max=10_000)  # user_id x category = 459: a key
    assert [x.name for x in auto.cross_pairs] == ["user.country:item.category"]
    both = ModelConfig(inputs=inputs, crosses=["country:category"], cross_max=10_000)
    assert len(both.cross_pairs) == 1  # the declared one is not added twice
    assert ModelConfig(inputs=inputs, cross_max=44).cross_pairs == []
    hashed = ModelConfig(inputs=inputs, crosses=["user_id:item_id"], cross_buckets=100)
    assert [(x.rows, x.hashed, x.size_b) for x in hashed.cross_pairs] == [(100, True, 201)]
    for bad in ("country", "nosuch:category", "country:user_id", "country:country"):
        with pytest.raises(ValueError, match="cross"):
            ModelConfig(inputs=inputs, crosses=[bad])


def test_wide_cross_is_a_free_logit_per_pair_and_task() -> None:
    """cross_mode wide: zero at init (the model's outputs without the cross), and row
    a * |B| + b of the table adds to each task's logit exactly on the rows with that pair."""
    plain = make_model()
    model = make_model(crosses=["country:category"])
    x = tiled(golden_inputs(tiny_schema(), n=64, seed=5), 64)
    with torch.no_grad():
        model.load_state_dict(plain.state_dict(), strict=False)
        before = model(x)
        for t in TASKS:
            torch.testing.assert_close(before[t], plain(x)[t])
        a, b = x["user_cat"][:, 1], x["item_cat"][:, 1]  # country, category
        pair = int(a[0] * 9 + b[0])
        table = model.cross_tables[0].weight
        assert table.shape == (45, len(TASKS))
        table[pair, 1] = 2.0  # like's logit of that pair
        after = model(x)
    hit = (a * 9 + b) == pair
    shift = torch.logit(after["like"]) - torch.logit(before["like"])
    torch.testing.assert_close(shift[hit], torch.full((int(hit.sum()),), 2.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(shift[~hit], torch.zeros(int((~hit).sum())), atol=1e-5, rtol=0)
    torch.testing.assert_close(after["click"], before["click"])


def test_hashed_cross_indexes_stay_in_the_table() -> None:
    model = make_model(crosses=["user_id:item_id"], cross_buckets=97)
    x = tiled(golden_inputs(tiny_schema(), n=256, seed=2), 256)
    (x_cross,) = model.config.cross_pairs
    k = x["user_cat"][:, 0] * x_cross.size_b + x["item_cat"][:, 0]
    idx = torch.remainder(k * 40503, 97)
    assert int(idx.min()) >= 0 and int(idx.max()) < 97
    assert len(set(idx.tolist())) > 50  # spread over the buckets, not a few


def test_embedding_cross_enters_the_first_layer() -> None:
    """cross_mode embedding: the first layer gains rows @ W_cross, the split layer plus that."""
    model = make_model(crosses=["country:category"], cross_mode="embedding", cross_dim=3)
    x = tiled(golden_inputs(tiny_schema(), n=16, seed=3), 16)
    c = model.config
    with torch.no_grad():
        parts = [model.encoders[g.entity](x.get(f"{g.entity}_cat"), x.get(f"{g.entity}_dense"))
                 for g in c.inputs]
        plain = model.first_bias + sum(p @ model.first[g.entity]
                                       for p, g in zip(parts, c.inputs, strict=True))
        k = x["user_cat"][:, 1] * 9 + x["item_cat"][:, 1]
        want = plain + model.cross_tables[0](k) @ model.cross_first
        torch.testing.assert_close(model.first_layer(x), want, atol=1e-6, rtol=1e-6)
    assert model.cross_first.shape == (3, model.first_width)
