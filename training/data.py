"""From a dataset spec to model inputs: read the splits, join, build the schema, encode.

Training examples are the log joined with the user and item tables on their keys, the same join
the service does online against Redis. The `FeatureSchema` (vocabularies and dense statistics)
is fitted on the train split only, then `GroupSchema.encode_columns` (shared with the feature
loader and the service) encodes every split.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ranker.manifest import sha256_file
from ranker.schema import (
    ENTITIES,
    CategoricalFeature,
    DenseFeature,
    FeatureSchema,
    GroupSchema,
    HashedVocabulary,
    ListFeature,
    ListPooling,
    Vocabulary,
    vocabulary_from_counts,
)
from training.model import POSITION_INPUT
from training.spec import DatasetSpec, FeatureSpec, SpecError

SPLITS = ("train", "val", "test")


@dataclass
class RawData:
    """The log splits plus entity tables, as pyarrow tables of raw values."""

    splits: dict[str, pa.Table]
    users: pa.Table | None
    items: pa.Table | None
    sha256: str  # of the source files
    # encoded entity tables of the factorized join (`Gathered`), by (schema version, entity)
    encoded_entities: dict[tuple[str, str], dict[str, np.ndarray]] = dataclasses.field(
        default_factory=dict, repr=False)

    def row_counts(self) -> dict[str, int]:
        return {k: t.num_rows for k, t in self.splits.items()}


class Gathered:
    """An input of the factorized join: row i is `table[rows[i]]`, the entity's encoded row
    of impression i, gathered per batch instead of materialised for every impression (at 10 M
    impressions over a million users' 20-item histories that matrix would not fit). Works on
    numpy arrays and on torch tensors alike (`training.train.to_tensors` converts it)."""

    def __init__(self, table: Any, rows: Any) -> None:
        self.table = table  # (entities + 1, width): the last row is the missing entity's
        self.rows = rows  # (N,) int64 row of each impression

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.table.shape[1:])

    @property
    def dtype(self) -> Any:
        return self.table.dtype

    def __getitem__(self, idx: Any) -> Any:
        return self.table[self.rows[idx]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self.table[self.rows])
        return out if dtype is None else out.astype(dtype)


# The factorized join (`Gathered`) serves a spec with list features, or a log larger than this
# (rows of a split): the default dataset keeps the materialised join, as before.
FACTORIZE_ROWS = 1_000_000


def factorized(spec: DatasetSpec, raw: RawData) -> bool:
    """Whether `encode_split` gathers entity rows per batch instead of joining up front."""
    if spec.source.kind != "tables":
        return False
    return (any(f.type == "list" for f in spec.features)
            or max(t.num_rows for t in raw.splits.values()) > FACTORIZE_ROWS)


@dataclass
class Encoded:
    """One split, encoded: model inputs (tiled, every group has N rows; an entity's may be
    `Gathered`), labels [N, T], oracle."""

    inputs: dict[str, Any]
    labels: np.ndarray  # (N, T) float32
    oracle: np.ndarray | None  # (N, T) true probabilities, synthetic data only

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> Encoded:
        return Encoded(
            {k: v[idx] for k, v in self.inputs.items()},  # a Gathered input materialises
            self.labels[idx],
            None if self.oracle is None else self.oracle[idx],
        )


def load_raw(spec: DatasetSpec, data_dir: Path | None = None) -> RawData:
    """Read a spec's source: parquet tables, or a delimited file split with a fixed seed."""
    if spec.source.kind == "tables":
        return _load_tables(spec, spec.data_dir(data_dir))
    return _load_csv(spec)


def _load_tables(spec: DatasetSpec, base: Path) -> RawData:
    src = spec.source
    files = {k: base / v for k, v in src.splits.items()}
    users = base / src.users if src.users else None
    items = base / src.items if src.items else None
    paths = [p for p in (*files.values(), users, items) if p is not None]
    h = hashlib.sha256()  # same recipe as the generator's dataset.json "sha256"
    for p in sorted(paths, key=lambda p: p.stem):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (run `ranker data --out {base}`)")
        h.update(p.stem.encode())
        h.update(p.read_bytes())
    return RawData(
        splits={k: pq.read_table(files[k]) for k in SPLITS},
        users=pq.read_table(users) if users else None,
        items=pq.read_table(items) if items else None,
        sha256=h.hexdigest(),
    )


def _read_delimited(path: Path, columns: list[str], separator: str, na: str | None) -> pa.Table:
    """All columns as trimmed strings, `na` as null. The separator's first character splits
    (pyarrow's fast reader takes one character), then padding such as the space of ", " is
    trimmed; a field containing the character itself would misalign and is reported."""
    opts = pacsv.ParseOptions(delimiter=separator[0])
    read = pacsv.ReadOptions(column_names=columns)
    conv = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns}, strings_can_be_null=False
    )
    try:
        table = pacsv.read_csv(path, read_options=read, parse_options=opts, convert_options=conv)
    except pa.ArrowInvalid as e:
        raise SpecError(f"{path}: does not match the spec's {len(columns)} columns: {e}") from e
    out = {}
    for name in columns:
        col = pc.utf8_trim_whitespace(table[name])
        out[name] = pc.if_else(pc.equal(col, na), None, col) if na is not None else col
    return pa.table(out)


