"""Dataset specs: a TOML file declares a dataset's tasks, source and features; no code per dataset.

A spec is parsed into `DatasetSpec`; `training.data` turns it plus the files it names into a
`FeatureSchema` and encoded arrays. See `training/datasets/*.toml` for the two datasets.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ranker.schema import ENTITIES

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASETS_DIR = Path(__file__).resolve().parent / "datasets"


class SpecError(ValueError):
    """A dataset spec that is malformed; the message names the field."""


@dataclass(frozen=True)
class TaskSpec:
    """One label from a rule on a raw column, declared in the spec:

    - no rule: `column` read as 0/1;
    - `positive`: 1 where the raw value (as a string) is any of these values;
    - `above` / `at_least`: 1 where the value read as a number is > / >= the threshold.
    A missing value is 0 under every rule.
    """

    name: str
    column: str
    positive: tuple[str, ...] | None = None
    above: float | None = None
    at_least: float | None = None

    @property
    def rule(self) -> str:
        """The rule in words, for reports: `income_50k in ['50000+.']`."""
        if self.positive is not None:
            return f"{self.column} in {list(self.positive)}"
        if self.above is not None:
            return f"{self.column} > {self.above:g}"
        if self.at_least is not None:
            return f"{self.column} >= {self.at_least:g}"
        return f"{self.column} (0/1)"


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    entity: Literal["user", "item", "context"]
    type: Literal["categorical", "dense", "list"]
    embedding_dim: int = 8
    log1p: bool = False
    default: float | None = None  # raw default of a dense feature; None = the train mean
    min_count: int = 1
    max_vocab: int | None = None
    hash_buckets: int | None = None  # hash into this many rows instead of a vocabulary
    # a list feature (ranker.schema.ListFeature): its cap, the "<entity>.<feature>" categorical
    # whose vocabulary and embedding table it shares, and how it is pooled
    max_len: int = 0
    table: str = ""
    pooling: str = "mean"


@dataclass(frozen=True)
class SplitSpec:
    """Seeded random split of one file into train/val/test fractions."""

    train: float = 0.6
    val: float = 0.2
    test: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class SourceSpec:
    kind: Literal["tables", "csv"]
    # kind = "tables": a log split into files plus optional user and item tables
    dir: str = ""
    users: str | None = None
    items: str | None = None
    user_key: str | None = None
    item_key: str | None = None
    splits: dict[str, str] = field(default_factory=dict)  # split name -> file
    oracle: dict[str, str] = field(default_factory=dict)  # task -> true-probability column
    # kind = "csv": one delimited (optionally gzipped) file, split here
    path: str = ""
    path_env: str | None = None
    separator: str = ","
    na: str | None = None
    columns: list[str] = field(default_factory=list)
    split: SplitSpec = field(default_factory=SplitSpec)
    max_train_rows: int | None = None  # subsample the train split (time budget)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    model_name: str
    tasks: list[TaskSpec]
    source: SourceSpec
    features: list[FeatureSpec]
    path: Path | None = None  # the TOML file it came from

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def features_of(self, entity: str) -> list[FeatureSpec]:
        return [f for f in self.features if f.entity == entity]

    def with_min_count(self, min_count: int) -> DatasetSpec:
        """The same spec with every listed (not hashed) categorical's `min_count` set: values
        seen fewer times in the train split go to the out-of-vocabulary bucket."""
        if min_count < 1:
            raise SpecError(f"min_count: must be >= 1, got {min_count}")
        feats = [
            replace(f, min_count=min_count)
            if f.type == "categorical" and f.hash_buckets is None else f
            for f in self.features
        ]
        return replace(self, features=feats)

    def csv_path(self) -> Path:
        """The csv file: `$path_env` if set, else `path` resolved from the repo root."""
        env = os.environ.get(self.source.path_env or "") if self.source.path_env else None
        return Path(env) if env else (REPO_ROOT / self.source.path).resolve()

    def data_dir(self, override: Path | None = None) -> Path:
        """Directory of a `tables` source: the override (``--data``), else `dir` under the repo."""
        return Path(override) if override else REPO_ROOT / self.source.dir


def _get(d: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise SpecError(f"{where}: missing field {key!r}")
    if not isinstance(d[key], kind):
        raise SpecError(f"{where}.{key}: expected {kind}, got {type(d[key]).__name__}")
    return d[key]


def _feature(d: dict[str, Any], i: int) -> FeatureSpec:
    where = f"features[{i}]"
    known = set(FeatureSpec.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise SpecError(f"{where}: unknown fields {sorted(unknown)}")
    name = _get(d, "name", where, str)
    entity = _get(d, "entity", where, str)
    if entity not in ENTITIES:
        raise SpecError(f"{where}.entity: {entity!r} is not one of {ENTITIES}")
    ftype = _get(d, "type", where, str)
    if ftype not in ("categorical", "dense", "list"):
        raise SpecError(f"{where}.type: {ftype!r} is not categorical, dense or list")
    list_fields = {"max_len", "table", "pooling"} & set(d)
    if ftype == "list":
        if entity == "context":
            raise SpecError(f"{where}: a list feature belongs to the user or item entity")
        if not isinstance(d.get("max_len"), int) or d["max_len"] < 1:
            raise SpecError(f"{where}.max_len: a list feature needs a positive integer cap")
        table = d.get("table")
        if not isinstance(table, str) or table.count(".") != 1:
            raise SpecError(f"{where}.table: the shared categorical as <entity>.<feature>")
        if d.get("pooling", "mean") not in ("mean", "attention"):
            raise SpecError(f"{where}.pooling: mean or attention, got {d['pooling']!r}")
        extra = {"embedding_dim", "log1p", "default", "min_count", "max_vocab",
                 "hash_buckets"} & set(d)
        if extra:
            raise SpecError(f"{where}: {sorted(extra)} do not apply to a list feature (it "
                            "takes its table's vocabulary and embedding)")
    elif list_fields:
        raise SpecError(f"{where}: {sorted(list_fields)} apply to a list feature only")
    dim = int(d.get("embedding_dim", 8))
    if dim < 1:
        raise SpecError(f"{where}.embedding_dim: must be >= 1, got {dim}")
    buckets = d.get("hash_buckets")
    if buckets is not None:
        if ftype != "categorical" or not isinstance(buckets, int) or buckets < 1:
            raise SpecError(f"{where}.hash_buckets: a positive integer, on a categorical feature")
        if "min_count" in d or "max_vocab" in d:
            raise SpecError(f"{where}: min_count and max_vocab do not apply to a hashed feature")
    return FeatureSpec(
        name=name,
        entity=entity,
        type=ftype,
        embedding_dim=dim,
        log1p=bool(d.get("log1p", False)),
        default=None if d.get("default") is None else float(d["default"]),
        min_count=int(d.get("min_count", 1)),
        max_vocab=d.get("max_vocab"),
        hash_buckets=buckets,
        max_len=int(d.get("max_len", 0)),
        table=str(d.get("table", "")),
        pooling=str(d.get("pooling", "mean")),
    )


_RULES = ("positive", "above", "at_least")


def _task(t: dict[str, Any] | str, i: int) -> TaskSpec:
    """A task entry: a bare label column name, or a table with an optional rule."""
    if isinstance(t, str):
        t = {"name": t}
    where = f"tasks[{i}]"
    unknown = set(t) - {"name", "column", *_RULES}
    if unknown:
        raise SpecError(f"{where}: unknown fields {sorted(unknown)}")
    name = _get(t, "name", where, str)
    rules = [r for r in _RULES if r in t]
    if len(rules) > 1:
        raise SpecError(f"{where}: one rule of {list(_RULES)}, got {rules}")
    positive = None
    if "positive" in t:
        values = t["positive"] if isinstance(t["positive"], list) else [t["positive"]]
        if not values or not all(isinstance(v, str | int) for v in values):
            raise SpecError(f"{where}.positive: a value or a non-empty list of values")
        positive = tuple(str(v) for v in values)
    thresholds: dict[str, float | None] = {"above": None, "at_least": None}
    for key in thresholds:
        if key in t:
            if isinstance(t[key], bool) or not isinstance(t[key], int | float):
                raise SpecError(f"{where}.{key}: a number, got {t[key]!r}")
            thresholds[key] = float(t[key])
    return TaskSpec(name, str(t.get("column", name)), positive, **thresholds)


def _source(d: dict[str, Any]) -> SourceSpec:
    kind = _get(d, "kind", "source", str)
    if kind not in ("tables", "csv"):
        raise SpecError(f"source.kind: {kind!r} is not tables or csv")
    kw = dict(d)
    if "split" in kw:
        kw["split"] = SplitSpec(**kw["split"])
        s = kw["split"]
        if abs(s.train + s.val + s.test - 1.0) > 1e-9:
            raise SpecError("source.split: train + val + test must be 1")
    try:
        src = SourceSpec(**kw)
    except TypeError as e:
        raise SpecError(f"source: {e}") from e
    if kind == "tables" and not {"train", "val", "test"} <= set(src.splits):
        raise SpecError("source.splits: needs train, val and test files")
    if kind == "csv" and not (src.path and src.columns):
        raise SpecError("source: a csv source needs path and columns")
    return src


def parse_spec(data: dict[str, Any], path: Path | None = None) -> DatasetSpec:
    """Validate a parsed TOML document into a DatasetSpec."""
    name = _get(data, "name", "spec", str)
    tasks = [_task(t, i) for i, t in enumerate(_get(data, "tasks", "spec", list))]
    if not tasks:
        raise SpecError("spec.tasks: at least one task")
    source = _source(_get(data, "source", "spec", dict))
    features = [_feature(f, i) for i, f in enumerate(_get(data, "features", "spec", list))]
    names = [(f.entity, f.name) for f in features]
    if len(set(names)) != len(names):
        raise SpecError("spec.features: duplicate (entity, name)")
    for f in features:
        if f.entity == "user" and not (source.users and source.user_key):
            raise SpecError(f"feature {f.name}: entity user needs source.users and source.user_key")
        if f.entity == "item" and not (source.items and source.item_key):
            raise SpecError(f"feature {f.name}: entity item needs source.items and source.item_key")
    cats = {f"{f.entity}.{f.name}" for f in features if f.type == "categorical"}
    for f in features:
        if f.type == "list" and f.table not in cats:
            raise SpecError(f"feature {f.name}: table {f.table!r} is no categorical feature "
                            f"of the spec ({sorted(cats)})")
    label_cols = {t.column for t in tasks}
    leaked = [f.name for f in features if f.entity == "context" and f.name in label_cols]
    if leaked:
        raise SpecError(f"spec.features: label columns used as features: {leaked}")
    return DatasetSpec(
        name=name,
        model_name=str(data.get("model_name", name)),
        tasks=tasks,
        source=source,
        features=features,
        path=path,
    )


def load_spec(path: Path | str) -> DatasetSpec:
    """Read a dataset spec; a bare name like ``census_income`` means datasets/<name>.toml."""
    p = Path(path)
    if not p.suffix and not p.exists():
        p = DATASETS_DIR / f"{p}.toml"
    with open(p, "rb") as f:
        data = tomllib.load(f)
    return parse_spec(data, p)
