"""The feature schema: the one contract between the trainer, the feature store and the service.

Encoding happens here, outside the ONNX graph, and every stage calls the same functions:
the trainer encodes its joined training tables, `ranker features load` encodes the user and
item tables before writing them to Redis, and the service encodes the request's context
features. The graph therefore takes only integer indices and normalised floats, Redis holds
records that decode straight into model input arrays with no per-feature Python work, and
there is no training/serving skew because there is one implementation.

Conventions:
- categorical index 0 is the out-of-vocabulary / missing bucket; vocabulary entry i is index i+1;
  raw values are compared as strings (``7`` and ``"7"`` are the same value);
- a hashed categorical (`HashedVocabulary`, for vocabularies too large to list) has no value
  list: a present value goes to ``1 + stable_hash(value) % buckets`` (`stable_hash`, 64 bits of
  BLAKE2b over the UTF-8 string, never Python's per-process `hash`), a missing one to 0; its
  description carries ``hash_buckets`` and ``hash`` so every stage rebuilds the same encoder;
- dense values are ``(transform(x) - mean) / std`` with the optional transform ``log1p``;
  a missing dense value takes the feature's raw ``default`` (the train mean unless the spec says
  otherwise), encoded like any other value;
- a group's encoded features reach the model as two inputs named by `input_name`,
  ``<entity>_cat`` (int64 indices) and ``<entity>_dense`` (float32), listed by
  `FeatureSchema.input_specs`; the item group's batch is the candidates, the user's and the
  context's is 1 at serving time. Everything that builds or reads model inputs (trainer,
  export, loader, feature store reader, service, benchmark) asks this module for them;
- a list feature (`ListFeature`, e.g. the user's recent item ids) holds up to `max_len` ids of
  another group's categorical (its `table`, e.g. ``item.item_id``): it is encoded with that
  feature's vocabulary and embedded with that feature's embedding table (one table, so a
  history item and a candidate share their vector). The encoded list is `max_len` indices,
  the list's ids in order (most recent first), then `LIST_PADDING` (0) to the cap; an id
  outside the vocabulary encodes to 0 too, so it is dropped like padding. A missing or empty
  list (a new user) is all padding, the feature's default, and pools to the zero vector. A
  raw list longer than `max_len` is an error (`ListTooLongError`), never silently cut. A
  group's lists reach the model as a third input ``<entity>_list`` (int64, [batch, sum of
  the caps], each feature's block in order), and sit in the stored record the same way;
  groups without lists have no such input and keep their record layout and schema version.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ENTITIES = ("user", "item", "context")
CANDIDATE_ENTITY = "item"  # the group whose rows are the candidates; the others come once per user
OOV_INDEX = 0
LIST_PADDING = 0  # the index that fills a list past its ids (OOV_INDEX: an unknown id drops too)
InputKind = Literal["cat", "dense", "list"]
INPUT_DTYPES: dict[InputKind, str] = {"cat": "int64", "dense": "float32", "list": "int64"}
ListPooling = Literal["mean", "attention"]
LIST_POOLINGS: tuple[ListPooling, ...] = ("mean", "attention")


def input_name(entity: str, kind: InputKind) -> str:
    """The model input tensor of one group's categorical indices or dense values: "user_cat"."""
    return f"{entity}_{kind}"


def batch_axis(entity: str) -> str:
    """The name of a group's batch axis: the candidates' is "batch", the others' their own."""
    return "batch" if entity == CANDIDATE_ENTITY else f"{entity}_batch"


class InputSpec(NamedTuple):
    """One model input: shape [batch, width], the batch named by `batch_axis(entity)`."""

    name: str
    dtype: str
    width: int
    entity: str
    kind: InputKind

    @property
    def batch_axis(self) -> str:
        return batch_axis(self.entity)


