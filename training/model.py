"""Multi-task ranking models: MMoE (Ma et al., KDD 2018), OMoE and Shared-Bottom, one code path.

All three share the input layer: each feature group (user, item, context) is embedded and
concatenated, x_g = [emb(cat_1), ..., emb(cat_k), dense], and the first layer of every expert,
of every gate and of the shared bottom is one linear map of the concatenation x = [x_user,
x_item, x_context]. A linear map of a concatenation is the sum of linear maps of its blocks,

    W x + b = W_user x_user + W_item x_item + W_context x_context + b,

so the model keeps one projection per group and adds them. This is exactly the paper's model
(the test suite proves it against the concatenated form), and it lets a group's batch be 1: the
service sends the user once per request and the graph broadcasts the user's share of the first
layer over all candidates instead of recomputing it per candidate.

MMoE:          y_t = tower_t( sum_m softmax(W_gt x)_m * expert_m(x) )
OMoE:          one gate shared by all tasks
Shared-Bottom: y_t = tower_t( bottom(x) )
Single-task baselines are Shared-Bottom models with one task each.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ranker.manifest import GATES_OUTPUT
from ranker.schema import FeatureSchema, InputSpec, group_input_specs, input_name

ModelType = Literal["mmoe", "omoe", "shared_bottom"]


@dataclass(frozen=True)
class InputGroup:
    """One feature group as the network sees it: categorical vocab sizes and a dense width."""

    entity: str
    vocab_sizes: list[int]
    embedding_dims: list[int]
    n_dense: int

    @property
    def width(self) -> int:
        return sum(self.embedding_dims) + self.n_dense

    def input_specs(self) -> list[InputSpec]:
        """The group's graph inputs, named by the feature contract."""
        return group_input_specs(self.entity, len(self.vocab_sizes), self.n_dense)


@dataclass(frozen=True)
class ModelConfig:
    """The network's shape. Its defaults are the project's default model: `ranker train` takes
    its flag defaults from here and the main job's model (`ensure_default_model`) uses them."""

    inputs: list[InputGroup]
    tasks: list[str] = field(default_factory=lambda: ["click", "like", "share"])
    model_type: ModelType = "mmoe"
    task_kind: Literal["binary", "regression"] = "binary"
    n_experts: int = 8
    expert_hidden: list[int] = field(default_factory=lambda: [32, 16])  # per expert
    bottom_hidden: list[int] = field(default_factory=lambda: [128, 64])  # shared_bottom only
    tower_hidden: list[int] = field(default_factory=lambda: [16])
    # regularisation (issue 17); 0 = off, today's model. Dropout is active in training only,
    # so the exported graph (traced in eval mode) carries none of it.
    dropout: float = 0.0  # after every hidden layer of the experts / bottom and the towers
    embedding_dropout: float = 0.0  # on every embedding lookup

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["inputs"] = [InputGroup(**g) for g in d["inputs"]]
        return cls(**d)

    def input_specs(self) -> list[InputSpec]:
        """The graph's inputs in order, as `FeatureSchema.input_specs` lists them."""
        return [s for g in self.inputs for s in g.input_specs()]

    @property
    def hidden(self) -> list[int]:
        """Widths of the shared part: each expert's layers, or the bottom's."""
        return self.bottom_hidden if self.model_type == "shared_bottom" else self.expert_hidden

    @property
    def n_gates(self) -> int:
        return {"mmoe": len(self.tasks), "omoe": 1, "shared_bottom": 0}[self.model_type]

    @property
    def n_units(self) -> int:
        """Parallel copies of the shared part: the experts, or one bottom."""
        return 1 if self.model_type == "shared_bottom" else self.n_experts


def inputs_from_schema(schema: FeatureSchema) -> list[InputGroup]:
    return [
        InputGroup(
            entity=g.entity,
            vocab_sizes=[f.vocab_size for f in g.categorical],
            embedding_dims=[f.embedding_dim for f in g.categorical],
            n_dense=g.n_dense,
        )
        for g in schema.groups
    ]