def _load_csv(spec: DatasetSpec) -> RawData:
    src = spec.source
    path = spec.csv_path()
    table = _read_delimited(path, src.columns, src.separator, src.na)
    rng = np.random.default_rng(src.split.seed)
    order = rng.permutation(table.num_rows)
    n_train = round(src.split.train * table.num_rows)
    n_val = round(src.split.val * table.num_rows)
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val],
             "test": order[n_train + n_val :]}
    if src.max_train_rows:
        parts["train"] = parts["train"][: src.max_train_rows]
    return RawData(
        splits={k: table.take(pa.array(np.sort(v))) for k, v in parts.items()},
        users=None,
        items=None,
        sha256=sha256_file(path),
    )


def joined_columns(spec: DatasetSpec, raw: RawData, log: pa.Table, entity: str) -> dict[str, Any]:
    """Raw columns of `entity` for each log row: a left join on the entity key; misses are null."""
    names = [f.name for f in spec.features_of(entity)]
    if entity == "context":
        return {n: log[n] for n in names if n in log.column_names}
    table = raw.users if entity == "user" else raw.items
    key = spec.source.user_key if entity == "user" else spec.source.item_key
    assert table is not None and key is not None  # checked by the spec parser
    idx = pc.index_in(log[key], value_set=table[key].combine_chunks())  # null: unknown id
    picked = table.select([n for n in names if n in table.column_names]).take(idx)
    return {n: picked[n] for n in picked.column_names}


class _Join:
    """The log's rows of one entity's columns, joined one column at a time on demand."""

    def __init__(self, spec: DatasetSpec, raw: RawData, log: pa.Table, entity: str) -> None:
        self.log = log
        self.table = None if entity == "context" else (raw.users if entity == "user"
                                                       else raw.items)
        if self.table is None:
            self.names = set(log.column_names)
            self.idx = None
        else:
            key = spec.source.user_key if entity == "user" else spec.source.item_key
            self.names = set(self.table.column_names)
            self.idx = pc.index_in(log[key], value_set=self.table[key].combine_chunks())

    def column(self, name: str) -> Any:
        if self.table is None:
            return self.log[name]
        return self.table[name].take(self.idx)


def entity_rows(spec: DatasetSpec, raw: RawData, log: pa.Table, entity: str) -> np.ndarray:
    """(N,) int64: each log row's row in the entity table; a missing entity gets the row past
    the end (`Gathered` tables carry the default row there)."""
    table = raw.users if entity == "user" else raw.items
    key = spec.source.user_key if entity == "user" else spec.source.item_key
    assert table is not None and key is not None
    idx = pc.index_in(log[key], value_set=table[key].combine_chunks())
    return np.asarray(pc.fill_null(idx, table.num_rows).to_numpy(zero_copy_only=False),
                      dtype=np.int64)


def encoded_entity(spec: DatasetSpec, schema: FeatureSchema, raw: RawData,
                   entity: str) -> dict[str, np.ndarray]:
    """An entity table encoded once per schema (every split shares it), its default row
    appended: input name -> (entities + 1, width)."""
    key = (schema.version, entity)
    if key not in raw.encoded_entities:
        g = schema.group(entity)
        table = raw.users if entity == "user" else raw.items
        assert g is not None and table is not None
        cols = {n: table[n] for n in g.feature_names if n in table.column_names}
        enc = g.encode_inputs(cols, table.num_rows)
        default = g.default_inputs(1)
        raw.encoded_entities[key] = {k: np.concatenate([v, default[k].astype(v.dtype)])
                                     for k, v in enc.items()}
    return raw.encoded_entities[key]