def group_input_specs(entity: str, n_cat: int, n_dense: int, list_width: int = 0
                      ) -> list[InputSpec]:
    """The model inputs of one feature group: its categorical, dense and list tensors, if any."""
    widths: dict[InputKind, int] = {"cat": n_cat, "dense": n_dense, "list": list_width}
    return [
        InputSpec(input_name(entity, kind), INPUT_DTYPES[kind], width, entity, kind)
        for kind, width in widths.items()
        if width
    ]


DICT_LOOKUP_RATIO = 8  # values per call below vocabulary size / this: looked up one by one


@dataclass(frozen=True)
class Vocabulary:
    """Raw categorical values in index order (index = position + 1; 0 is out-of-vocabulary)."""

    values: tuple[str, ...]
    _lookup: dict[str, int] = field(init=False, repr=False, compare=False)
    _array: pa.Array = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lookup", {v: i + 1 for i, v in enumerate(self.values)})
        object.__setattr__(self, "_array", pa.array(self.values, type=pa.string()))

    @property
    def size(self) -> int:
        """Number of embedding rows: the vocabulary plus the out-of-vocabulary bucket."""
        return len(self.values) + 1

    @functools.cached_property
    def sha256(self) -> str:
        """(Computed once: a schema's version hashes every vocabulary, a million ids long.)"""
        return hashlib.sha256("\n".join(self.values).encode()).hexdigest()

    def encode_one(self, value: Any) -> int:
        if value is None:
            return OOV_INDEX
        return self._lookup.get(_as_key(value), OOV_INDEX)

    def encode(self, values: Any) -> np.ndarray:
        """Vectorised lookup of raw values (pyarrow array, numpy array or list) -> int32 indices.

        `index_in` hashes the whole vocabulary on every call; for a few values against a large
        vocabulary (a loader's batch of 50 000 users against a million ids) a binary search in
        the vocabulary sorted once (`_sorted`) is far cheaper. A dictionary-encoded column (a
        Parquet column read with `read_dictionary`) looks up its dictionary only and takes the
        indices. Every path compares the same UTF-8 bytes: the same indices."""
        if isinstance(values, pa.ChunkedArray) and pa.types.is_dictionary(values.type):
            parts = [self.encode(c) for c in values.chunks]
            return np.concatenate(parts) if parts else np.zeros(0, np.int32)
        if isinstance(values, pa.Array) and pa.types.is_dictionary(values.type):
            # a file's steps share its row group's dictionary: encoded once, reused while equal
            last = self.__dict__.get("_last_dictionary")
            if last is not None and last[0].equals(values.dictionary):
                codes = last[1]
            else:
                codes = self.encode(values.dictionary)
                self.__dict__["_last_dictionary"] = (values.dictionary, codes)
            at = np.asarray(pc.fill_null(values.indices, 0).to_numpy(zero_copy_only=False))
            out = codes[at] if len(codes) else np.full(len(values), OOV_INDEX, np.int32)
            if values.null_count:
                out[np.asarray(values.is_null().to_numpy(zero_copy_only=False))] = OOV_INDEX
            return out
        arr = _as_strings(values)
        if len(arr) * DICT_LOOKUP_RATIO < len(self.values):
            sorted_index = self._sorted
            flat = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
            found = sorted_index.lookup(flat) if sorted_index is not None else None
            if found is not None:
                return found
            get = self._lookup.get
            return np.fromiter((OOV_INDEX if v is None else get(v, OOV_INDEX)
                                for v in arr.to_pylist()), np.int32, len(arr))
        idx = pc.index_in(arr, value_set=self._array)
        out = pc.fill_null(pc.add(idx, 1), OOV_INDEX)
        return np.asarray(out.to_numpy(zero_copy_only=False), dtype=np.int32)

    @functools.cached_property
    def _sorted(self) -> _SortedIndex | None:
        """The vocabulary as fixed-width bytes, sorted (built on first use); None when a value
        holds a NUL byte (fixed-width bytes would not tell "a" from "a\\0") or the copy would
        be too large (`fixed_width`): the dict lookup then."""
        return _SortedIndex.build(self._array)