def _uniform_(t: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default init, for weights whose fan-in is not their own last dimension."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


class GroupEncoder(nn.Module):
    """Embeds one group's categorical features and appends its dense features."""

    def __init__(self, group: InputGroup, dropout: float = 0.0) -> None:
        super().__init__()
        embs = [
            nn.Embedding(v, d) for v, d in zip(group.vocab_sizes, group.embedding_dims, strict=True)
        ]
        for emb in embs:
            nn.init.normal_(emb.weight, std=0.05)
        self.embeddings = nn.ModuleList(embs)
        self.dropout = dropout

    def forward(self, cat: Tensor | None, dense: Tensor | None) -> Tensor:
        parts = [emb(cat[:, j]) for j, emb in enumerate(self.embeddings)] if cat is not None else []
        parts = [_dropout(p, self.dropout, self.training) for p in parts]
        if dense is not None:
            parts.append(dense)
        return torch.cat(parts, dim=1)  # (B_g, width_g)


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout when on; at p = 0 not even called, so a model without it draws no random numbers
    and trains exactly as before the option existed."""
    return torch.nn.functional.dropout(x, p, training) if p > 0 and training else x


class BatchedMLP(nn.Module):
    """K independent MLPs (experts or towers) as batched matmuls: (K, B, i) -> (K, B, o)."""

    def __init__(
        self, k: int, widths: list[int], last_activation: bool, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for w_in, w_out in itertools.pairwise(widths):
            self.weights.append(_uniform_(nn.Parameter(torch.empty(k, w_in, w_out)), w_in))
            self.biases.append(_uniform_(nn.Parameter(torch.empty(k, 1, w_out)), w_in))
        self.last_activation = last_activation
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.matmul(x, w) + b  # (K, B, w_out)
            if i < n - 1 or self.last_activation:
                x = _dropout(torch.relu(x), self.dropout, self.training)
        return x


class MultiTaskModel(nn.Module):
    """MMoE, OMoE or Shared-Bottom, chosen by `config.model_type`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoders = nn.ModuleDict(
            {g.entity: GroupEncoder(g, c.embedding_dropout) for g in c.inputs}
        )
        h0 = c.hidden[0]
        # first layer of every expert (or of the bottom) and every gate, split by input group
        self.first_width = c.n_units * h0 + c.n_gates * c.n_experts
        fan_in = sum(g.width for g in c.inputs)
        self.first = nn.ParameterDict(
            {
                g.entity: _uniform_(nn.Parameter(torch.empty(g.width, self.first_width)), fan_in)
                for g in c.inputs
            }
        )
        self.first_bias = _uniform_(nn.Parameter(torch.empty(self.first_width)), fan_in)
        # layers after the first, of each expert (or the bottom): (U, B, h0) -> (U, B, E)
        self.shared = BatchedMLP(c.n_units, c.hidden, last_activation=True, dropout=c.dropout)
        self.towers = BatchedMLP(
            len(c.tasks), [c.hidden[-1], *c.tower_hidden, 1], False, dropout=c.dropout
        )

    def input_names(self) -> list[str]:
        return [s.name for s in self.config.input_specs()]

    def first_layer(self, inputs: dict[str, Tensor]) -> Tensor:
        """Sum over groups of x_g @ W_g, broadcasting groups whose batch is 1: (B, first_width)."""
        h: Tensor = self.first_bias
        for g in self.config.inputs:
            x_g = self.encoders[g.entity](
                inputs.get(input_name(g.entity, "cat")), inputs.get(input_name(g.entity, "dense"))
            )  # (B_g, width_g), B_g in {1, B}
            h = h + x_g @ self.first[g.entity]  # (B, first_width)
        return h

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        c = self.config
        h = self.first_layer(inputs)  # (B, U*h0 + G*M)
        h0 = c.hidden[0]
        split = c.n_units * h0
        units = torch.relu(h[:, :split].reshape(-1, c.n_units, h0)).transpose(0, 1)  # (U, B, h0)
        units = _dropout(units, c.dropout, self.training)
        units = self.shared(units)  # remaining layers: (U, B, E)
        out: dict[str, Tensor] = {}
        if c.model_type == "shared_bottom":
            task_in = units.expand(len(c.tasks), -1, -1)  # (T, B, E)
        else:
            logits = h[:, split:].reshape(-1, c.n_gates, c.n_experts)  # (B, G, M)
            gates = torch.softmax(logits, dim=-1).expand(-1, len(c.tasks), -1)  # (B, T, M)
            mixed = torch.bmm(gates, units.transpose(0, 1))  # (B, T, M) @ (B, M, E) -> (B, T, E)
            task_in = mixed.transpose(0, 1)  # (T, B, E)
            out[GATES_OUTPUT] = gates
        y = self.towers(task_in).squeeze(-1)  # (T, B)
        if c.task_kind == "binary":
            y = torch.sigmoid(y)
        for t, task in enumerate(c.tasks):
            out[task] = y[t]  # (B,)
        return out

    @torch.no_grad()
    def init_output_bias(self, base_rates: list[float]) -> None:
        """Start each binary tower at logit(its task's base rate) instead of 0.5.

        Without it the first epochs are spent walking the output bias down to the rare tasks'
        base rates, and the large uniform gradient meanwhile kills ReLU units (the plateau this
        removed is in docs/training.md, "Model, training, evaluation").
        """
        p = torch.tensor(base_rates, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
        self.towers.biases[-1].copy_(torch.logit(p).view(-1, 1, 1))  # (T, 1, 1)

    def output_names(self) -> list[str]:
        gates = [] if self.config.model_type == "shared_bottom" else [GATES_OUTPUT]
        return [*self.config.tasks, *gates]


class PositionalWrapper(nn.Module):
    """Named dict in/out -> positional tuple in/out, for ONNX export."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model
        self.names = model.input_names()

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        out = self.model(dict(zip(self.names, args, strict=True)))
        return tuple(out[n] for n in self.model.output_names())
