"""Model shapes, gates summing to 1, and the exactness of the split first layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ranker.examples import golden_inputs, tiny_schema
from training.model import ModelConfig, ModelType, MultiTaskModel, inputs_from_schema

TASKS = ["click", "like", "share"]


def make_model(model_type: ModelType = "mmoe", seed: int = 0,
               interaction_dim: int = 0, wide: bool = False) -> MultiTaskModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(inputs=inputs_from_schema(tiny_schema()), tasks=TASKS,
                      model_type=model_type, n_experts=4, expert_hidden=[8, 6],
                      bottom_hidden=[12, 6], tower_hidden=[4], interaction_dim=interaction_dim,
                      wide=wide)
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


@pytest.mark.parametrize(("interaction_dim", "wide"), [(0, False), (5, False), (5, True)])
def test_user_broadcast_equals_tiled_user(interaction_dim: int, wide: bool) -> None:
    model = make_model(interaction_dim=interaction_dim, wide=wide)
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