class _SortedIndex(NamedTuple):
    """A vocabulary's values as sorted fixed-width bytes, and each one's index."""

    keys: np.ndarray  # (V,) S<width>, sorted
    codes: np.ndarray  # (V,) int32: keys[i]'s vocabulary index (position + 1)

    @staticmethod
    def build(values: pa.Array) -> _SortedIndex | None:
        fixed = fixed_width(values, None)
        if fixed is None or not len(values):
            return None
        keys = fixed[0]
        order = np.argsort(keys, kind="stable")
        return _SortedIndex(keys[order], (order + 1).astype(np.int32))

    def lookup(self, values: pa.Array) -> np.ndarray | None:
        """Indices of string `values` (unknown and null -> OOV_INDEX); None when `fixed_width`
        cannot copy them."""
        width = self.keys.dtype.itemsize
        fixed = fixed_width(values, width)
        if fixed is None:
            return None
        keys, fits = fixed
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = (self.keys[pos] == keys) & fits
        if values.null_count:
            hit &= ~np.asarray(values.is_null().to_numpy(zero_copy_only=False))
        return np.where(hit, self.codes[pos], OOV_INDEX).astype(np.int32)


FIXED_WIDTH_MAX_BYTES = 64 << 20  # a fixed-width copy larger than this: None (callers fall back)


def fixed_width(values: pa.Array, width: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A pyarrow string array as (n,) numpy S<width> (zero-padded; width None = the longest
    value) and which values fit in `width`; None when a value holds a NUL byte or the copy would
    exceed `FIXED_WIDTH_MAX_BYTES` (one long value among many short ones). No Python object per
    value: the values are copied by length, one block per length."""
    if pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
    n = len(values)
    if not n:
        return np.zeros(0, f"S{max(1, width or 1)}"), np.zeros(0, bool)
    offsets = np.frombuffer(values.buffers()[1], np.int32)[values.offset : values.offset + n + 1]
    data = values.buffers()[2]
    chars = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    chars = chars[offsets[0] : offsets[-1]]
    if np.any(chars == 0):
        return None
    lengths = np.diff(offsets)
    w = max(1, int(lengths.max()) if width is None else width)
    if n * w > FIXED_WIDTH_MAX_BYTES:
        return None
    out = np.zeros((n, w), np.uint8)
    fits = lengths <= w
    for k in np.flatnonzero(np.bincount(lengths[fits], minlength=1)).tolist():
        if k:
            rows = np.flatnonzero(lengths == k)
            out[rows, :k] = chars[(offsets[rows] - offsets[0])[:, None] + np.arange(k)]
    return out.view(f"S{w}").ravel(), fits


def _as_strings(values: Any) -> pa.Array | pa.ChunkedArray:
    """Raw values as pyarrow strings, spelled as `_as_key` spells one value; missing = null."""
    if isinstance(values, pa.Array | pa.ChunkedArray):
        arr = values
    else:  # from_pandas: NaN counts as missing
        arr = pa.array(values, from_pandas=True)
    if pa.types.is_floating(arr.type):
        # ids read back as floats (1.0) must match their integer spelling ("1")
        arr = pc.cast(arr, pa.int64(), safe=False)
    if not pa.types.is_string(arr.type):
        arr = pc.cast(arr, pa.string())
    return arr


def _as_key(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


HASH_FUNCTION = "blake2b-64"  # the name a hashed feature's description carries


def stable_hash(value: str) -> int:
    """64-bit hash of a string, the same in every process and on every machine (unlike `hash`)."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class HashedVocabulary:
    """A categorical encoded by hashing into `buckets` rows (index 0 stays missing): for
    vocabularies too large to list. Different values may share a row (a collision); that is the
    price of a bounded table. Same interface as `Vocabulary`, with no listable `values`."""

    buckets: int

    def __post_init__(self) -> None:
        if self.buckets < 1:
            raise ValueError(f"hash_buckets must be >= 1, got {self.buckets}")

    @property
    def values(self) -> tuple[str, ...]:
        return ()  # nothing to list: callers that sample values (playground, bench) get none

    @property
    def size(self) -> int:
        return self.buckets + 1

    @property
    def sha256(self) -> str:
        """Of the encoder's definition (there is no value list to hash)."""
        return hashlib.sha256(f"{HASH_FUNCTION}:{self.buckets}".encode()).hexdigest()

    def bucket(self, key: str) -> int:
        return 1 + stable_hash(key) % self.buckets

    def encode_one(self, value: Any) -> int:
        if value is None or _is_nan(value):
            return OOV_INDEX
        return self.bucket(_as_key(value))

    def encode(self, values: Any) -> np.ndarray:
        """Vectorised: each distinct value is hashed once -> int32 indices."""
        arr = _as_strings(values)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        d = pc.dictionary_encode(arr)
        # one code per distinct value, and a trailing OOV for the nulls' index -1
        codes = np.array([*map(self.bucket, d.dictionary.to_pylist()), OOV_INDEX], np.int32)
        idx = np.asarray(pc.fill_null(d.indices, -1).to_numpy(zero_copy_only=False))
        return codes[idx]


@dataclass(frozen=True)
class CategoricalFeature:
    name: str
    vocab: Vocabulary | HashedVocabulary
    embedding_dim: int

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "vocab_sha256": self.vocab.sha256,
            "default": OOV_INDEX,
        }
        if isinstance(self.vocab, HashedVocabulary):  # only then: listed features keep their
            d["hash_buckets"] = self.vocab.buckets  # description (and schema version) as before
            d["hash"] = HASH_FUNCTION
        return d


