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

PLE / CGC (Tang et al., RecSys 2020): every task has its own experts besides the shared ones;
task t's gate mixes [its own experts, the shared experts]. CGC is one such level; PLE stacks
`levels` of them, a shared gate over all experts feeding the next level's shared experts. The
first level's experts and gates read x, so they are part of the split first layer as above.

Options on the same code path (defaults off): the entire-space click -> like/share chain
(ESMM, `chain`), a shallow position tower (`position_buckets`, YouTube RecSys 2019), gate
dropout, and a calibration head (Platt or isotonic) fitted after training and exported with
the graph (`training/calibration.py`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ranker.manifest import GATES_LEVELS_OUTPUT, GATES_OUTPUT
from ranker.schema import (
    CANDIDATE_ENTITY,
    LIST_PADDING,
    FeatureSchema,
    InputSpec,
    group_input_specs,
    input_name,
)

ModelType = Literal["mmoe", "omoe", "shared_bottom", "ple", "cgc"]
Calibration = Literal["none", "platt", "isotonic"]
POSITION_INPUT = "position"  # a training-only input: (B,) int64, 0 = top; never in the graph


@dataclass(frozen=True)
class InputGroup:
    """One feature group as the network sees it: categorical vocab sizes and a dense width."""

    entity: str
    vocab_sizes: list[int]
    embedding_dims: list[int]
    n_dense: int
    # list features (ranker.schema.ListFeature), in order: each one's cap, the group and the
    # categorical column whose embedding table it shares, that table's dim, and its pooling
    list_lengths: list[int] = field(default_factory=list)
    list_entities: list[str] = field(default_factory=list)
    list_columns: list[int] = field(default_factory=list)
    list_dims: list[int] = field(default_factory=list)
    list_pooling: list[str] = field(default_factory=list)
    # the categoricals' names, in order, and the entity table's key column (None: context):
    # what a cross feature (ModelConfig.crosses) is declared by and what `cross_max` skips
    names: list[str] = field(default_factory=list)
    key: str | None = None

    @property
    def base_width(self) -> int:
        """Width of the embedded categoricals and the dense values."""
        return sum(self.embedding_dims) + self.n_dense

    @property
    def width(self) -> int:
        """Width of the group's part of x: the base, then each list's pooled embedding."""
        return self.base_width + sum(self.list_dims)

    def input_specs(self) -> list[InputSpec]:
        """The group's graph inputs, named by the feature contract."""
        return group_input_specs(self.entity, len(self.vocab_sizes), self.n_dense,
                                 sum(self.list_lengths))


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
    # explicit pairwise interactions between the feature groups (issue 17; 0 = off): each
    # group's x_g is projected to this many dims, and the elementwise product of every pair of
    # groups' projections (user * item, user * context, item * context) enters the first layer
    # next to the concatenation, so a user-item bilinear term u^T A_k i is one linear map away
    # (an MLP on a concatenation learns products poorly: Rendle et al., RecSys 2020)
    interaction_dim: int = 0
    # a wide part (Wide & Deep, DeepFM; issue 17; off by default): one linear logit per task
    # over the concatenation and the interaction products, added to the task's tower logit, so
    # additive and bilinear terms need not pass through the experts' ReLUs
    wide: bool = False
    # cross features (Wide & Deep's cross-product transformation; issue 17; off by default):
    # a pair of categoricals (a, b) of two groups indexes a table by a * |B| + b, hashed into
    # `cross_buckets` rows when |A| * |B| is larger, computed in the graph from the categorical
    # inputs it already has. `crosses` declares pairs, "interest:category" (feature names, or
    # "user.interest:item.category"); `cross_max` > 0 adds every (user, item) pair of
    # categoricals with |A| * |B| <= cross_max, the tables' keys (user_id, item_id) excepted.
    # cross_mode "wide": the row is one logit per task added to the towers' logits (zero at
    # init: a free table per pair and task, as the oracle-features fit has); "embedding": a
    # `cross_dim`-wide vector that enters the first layer (experts, gates and `wide`).
    crosses: list[str] = field(default_factory=list)
    cross_max: int = 0
    cross_buckets: int = 65536
    cross_mode: Literal["wide", "embedding"] = "wide"
    cross_dim: int = 8
    # ple / cgc: experts per task, shared experts, extraction levels (cgc is always 1)
    task_experts: int = 2
    shared_experts: int = 2
    levels: int = 2
    # ESMM: task -> parent, p(task) = p(parent) * p(task | parent); a parent is never chained
    chain: dict[str, str] = field(default_factory=dict)
    gate_dropout: float = 0.0  # training only: each gate weight dropped, the rest renormalised
    # position tower: positions 0..buckets-1 (larger ones clipped), index `buckets` = missing
    position_buckets: int = 0  # 0: no tower
    position_hidden: int = 8
    position_dropout: float = 0.1  # training rows whose position is replaced by "missing"
    # set by training/calibration.py after training; knots of the isotonic lookup
    calibration: Calibration = "none"
    calibration_knots: int = 0

    def __post_init__(self) -> None:
        for t, parent in self.chain.items():
            if t not in self.tasks or parent not in self.tasks or t == parent:
                raise ValueError(f"chain {t!r} -> {parent!r}: both must be distinct tasks")
            if parent in self.chain:
                raise ValueError(f"chain parent {parent!r} is itself chained")
        if self.chain and self.task_kind != "binary":
            raise ValueError("a task chain needs binary tasks")
        if self.cross_mode not in ("wide", "embedding"):
            raise ValueError(f"cross_mode: wide or embedding, got {self.cross_mode!r}")
        if self.cross_buckets < 1 or self.cross_dim < 1:
            raise ValueError("cross_buckets and cross_dim: at least 1")
        _ = self.cross_pairs  # every declared cross resolves

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["inputs"] = [InputGroup(**g) for g in d["inputs"]]
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def input_specs(self) -> list[InputSpec]:
        """The graph's inputs in order, as `FeatureSchema.input_specs` lists them."""
        return [s for g in self.inputs for s in g.input_specs()]

    @property
    def hidden(self) -> list[int]:
        """Widths of the shared part: each expert's layers, or the bottom's."""
        return self.bottom_hidden if self.model_type == "shared_bottom" else self.expert_hidden

    @property
    def interaction_pairs(self) -> list[tuple[int, int]]:
        """Index pairs (into `inputs`) of the groups whose projections are multiplied."""
        if self.interaction_dim <= 0:
            return []
        return list(itertools.combinations(range(len(self.inputs)), 2))

    @property
    def cross_pairs(self) -> list[Cross]:
        """The cross features, declared ones first, then the automatic ones (`cross_max`)."""
        out: list[Cross] = []
        seen: set[tuple[int, int, int, int]] = set()

        def add(ga: int, ja: int, gb: int, jb: int) -> None:
            if (ga, ja, gb, jb) in seen:
                return
            seen.add((ga, ja, gb, jb))
            a, b = self.inputs[ga], self.inputs[gb]
            size = a.vocab_sizes[ja] * b.vocab_sizes[jb]
            out.append(Cross(f"{a.entity}.{a.names[ja]}:{b.entity}.{b.names[jb]}", ga, ja, gb,
                             jb, b.vocab_sizes[jb], min(size, self.cross_buckets),
                             size > self.cross_buckets))

        for decl in self.crosses:
            left, sep, right = decl.partition(":")
            if not sep:
                raise ValueError(f"cross {decl!r}: want feature:feature")
            (ga, ja), (gb, jb) = self._categorical(left, decl), self._categorical(right, decl)
            if ga == gb:
                raise ValueError(f"cross {decl!r}: the two features are of one group")
            add(ga, ja, gb, jb)
        if self.cross_max > 0:
            entities = [g.entity for g in self.inputs]
            if "user" in entities and CANDIDATE_ENTITY in entities:
                ga, gb = entities.index("user"), entities.index(CANDIDATE_ENTITY)
                a, b = self.inputs[ga], self.inputs[gb]
                for ja, jb in itertools.product(range(len(a.names)), range(len(b.names))):
                    if a.names[ja] == a.key or b.names[jb] == b.key:
                        continue
                    if a.vocab_sizes[ja] * b.vocab_sizes[jb] <= self.cross_max:
                        add(ga, ja, gb, jb)
        return out

    def _categorical(self, ref: str, decl: str) -> tuple[int, int]:
        """(group index, column) of a categorical named "name" or "entity.name"."""
        entity, _, name = ref.strip().rpartition(".")
        hits = [(gi, g.names.index(name)) for gi, g in enumerate(self.inputs)
                if name in g.names and entity in ("", g.entity)]
        if len(hits) != 1:
            where = "no" if not hits else "more than one"
            raise ValueError(f"cross {decl!r}: {where} categorical feature {ref.strip()!r} "
                             "(qualify it as entity.name)")
        return hits[0]

    @property
    def is_ple(self) -> bool:
        return self.model_type in ("ple", "cgc")

    @property
    def n_levels(self) -> int:
        return 1 if self.model_type == "cgc" else self.levels

    @property
    def n_gates(self) -> int:
        if self.is_ple:
            return len(self.tasks)
        return {"mmoe": len(self.tasks), "omoe": 1, "shared_bottom": 0}[self.model_type]

    @property
    def gate_width(self) -> int:
        """Experts one task's gate mixes: M of the `gates` output [B, T, M] (0: no gates)."""
        if self.model_type == "shared_bottom":
            return 0
        return self.task_experts + self.shared_experts if self.is_ple else self.n_experts

    @property
    def n_units(self) -> int:
        """Parallel copies of the shared part: the experts, or one bottom. PLE: every task's
        experts (task 0's first) and then the shared ones."""
        if self.is_ple:
            return len(self.tasks) * self.task_experts + self.shared_experts
        return 1 if self.model_type == "shared_bottom" else self.n_experts

    @property
    def first_gate_width(self) -> int:
        """Gate logits computed in the first layer: every first-level gate."""
        if not self.is_ple:
            return self.n_gates * self.n_experts
        shared_gate = self.n_units if self.n_levels > 1 else 0
        return len(self.tasks) * self.gate_width + shared_gate


class Cross(NamedTuple):
    """One resolved cross feature: groups and columns of its two categoricals, the second's
    vocabulary size, the table's rows, and whether the pair index is hashed into them."""

    name: str
    group_a: int
    column_a: int
    group_b: int
    column_b: int
    size_b: int
    rows: int
    hashed: bool


CROSS_HASH = 40503  # Knuth's multiplicative hash constant (16 bits): int64 never overflows


def inputs_from_schema(schema: FeatureSchema) -> list[InputGroup]:
    out = []
    for g in schema.groups:
        tables = [schema.table_of(f) for f in g.lists]
        columns = []
        for f in g.lists:
            owner = schema.group(f.table_entity)
            assert owner is not None  # table_of found it
            columns.append([c.name for c in owner.categorical].index(f.table_feature))
        out.append(InputGroup(
            entity=g.entity,
            vocab_sizes=[f.vocab_size for f in g.categorical],
            embedding_dims=[f.embedding_dim for f in g.categorical],
            n_dense=g.n_dense,
            list_lengths=[f.max_len for f in g.lists],
            list_entities=[f.table_entity for f in g.lists],
            list_columns=columns,
            list_dims=[t.embedding_dim for t in tables],
            list_pooling=[f.pooling for f in g.lists],
            names=[f.name for f in g.categorical],
            key=g.key,
        ))
    return out


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
    """MMoE, OMoE, Shared-Bottom, PLE or CGC, chosen by `config.model_type`."""

    # buffers of the options (registered only when the config asks for them)
    gate_scatter: Tensor
    position_roots: Tensor
    platt: Tensor
    iso_x: Tensor
    iso_w: Tensor
    iso_s: Tensor
    iso_y0: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoders = nn.ModuleDict(
            {g.entity: GroupEncoder(g, c.embedding_dropout) for g in c.inputs}
        )
        h0 = c.hidden[0]
        # first layer of every expert (or of the bottom) and every gate, split by input group
        self.first_width = c.n_units * h0 + c.first_gate_width + (len(c.tasks) if c.wide else 0)
        fan_in = sum(g.width for g in c.inputs)
        self.first = nn.ParameterDict(
            {
                g.entity: _uniform_(nn.Parameter(torch.empty(g.width, self.first_width)), fan_in)
                for g in c.inputs
            }
        )
        self.first_bias = _uniform_(nn.Parameter(torch.empty(self.first_width)), fan_in)
        pairs = c.interaction_pairs
        if pairs:
            d = c.interaction_dim
            self.interaction_proj = nn.ParameterDict(
                {g.entity: _uniform_(nn.Parameter(torch.empty(g.width, d)), g.width)
                 for g in c.inputs}
            )
            self.interaction_first = _uniform_(
                nn.Parameter(torch.empty(len(pairs) * d, self.first_width)), len(pairs) * d
            )
        crosses = self.crosses = c.cross_pairs  # resolved once
        if crosses:
            # wide: a logit per task and pair, 0 at init; embedding: a vector per pair, into
            # the first layer like the groups' embeddings
            wide_cross = c.cross_mode == "wide"
            dim = len(c.tasks) if wide_cross else c.cross_dim
            self.cross_tables = nn.ModuleList(nn.Embedding(x.rows, dim) for x in crosses)
            for emb in self.cross_tables:
                assert isinstance(emb, nn.Embedding)
                if wide_cross:
                    nn.init.zeros_(emb.weight)
                else:
                    nn.init.normal_(emb.weight, std=0.05)
        if crosses and c.cross_mode == "embedding":
            width = len(crosses) * c.cross_dim
            self.cross_first = _uniform_(nn.Parameter(torch.empty(width, self.first_width)),
                                         fan_in + width)
        if c.wide:  # the wide logits start at 0: the towers' base-rate bias alone
            with torch.no_grad():
                wide_cols = [*self.first.values(), self.first_bias.unsqueeze(0)]
                if pairs:
                    wide_cols.append(self.interaction_first)
                if crosses and c.cross_mode == "embedding":
                    wide_cols.append(self.cross_first)
                for w in wide_cols:
                    w[:, -len(c.tasks):] = 0.0
        # layers after the first, of each expert (or the bottom): (U, B, h0) -> (U, B, E)
        self.shared = BatchedMLP(c.n_units, c.hidden, last_activation=True, dropout=c.dropout)
        self.towers = BatchedMLP(
            len(c.tasks), [c.hidden[-1], *c.tower_hidden, 1], False, dropout=c.dropout
        )
        if c.is_ple:
            self.levels = nn.ModuleList(PLELevel(c, last=lv == c.n_levels - 1)
                                        for lv in range(1, c.n_levels))
            # (T, K, U): one-hot of the unit each column of a task's gate weighs
            scatter = nn.functional.one_hot(ple_gate_index(c), c.n_units).float()
            self.register_buffer("gate_scatter", scatter, persistent=False)
        if c.position_buckets:
            self.position = PositionTower(c.position_buckets, c.position_hidden)
            roots = torch.tensor([[float(t not in c.chain)] for t in c.tasks])  # (T, 1)
            self.register_buffer("position_roots", roots, persistent=False)
        n_tasks = len(c.tasks)
        if c.calibration == "platt":  # logit -> a * logit + b per task, before the sigmoid
            self.register_buffer("platt", torch.tensor([[1.0, 0.0]] * n_tasks))  # (T, 2)
        if c.calibration == "isotonic":
            # f(p) = y0 + sum_k slope_k * min(relu(p - x_k), width_k): piecewise linear, monotone
            k = c.calibration_knots
            for name in ("iso_x", "iso_w", "iso_s"):
                self.register_buffer(name, torch.zeros(n_tasks, 1, k))  # (T, 1, K)
            self.register_buffer("iso_y0", torch.zeros(n_tasks, 1))  # (T, 1)

    def input_names(self) -> list[str]:
        return [s.name for s in self.config.input_specs()]

    def first_layer(self, inputs: dict[str, Tensor]) -> Tensor:
        """Sum over groups of x_g @ W_g, broadcasting groups whose batch is 1: (B, first_width).

        A group with list features has x_g = [base_g, pooled list_1, ...]; each block is its
        own product with its rows of W_g (the same sum), so a mean-pooled user history is
        computed once per request and broadcast like the rest of the user's share."""
        c = self.config
        weights = [self.first[g.entity] for g in c.inputs]
        if c.interaction_pairs:  # one pass per group: its first-layer share and its projection
            weights = [torch.cat([w, self.interaction_proj[g.entity]], dim=1)
                       for w, g in zip(weights, c.inputs, strict=True)]
        h: Tensor = self.first_bias
        projections = []
        for g, w in zip(c.inputs, weights, strict=True):
            x_g = self.encoders[g.entity](
                inputs.get(input_name(g.entity, "cat")), inputs.get(input_name(g.entity, "dense"))
            )  # (B_g, base_width_g), B_g in {1, B}
            if not g.list_lengths:
                hg = x_g @ w  # (B_g, first_width [+ D])
            else:
                hg = x_g @ w[: g.base_width]
                row = g.base_width
                for j, pooled in enumerate(self.pooled_lists(g, inputs)):  # (B_g or B, d_j)
                    hg = hg + pooled @ w[row : row + g.list_dims[j]]
                    row += g.list_dims[j]
            if c.interaction_pairs:
                projections.append(hg[:, self.first_width :])  # (B_g, D)
                hg = hg[:, : self.first_width]
            h = h + hg  # (B, first_width)
        if c.interaction_pairs:
            # products of the groups' projections; a group of batch 1 broadcasts: (B, P * D)
            prods = [projections[a] * projections[b] for a, b in c.interaction_pairs]
            h = h + torch.cat(torch.broadcast_tensors(*prods), dim=1) @ self.interaction_first
        if self.crosses and c.cross_mode == "embedding":
            rows = [_dropout(e, c.embedding_dropout, self.training)
                    for e in self.cross_rows(inputs)]  # (B or 1, cross_dim) each
            h = h + torch.cat(torch.broadcast_tensors(*rows), dim=1) @ self.cross_first
        return h

    def cross_rows(self, inputs: dict[str, Tensor]) -> list[Tensor]:
        """Each cross feature's table row: index a * |B| + b (hashed when the table is smaller
        than the pair space), (B, T) in wide mode or (B, cross_dim); B is 1 when both groups
        come once per request (a user x context cross)."""
        c = self.config
        out = []
        for x, table in zip(self.crosses, self.cross_tables, strict=True):
            a = inputs[input_name(c.inputs[x.group_a].entity, "cat")][:, x.column_a]  # (B_a,)
            b = inputs[input_name(c.inputs[x.group_b].entity, "cat")][:, x.column_b]  # (B_b,)
            k = a * x.size_b + b  # (B,): the pair's index, broadcast over a batch-1 group
            if x.hashed:
                k = torch.remainder(k * CROSS_HASH, x.rows)
            out.append(table(k))
        return out

    def pooled_lists(self, g: InputGroup, inputs: dict[str, Tensor]) -> list[Tensor]:
        """Each list feature of group g, embedded with its table and pooled: (B_g, d) for
        mean pooling, (B, d) for attention against the candidates. Padding (index 0) never
        counts; an all-padding list (no history) pools to zeros."""
        lists = inputs[input_name(g.entity, "list")]  # (B_g, sum of caps) int64
        out, start = [], 0
        for j, length in enumerate(g.list_lengths):
            ids = lists[:, start : start + length]  # (B_g, L)
            start += length
            encoder = self.encoders[g.list_entities[j]]
            assert isinstance(encoder, GroupEncoder)
            table = encoder.embeddings[g.list_columns[j]]
            assert isinstance(table, nn.Embedding)
            e = table(ids)  # (B_g, L, d)
            mask = (ids != LIST_PADDING).to(e.dtype).unsqueeze(-1)  # (B_g, L, 1)
            if g.list_pooling[j] == "attention":
                cand = inputs[input_name(CANDIDATE_ENTITY, "cat")][:, g.list_columns[j]]
                q = table(cand).unsqueeze(1)  # (B, 1, d): the candidate's own id vector
                logits = (e * q).sum(-1, keepdim=True) / math.sqrt(g.list_dims[j])  # (B, L, 1)
                logits = logits + (mask - 1.0) * 1e9  # padding -> -1e9: weight 0 after softmax
                weight = torch.softmax(logits, dim=1) * mask  # (B, L, 1); all padding -> 0
                out.append((weight * e).sum(1))  # (B, d)
            else:
                count = mask.sum(1).clamp_min(1.0)  # (B_g, 1)
                out.append((e * mask).sum(1) / count)  # (B_g, d)
        return out

    def logits(self, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Tower logits (T, B), position logit included, and the gate outputs."""
        c = self.config
        h = self.first_layer(inputs)  # (B, U*h0 + first gate logits)
        h0 = c.hidden[0]
        split = c.n_units * h0
        gate_end = split + c.first_gate_width  # then the wide logits (T of them), if any
        units = torch.relu(h[:, :split].reshape(-1, c.n_units, h0)).transpose(0, 1)  # (U, B, h0)
        units = _dropout(units, c.dropout, self.training)
        units = self.shared(units)  # remaining layers: (U, B, E)
        out: dict[str, Tensor] = {}
        if c.model_type == "shared_bottom":
            task_in = units.expand(len(c.tasks), -1, -1)  # (T, B, E)
        elif c.is_ple:
            task_in, levels = self._ple(units, h[:, split:gate_end])
            out[GATES_OUTPUT] = levels[-1]  # (B, T, K): the last level's task gates
            if c.model_type == "ple":
                out[GATES_LEVELS_OUTPUT] = torch.stack(levels, dim=1)  # (B, L, T, K)
        else:
            logits = h[:, split:gate_end].reshape(-1, c.n_gates, c.n_experts)  # (B, G, M)
            gates = self._gate(logits).expand(-1, len(c.tasks), -1)  # (B, T, M)
            mixed = torch.bmm(gates, units.transpose(0, 1))  # (B, T, M) @ (B, M, E) -> (B, T, E)
            task_in = mixed.transpose(0, 1)  # (T, B, E)
            out[GATES_OUTPUT] = gates
        z = self.towers(task_in).squeeze(-1)  # (T, B)
        if c.wide:
            z = z + h[:, gate_end:].T  # (T, B)
        if self.crosses and c.cross_mode == "wide":
            for row in self.cross_rows(inputs):  # (B or 1, T)
                z = z + row.T
        if c.position_buckets:
            pos = self.position(inputs.get(POSITION_INPUT) if self.training else None,
                                c.position_dropout if self.training else 0.0)  # (B,) or (1,)
            # added to each root task's logit; a chained task inherits it through its parent
            z = z + self.position_roots * pos.view(1, -1)  # (T, B)
        return z, out

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        c = self.config
        z, out = self.logits(inputs)  # (T, B)
        if c.task_kind != "binary":
            for t, task in enumerate(c.tasks):
                out[task] = z[t]
            return out
        return {**self.head(z), **out}

    def head(self, z: Tensor) -> dict[str, Tensor]:
        """Logits (T, B) -> per-task probabilities: Platt, sigmoid, the chain, isotonic.

        With a chain, p(child) = p(parent) * q(child) with q in [0, 1], and after isotonic the
        child is min(iso(p(child)), p(parent)): p(child) <= p(parent) holds in every case."""
        c = self.config
        if c.calibration == "platt":
            z = self.platt[:, :1] * z + self.platt[:, 1:]  # (T, B)
        y = torch.sigmoid(z)  # (T, B)
        p = {task: y[t] for t, task in enumerate(c.tasks)}
        for task, parent in c.chain.items():
            p[task] = p[parent] * p[task]  # (B,)
        if c.calibration == "isotonic":
            y = torch.stack([p[t] for t in c.tasks]).unsqueeze(-1)  # (T, B, 1)
            ramps = torch.minimum(torch.relu(y - self.iso_x), self.iso_w)  # (T, B, K)
            y = self.iso_y0 + (ramps * self.iso_s).sum(-1)  # (T, B)
            p = {task: y[t] for t, task in enumerate(c.tasks)}
            for task, parent in c.chain.items():
                p[task] = torch.minimum(p[task], p[parent])
        return p

    def _gate(self, logits: Tensor) -> Tensor:
        """softmax over the last axis, with gate dropout in training: (..., M)."""
        g = torch.softmax(logits, dim=-1)
        rate = self.config.gate_dropout
        if self.training and rate > 0:
            keep = (torch.rand_like(g) >= rate).to(g.dtype)
            kept = g * keep
            total = kept.sum(-1, keepdim=True)
            # a row whose every weight was dropped keeps its gate
            g = torch.where(total > 0, kept / total.clamp_min(1e-12), g)
        return g

    def _ple(self, units: Tensor, first_gates: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Progressive extraction: task inputs (T, B, E), every level's task gates (B, T, K)."""
        c = self.config
        n_tasks, k = len(c.tasks), c.gate_width
        task_logits = first_gates[:, : n_tasks * k].reshape(-1, n_tasks, k)  # (B, T, K)
        shared_logits = first_gates[:, n_tasks * k :]  # (B, U) or (B, 0)
        levels: list[Tensor] = []
        for lv in range(c.n_levels):
            by_row = units.transpose(0, 1)  # (B, U, E)
            gates = self._gate(task_logits)  # (B, T, K)
            levels.append(gates)
            # each task's weights spread over all units (zero off its own and the shared ones)
            spread = torch.matmul(gates.transpose(0, 1), self.gate_scatter)  # (T, B, U)
            task_mix = torch.bmm(spread.transpose(0, 1), by_row)  # (B, T, U) @ (B, U, E)
            if lv == c.n_levels - 1:
                return task_mix.transpose(0, 1), levels  # (T, B, E)
            shared_g = self._gate(shared_logits)  # (B, U)
            shared_mix = torch.bmm(shared_g.unsqueeze(1), by_row).squeeze(1)  # (B, E)
            nxt = self.levels[lv]
            units, task_logits, shared_logits = nxt(task_mix.transpose(0, 1), shared_mix)
        raise AssertionError("unreachable")

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
        if self.config.model_type == "ple":
            gates.append(GATES_LEVELS_OUTPUT)
        return [*self.config.tasks, *gates]

    def gradnorm_layer(self) -> Tensor:
        """The last shared layer's weights: GradNorm balances the task gradients there."""
        return self.shared.weights[-1] if len(self.shared.weights) else self.first_bias


def ple_gate_index(c: ModelConfig) -> Tensor:
    """(T, K) unit indices each task's gate mixes: its own experts, then the shared experts."""
    n_tasks, kt, ks = len(c.tasks), c.task_experts, c.shared_experts
    shared = list(range(n_tasks * kt, n_tasks * kt + ks))
    return torch.tensor([list(range(t * kt, (t + 1) * kt)) + shared for t in range(n_tasks)])


class PLELevel(nn.Module):
    """One extraction level after the first: experts and gates reading the previous level's
    mixtures (task t's experts and gate read task t's mixture, the shared ones the shared)."""

    source: Tensor

    def __init__(self, c: ModelConfig, last: bool) -> None:
        super().__init__()
        n_tasks, e = len(c.tasks), c.hidden[-1]
        self.experts = BatchedMLP(c.n_units, [e, *c.hidden], last_activation=True)
        self.task_gates = BatchedMLP(n_tasks, [e, c.gate_width], last_activation=False)
        self.shared_gate = None if last else BatchedMLP(1, [e, c.n_units], last_activation=False)
        # unit u reads task t's mixture (its own experts) or the shared one (index T)
        source = [t for t in range(n_tasks) for _ in range(c.task_experts)]
        self.register_buffer("source", torch.tensor(source + [n_tasks] * c.shared_experts),
                             persistent=False)

    def forward(self, task_mix: Tensor, shared_mix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(T, B, E), (B, E) -> units (U, B, E), task gate logits (B, T, K), shared (B, U|0)."""
        src = torch.cat([task_mix, shared_mix.unsqueeze(0)])  # (T + 1, B, E)
        units = self.experts(src[self.source])  # each unit's input: (U, B, E)
        task_logits = self.task_gates(task_mix).transpose(0, 1)  # (B, T, K)
        if self.shared_gate is None:
            shared_logits = task_logits.new_zeros(task_logits.shape[0], 0)
        else:
            shared_logits = self.shared_gate(shared_mix.unsqueeze(0))[0]  # (B, U)
        return units, task_logits, shared_logits


class PositionTower(nn.Module):
    """The shallow position tower: position -> embedding -> ReLU layer -> one logit.

    Without positions (serving: the graph has no position input) every row gets the logit of
    the "missing" bucket, a constant learned from the rows whose position was dropped."""

    def __init__(self, buckets: int, hidden: int) -> None:
        super().__init__()
        self.buckets = buckets
        self.embedding = nn.Embedding(buckets + 1, hidden)  # last row: missing
        self.out = nn.Linear(hidden, 1)

    def forward(self, position: Tensor | None, dropout: float) -> Tensor:
        if position is None:
            idx = torch.full((1,), self.buckets, dtype=torch.long, device=self.out.weight.device)
        else:
            idx = position.long().clamp(0, self.buckets - 1)  # (B,)
            if dropout > 0:
                drop = torch.rand(idx.shape, device=idx.device) < dropout
                idx = torch.where(drop, torch.full_like(idx, self.buckets), idx)
        return self.out(torch.relu(self.embedding(idx))).squeeze(-1)  # (B,) or (1,)


class PositionalWrapper(nn.Module):
    """Named dict in/out -> positional tuple in/out, for ONNX export."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model
        self.names = model.input_names()

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        out = self.model(dict(zip(self.names, args, strict=True)))
        return tuple(out[n] for n in self.model.output_names())