def _dense_stats(values: Any, log1p: bool) -> tuple[float, float]:
    x = np.asarray(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    x = x[~np.isnan(x)]
    if log1p:
        x = np.log1p(np.maximum(x, 0.0))
    if not len(x):
        return 0.0, 1.0
    std = float(x.std())
    return float(x.mean()), std if std > 1e-12 else 1.0


def build_schema(spec: DatasetSpec, raw: RawData) -> FeatureSchema:
    """Fit vocabularies and dense statistics on the train split (joined), in spec order."""
    train = raw.splits["train"]
    groups = []
    lists: dict[str, list[FeatureSpec]] = {}
    for entity in ENTITIES:
        feats = spec.features_of(entity)
        if not feats:
            continue
        join = _Join(spec, raw, train, entity)
        cats, dense = [], []
        for f in feats:
            if f.name not in join.names:
                raise SpecError(f"feature {entity}.{f.name}: no such column in the {entity} data")
            if f.type == "list":  # after every group's categoricals: it takes one's vocabulary
                lists.setdefault(entity, []).append(f)
                continue
            cols = {f.name: join.column(f.name)}  # one joined column at a time: bounded memory
            if f.type == "categorical":
                vocab: Vocabulary | HashedVocabulary
                if f.hash_buckets is not None:  # no vocabulary to fit: the hash is fixed
                    vocab = HashedVocabulary(f.hash_buckets)
                else:
                    vocab = vocabulary_from_counts(cols[f.name], f.min_count, f.max_vocab)
                cats.append(CategoricalFeature(f.name, vocab, f.embedding_dim))
            else:
                mean, std = _dense_stats(cols[f.name], f.log1p)
                # default: the raw value that encodes to 0 (the train mean after the transform)
                default = f.default if f.default is not None else (
                    float(np.expm1(mean)) if f.log1p else mean
                )
                dense.append(DenseFeature(f.name, mean, std, default, f.log1p))
        key = {"user": spec.source.user_key, "item": spec.source.item_key}.get(entity)
        groups.append(GroupSchema(entity, key, tuple(cats), tuple(dense)))
    return FeatureSchema(tuple(_add_lists(groups, lists)))


def _add_lists(groups: list[GroupSchema], lists: dict[str, list[FeatureSpec]]
               ) -> list[GroupSchema]:
    """The groups with their list features, each given its table's vocabulary."""
    vocab = {f"{g.entity}.{c.name}": c.vocab for g in groups for c in g.categorical}
    out = []
    for g in groups:
        feats = tuple(ListFeature(f.name, f.max_len, f.table, vocab[f.table],
                                  cast(ListPooling, f.pooling))
                      for f in lists.get(g.entity, []))
        out.append(dataclasses.replace(g, lists=feats) if feats else g)
    return out


def labels_of(spec: DatasetSpec, log: pa.Table) -> np.ndarray:
    """(N, T) float32 labels by each task's rule (`TaskSpec`): the 0/1 column, the raw value in
    a set of positive values, or the value above a threshold; a missing value is 0."""
    out = np.empty((log.num_rows, len(spec.tasks)), dtype=np.float32)
    for j, t in enumerate(spec.tasks):
        col = log[t.column]
        if t.positive is not None:
            values = pa.array(t.positive, type=pa.string())
            hit = pc.is_in(pc.cast(col, pa.string()), value_set=values)
        elif t.above is not None or t.at_least is not None:
            try:
                x = pc.cast(col, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SpecError(f"task {t.name}: {t.column} is not numeric: {e}") from e
            hit = pc.greater(x, t.above) if t.above is not None else pc.greater_equal(x, t.at_least)
        else:
            out[:, j] = np.asarray(pc.cast(col, pa.float32()).to_numpy(zero_copy_only=False))
            continue
        out[:, j] = np.asarray(pc.fill_null(hit, False), dtype=np.float32)
    return out


def encode_split(spec: DatasetSpec, schema: FeatureSchema, raw: RawData, split: str) -> Encoded:
    """Join and encode one split with the shared schema encoder."""
    log = raw.splits[split]
    n = log.num_rows
    inputs: dict[str, Any] = {}
    gather = factorized(spec, raw)
    for g in schema.groups:
        if gather and g.entity != "context":
            rows = entity_rows(spec, raw, log, g.entity)
            for name, table in encoded_entity(spec, schema, raw, g.entity).items():
                inputs[name] = Gathered(table, rows)
            continue
        inputs.update(g.encode_inputs(joined_columns(spec, raw, log, g.entity), n))
    oracle = None
    if spec.source.oracle:
        oracle = np.stack(
            [log[spec.source.oracle[t]].to_numpy().astype(np.float32) for t in spec.task_names], 1
        )
    if POSITION_INPUT in log.column_names:  # a position-biased log: for the position tower only
        inputs[POSITION_INPUT] = log[POSITION_INPUT].to_numpy().astype(np.int64)  # (N,)
    return Encoded(inputs, labels_of(spec, log), oracle)


def training_data_info(spec: DatasetSpec, raw: RawData) -> dict[str, Any]:
    """What the manifest records about the data: dataset, sha256 of the source, row counts."""
    info: dict[str, Any] = {"dataset": spec.name, "sha256": raw.sha256, "rows": raw.row_counts()}
    if spec.source.kind == "csv":
        s = spec.source.split
        info["split"] = {"train": s.train, "val": s.val, "test": s.test, "seed": s.seed,
                         "max_train_rows": spec.source.max_train_rows}
    return info