@dataclass(frozen=True)
class DenseFeature:
    name: str
    mean: float
    std: float
    default: float  # raw value used when the feature is missing
    log1p: bool = False

    def encode(self, values: Any) -> np.ndarray:
        """Raw values (NaN or None = missing) -> normalised float32."""
        x = np.asarray(values, dtype=np.float64)
        x = np.where(np.isnan(x), self.default, x)
        if self.log1p:
            x = np.log1p(np.maximum(x, 0.0))
        return ((x - self.mean) / self.std).astype(np.float32)

    def encode_one(self, value: Any) -> float:
        x = self.default if value is None or _is_nan(value) else float(value)
        if self.log1p:
            x = math.log1p(max(x, 0.0))
        return float(np.float32((x - self.mean) / self.std))

    @property
    def encoded_default(self) -> float:
        return self.encode_one(None)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mean": self.mean,
            "std": self.std,
            "log1p": self.log1p,
            "default": self.default,
            "encoded_default": self.encoded_default,
        }


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


class ListTooLongError(ValueError):
    """A raw list longer than its feature's `max_len`; the message names the feature and row."""


class ListColumnError(ValueError):
    """A list feature's column that is not a list of ids; the message names the feature."""


@dataclass(frozen=True)
class ListFeature:
    """Up to `max_len` ids of the categorical `table` ("<entity>.<feature>"), encoded with its
    vocabulary and embedded with its embedding table, pooled by `pooling` ("mean" over the
    non-padding positions; "attention": weighted by each id's similarity to the candidate's
    id, for a user list of item ids). See the module docstring for padding and defaults."""

    name: str
    max_len: int
    table: str
    vocab: Vocabulary | HashedVocabulary
    pooling: ListPooling = "mean"

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"list feature {self.name}: max_len must be >= 1, got {self.max_len}")
        if self.pooling not in LIST_POOLINGS:
            raise ValueError(f"list feature {self.name}: pooling {self.pooling!r} is not one of "
                             f"{LIST_POOLINGS}")
        if self.table.count(".") != 1:
            raise ValueError(f"list feature {self.name}: table {self.table!r} is not "
                             "<entity>.<feature>")

    @property
    def table_entity(self) -> str:
        return self.table.split(".")[0]

    @property
    def table_feature(self) -> str:
        return self.table.split(".")[1]

    def encode(self, values: Any, n_rows: int) -> tuple[np.ndarray, int]:
        """Raw lists (a pyarrow list column or Python lists; None = missing) -> ([n, max_len]
        int32 indices padded with LIST_PADDING, how many present ids the vocabulary lacks).

        Vectorised: the ids of every row are encoded in one call and put in place by a mask
        of the lengths. A list longer than `max_len` raises `ListTooLongError`."""
        arr = values
        if not isinstance(arr, pa.Array | pa.ChunkedArray):
            arr = pa.array(list(values), from_pandas=True)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.list_(pa.string()))
        if pa.types.is_null(arr.type):  # every row missing
            return np.full((n_rows, self.max_len), LIST_PADDING, np.int32), 0
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            raise ListColumnError(f"list feature {self.name}: the column must be a list of ids, "
                                  f"got {arr.type}")
        if len(arr) != n_rows:
            raise ValueError(f"list feature {self.name}: {len(arr)} rows, expected {n_rows}")
        lengths = np.asarray(pc.fill_null(pc.list_value_length(arr), 0)
                             .to_numpy(zero_copy_only=False), dtype=np.int64)
        if n_rows and int(lengths.max()) > self.max_len:
            row = int(np.argmax(lengths > self.max_len))
            over = int((lengths > self.max_len).sum())
            raise ListTooLongError(
                f"list feature {self.name}: {over} row(s) hold more than max_len = "
                f"{self.max_len} ids (row {row}: {int(lengths[row])}); the cap is part of the "
                "model's schema: cut the lists to the most recent max_len ids before loading")
        flat = arr.flatten()  # the present lists' ids, null lists skipped
        if pa.types.is_nested(flat.type):
            raise ListColumnError(f"list feature {self.name}: the ids must be strings or "
                                  f"integers, got a list of {flat.type}")
        out = np.full((n_rows, self.max_len), LIST_PADDING, np.int32)
        if not len(flat):
            return out, 0
        codes = self.vocab.encode(flat)  # (sum of lengths,) int32, unknown -> 0
        # row i's ids fill its first lengths[i] slots; a boolean mask assigns in row order
        out[np.arange(self.max_len) < lengths[:, None]] = codes
        present = len(flat) - int(flat.null_count)
        return out, present - int(np.count_nonzero(codes))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_len": self.max_len,
            "table": self.table,
            "pooling": self.pooling,
            "vocab_size": self.vocab.size,
            "vocab_sha256": self.vocab.sha256,
            "padding": LIST_PADDING,
            "default": [],  # missing or empty: all padding, pooled to the zero vector
        }


@dataclass(frozen=True)
class GroupSchema:
    """The features of one entity (user, item or context), in model input order."""

    entity: str
    key: str | None  # id column of the entity's table; None for context
    categorical: tuple[CategoricalFeature, ...]
    dense: tuple[DenseFeature, ...]
    lists: tuple[ListFeature, ...] = ()

    def __post_init__(self) -> None:
        if self.lists and self.entity == "context":
            raise ValueError("list features belong to the user or item group, not the context")

    @property
    def n_cat(self) -> int:
        return len(self.categorical)

    @property
    def n_dense(self) -> int:
        return len(self.dense)

    @property
    def list_width(self) -> int:
        """Columns of the group's list input: the sum of its lists' caps (0: no lists)."""
        return sum(f.max_len for f in self.lists)

    def list_slices(self) -> list[slice]:
        """Each list feature's columns in the group's list input, in order."""
        out, start = [], 0
        for f in self.lists:
            out.append(slice(start, start + f.max_len))
            start += f.max_len
        return out

    @property
    def feature_names(self) -> list[str]:
        return ([f.name for f in self.categorical] + [f.name for f in self.dense]
                + [f.name for f in self.lists])

    def record_dtype(self) -> np.dtype:
        """Packed little-endian binary record of one entity in the feature store (the lists'
        field only when the group has lists: other records keep their layout)."""
        fields: list[tuple[Any, ...]] = [
            ("written_at", "<f8"),
            ("cat", "<i4", (self.n_cat,)),
            ("dense", "<f4", (self.n_dense,)),
        ]
        if self.lists:
            fields.append(("list", "<i4", (self.list_width,)))
        return np.dtype(fields)

    def default_lists(self) -> np.ndarray:
        """The lists of a missing entity (and of a missing or empty history): [width] padding."""
        return np.full(self.list_width, LIST_PADDING, dtype=np.int32)

    def encode_lists(self, columns: Mapping[str, Any], n_rows: int) -> tuple[np.ndarray, int]:
        """Raw list columns -> ([n, list_width] int32, ids the vocabularies lack); an absent
        column is all padding (its default)."""
        out = np.full((n_rows, self.list_width), LIST_PADDING, dtype=np.int32)
        unknown = 0
        for f, cols in zip(self.lists, self.list_slices(), strict=True):
            if f.name in columns:
                out[:, cols], missed = f.encode(columns[f.name], n_rows)
                unknown += missed
        return out, unknown

    def list_bounds(self) -> np.ndarray:
        """[list_width] int: each list column's vocabulary size (a valid index is below it)."""
        return np.concatenate([np.full(f.max_len, f.vocab.size, np.int64) for f in self.lists]
                              ) if self.lists else np.zeros(0, np.int64)

    def default_row(self) -> tuple[np.ndarray, np.ndarray]:
        """Encoded values used when the whole entity is missing: ([n_cat] int32, [n_dense] f32)."""
        cat = np.full(self.n_cat, OOV_INDEX, dtype=np.int32)
        dense = np.array([f.encoded_default for f in self.dense], dtype=np.float32)
        return cat, dense

    def encode_columns(
        self, columns: Mapping[str, Any], n_rows: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw columns -> (cat [n, n_cat] int32, dense [n, n_dense] f32); absent columns default."""
        cat = np.full((n_rows, self.n_cat), OOV_INDEX, dtype=np.int32)
        for j, cf in enumerate(self.categorical):
            if cf.name in columns:
                cat[:, j] = cf.vocab.encode(columns[cf.name])
        dense = np.empty((n_rows, self.n_dense), dtype=np.float32)
        for j, df in enumerate(self.dense):
            if df.name in columns:
                dense[:, j] = df.encode(_to_float_array(columns[df.name]))
            else:
                dense[:, j] = df.encoded_default
        return cat, dense

    def encode_row(self, values: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """One entity's raw values (e.g. a request's context) -> ([n_cat] int32, [n_dense] f32)."""
        cat = np.array([f.vocab.encode_one(values.get(f.name)) for f in self.categorical], np.int32)
        dense = np.array([f.encode_one(values.get(f.name)) for f in self.dense], np.float32)
        return cat, dense

    def input_specs(self) -> list[InputSpec]:
        """This group's model inputs (none if the group has no features of a kind)."""
        return group_input_specs(self.entity, self.n_cat, self.n_dense, self.list_width)

    def inputs(self, cat: np.ndarray, dense: np.ndarray,
               lists: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Encoded arrays (cat [n, n_cat], dense [n, n_dense], lists [n, list_width]) as this
        group's model inputs; lists None = every list at its default (all padding)."""
        out: dict[str, np.ndarray] = {}
        if self.n_cat:
            out[input_name(self.entity, "cat")] = cat.astype(np.int64, copy=False)
        if self.n_dense:
            out[input_name(self.entity, "dense")] = dense
        if self.lists:
            if lists is None:
                lists = np.tile(self.default_lists(), (len(cat), 1))
            out[input_name(self.entity, "list")] = lists.astype(np.int64, copy=False)
        return out

    def encode_inputs(self, columns: Mapping[str, Any], n_rows: int) -> dict[str, np.ndarray]:
        """Raw columns -> this group's model inputs (`encode_columns` and `encode_lists`)."""
        lists = self.encode_lists(columns, n_rows)[0] if self.lists else None
        return self.inputs(*self.encode_columns(columns, n_rows), lists)

    def default_inputs(self, rows: int) -> dict[str, np.ndarray]:
        """The default row (`default_row`) repeated over `rows` rows, as model inputs."""
        cat, dense = self.default_row()
        return self.inputs(np.tile(cat.astype(np.int64), (rows, 1)), np.tile(dense, (rows, 1)),
                           np.tile(self.default_lists().astype(np.int64), (rows, 1)))

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "entity": self.entity,
            "key": self.key,
            "categorical": [f.describe() for f in self.categorical],
            "dense": [f.describe() for f in self.dense],
        }
        if self.lists:  # only then: a group without lists keeps its description and version
            d["lists"] = [f.describe() for f in self.lists]
        return d


def _to_float_array(values: Any) -> np.ndarray:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return np.asarray(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False))
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64) if isinstance(
        values, list
    ) else np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class FeatureSchema:
    """All feature groups a model takes, in the order user, item, context (empty groups omitted)."""

    groups: tuple[GroupSchema, ...]

    def __post_init__(self) -> None:
        entities = [g.entity for g in self.groups]
        if entities != [e for e in ENTITIES if e in entities]:
            raise ValueError(f"groups must be ordered {ENTITIES} and unique, got {entities}")
        for g in self.groups:
            for f in g.lists:
                table = self.table_of(f)
                if table.vocab != f.vocab:
                    raise ValueError(f"list feature {g.entity}.{f.name}: its vocabulary is not "
                                     f"the one of {f.table}")
                if f.pooling == "attention" and (f.table_entity != CANDIDATE_ENTITY
                                                 or g.entity == CANDIDATE_ENTITY):
                    raise ValueError(f"list feature {g.entity}.{f.name}: attention pools a "
                                     "non-candidate list of candidate ids")

    def table_of(self, f: ListFeature) -> CategoricalFeature:
        """The categorical whose vocabulary and embedding table list feature `f` shares."""
        group = self.group(f.table_entity)
        found = None if group is None else next(
            (c for c in group.categorical if c.name == f.table_feature), None)
        if found is None:
            raise ValueError(f"list feature {f.name}: no categorical {f.table} in the schema")
        return found

    def group(self, entity: str) -> GroupSchema | None:
        return next((g for g in self.groups if g.entity == entity), None)

    @property
    def version(self) -> str:
        """Short hash of everything that decides how a stored record is laid out and encoded."""
        canon = json.dumps([g.describe() for g in self.groups], sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()[:12]

    def input_specs(self) -> list[InputSpec]:
        """The ONNX model's inputs, e.g. ("user_cat", "int64", 3, "user", "cat"), in order.

        Every input has shape [batch, width]; the batch of user and context inputs may be 1
        (broadcast over the candidates, so user-only work is done once per request) or N.
        """
        return [s for g in self.groups for s in g.input_specs()]

    def input_names(self) -> list[str]:
        return [s.name for s in self.input_specs()]

    def default_inputs(self, n: int) -> dict[str, np.ndarray]:
        """Default-valued inputs for n candidates, the user and context at batch 1 (warm-up)."""
        out: dict[str, np.ndarray] = {}
        for g in self.groups:
            out.update(g.default_inputs(n if g.entity == CANDIDATE_ENTITY else 1))
        return out

    def tiled_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The same inputs with the batch-1 groups repeated to the candidates' rows (U = N)."""
        items = {s.name for s in self.input_specs() if s.entity == CANDIDATE_ENTITY}
        n = max((inputs[k].shape[0] for k in items), default=0)
        return {k: v if k in items or v.shape[0] == n else np.repeat(v, n, axis=0)
                for k, v in inputs.items()}

    def context_inputs(self, context: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
        """A request's raw context encoded as batch-1 inputs (the graph broadcasts them)."""
        group = self.group("context")
        if group is None:
            return {}
        cat, dense = group.encode_row(context or {})
        return group.inputs(cat[None, :], dense[None, :])

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "groups": [g.describe() for g in self.groups]}

    def vocabularies(self) -> dict[str, list[str]]:
        """Every categorical's values by "<entity>.<feature>" (a hashed one's list is empty)."""
        return {
            f"{g.entity}.{f.name}": list(f.vocab.values) for g in self.groups for f in g.categorical
        }

    @classmethod
    def from_description(
        cls, desc: Mapping[str, Any], vocabularies: Mapping[str, Sequence[str]]
    ) -> FeatureSchema:
        """Rebuild from `describe()` plus `vocabularies()`; checks vocab hashes and the version."""
        groups = []
        for gd in desc["groups"]:
            cats = []
            for fd in gd["categorical"]:
                vocab: Vocabulary | HashedVocabulary
                if "hash_buckets" in fd:
                    if fd.get("hash") != HASH_FUNCTION:
                        where = f"{gd['entity']}.{fd['name']}"
                        raise ValueError(f"{where}: unknown hash {fd.get('hash')!r}")
                    vocab = HashedVocabulary(int(fd["hash_buckets"]))
                else:
                    vocab = Vocabulary(tuple(vocabularies[f"{gd['entity']}.{fd['name']}"]))
                if vocab.sha256 != fd["vocab_sha256"] or vocab.size != fd["vocab_size"]:
                    raise ValueError(f"vocabulary of {gd['entity']}.{fd['name']} does not match")
                cats.append(CategoricalFeature(fd["name"], vocab, int(fd["embedding_dim"])))
            dense = [
                DenseFeature(fd["name"], fd["mean"], fd["std"], fd["default"], fd["log1p"])
                for fd in gd["dense"]
            ]
            groups.append(GroupSchema(gd["entity"], gd["key"], tuple(cats), tuple(dense)))
        groups = _with_lists(groups, desc["groups"])
        schema = cls(tuple(groups))
        if "version" in desc and desc["version"] != schema.version:
            raise ValueError(f"schema version {desc['version']} != recomputed {schema.version}")
        return schema


def _with_lists(groups: list[GroupSchema], descs: Sequence[Mapping[str, Any]]
                ) -> list[GroupSchema]:
    """The groups with the list features their descriptions carry, each given the vocabulary
    of the categorical it names (after every group's categoricals exist: a user list names an
    item feature)."""
    vocab = {f"{g.entity}.{c.name}": c.vocab for g in groups for c in g.categorical}
    out = []
    for g, gd in zip(groups, descs, strict=True):
        lists = []
        for fd in gd.get("lists", []):
            where = f"{g.entity}.{fd['name']}"
            if fd["table"] not in vocab:
                raise ValueError(f"{where}: list of {fd['table']!r}, no such categorical")
            v = vocab[fd["table"]]
            if v.sha256 != fd["vocab_sha256"] or v.size != fd["vocab_size"]:
                raise ValueError(f"vocabulary of {where} ({fd['table']}) does not match")
            if fd.get("padding", LIST_PADDING) != LIST_PADDING:
                raise ValueError(f"{where}: padding {fd['padding']!r}, expected {LIST_PADDING}")
            lists.append(ListFeature(fd["name"], int(fd["max_len"]), fd["table"], v,
                                     fd.get("pooling", "mean")))
        out.append(GroupSchema(g.entity, g.key, g.categorical, g.dense, tuple(lists))
                   if lists else g)
    return out


def vocabulary_from_counts(
    values: Iterable[Any], min_count: int = 1, max_size: int | None = None
) -> Vocabulary:
    """A vocabulary from training values: most frequent first, ties by value, so it is stable."""
    arr = pa.array(list(values) if not isinstance(values, pa.Array | pa.ChunkedArray) else values)
    if not pa.types.is_string(arr.type):
        arr = pc.cast(arr, pa.string())
    counts = pc.value_counts(pc.drop_null(arr))
    pairs = [
        (int(c), str(v))
        for v, c in zip(
            counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
        )
        if c >= min_count
    ]
    pairs.sort(key=lambda p: (-p[0], p[1]))
    if max_size is not None:
        pairs = pairs[:max_size]
    return Vocabulary(tuple(v for _, v in pairs))
