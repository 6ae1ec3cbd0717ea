"""The re-rank stage: filters before scoring; boosts, MMR, window diversity and pinned slots after.

Pure functions, no I/O: `resolve` turns a preset plus a request's overrides into checked
`Rules` (InvalidRules names the field), `filter_candidates` says which candidates the filters
keep, `apply` turns the final scores of those into the served order. The steps run in this
order (docs/api.md, "Re-ranking"):

1. **filters**, before scoring: ids given in the request and ids in the user's seen set leave
   the request, so they are neither scored nor served (the pipeline drops their rows from the
   fetched features; X's home-mixer filters before scoring for the same reason: the model's
   time is spent on candidates that can be served);
2. **boosts**: the final score times a factor per item attribute value (categorical: a factor
   per vocabulary value; dense: a factor per bucket of the raw value), bounded;
3. **mmr**: maximal marginal relevance with similarity = same attribute value (1 or 0), so
   the order is by `λ·rel − (1−λ)·[an item of the same value is ranked above]`, with `rel`
   the final score min-max scaled to [0, 1] over the candidates left;
4. **pins**: given ids at given positions; they are placed first and never moved;
5. **diversity**: at most `max_per_window` items of one attribute value in any `window`
   consecutive positions, filled position by position with the best item that fits. When the
   best-first fill gets stuck, a bounded search looks for another arrangement; when none
   exists (or the search budget runs out) the stage relaxes at the stuck positions only, with
   the item whose value is least frequent in the preceding `window − 1` positions, and says so.

The attributes come from the item records the reader fetched (their encoded values and the
schema's vocabulary / normalisation), so no second lookup. An item whose categorical value is
out of vocabulary (unknown, or a defaulted record) is not constrained by diversity or MMR.
Ties keep the order of today's ranking (earlier candidate first), so the result is
deterministic; with no rules the order is exactly `ranking.rank_order`.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections import deque
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ranker.schema import OOV_INDEX, FeatureSchema, input_name

# rule names, the label values of ranker_rerank_rules_applied_total (a fixed set), in the
# order the steps run (a response's `applied` keeps it)
RULES = ("filter", "seen", "boost", "mmr", "pin", "diversity", "diversity_relaxed")
SEARCH_BUDGET = 2000  # placements the diversity search may try before it relaxes
SEARCH_BACK = 16  # the search re-arranges from this many positions before the first stuck one
_KEEP = bytes([1, 0]) + bytes(254)  # bytes.translate: a dropped mask's bytes -> kept mask's


class InvalidRules(ValueError):
    """A re-rank rule the service refuses; `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Bounds:
    """Limits every rule must stay within (settings `rerank_*`)."""

    boost_min: float = 0.1
    boost_max: float = 10.0
    max_pinned_share: float = 0.2
    max_window: int = 100
    max_exclude: int = 1000
    diversity_depth: int = 50  # default of Diversity.depth
    max_depth: int = 1000


@dataclass(frozen=True)
class Diversity:
    """At most `max_per_window` of a value in any `window` consecutive positions among the
    first `depth`; the positions below follow in order (the fill costs Python work per
    position, so the depth bounds it: docs/benchmarks.md)."""

    attribute: str
    max_per_window: int
    window: int
    depth: int


@dataclass(frozen=True)
class Mmr:
    attribute: str
    lam: float


@dataclass(frozen=True)
class Boost:
    """A factor per categorical value (`values`), or per bucket of a dense value (`edges`:
    bucket i is edges[i-1] <= x < edges[i]; `factors` has one more entry than `edges`)."""

    attribute: str
    values: tuple[tuple[str, float], ...] = ()
    edges: tuple[float, ...] = ()
    factors: tuple[float, ...] = ()


@dataclass(frozen=True)
class Pin:
    id: str
    position: int


@dataclass(frozen=True)
class Rules:
    """The checked rules of one request (a preset overlaid by the request's own)."""

    preset: str | None = None
    diversity: Diversity | None = None
    mmr: Mmr | None = None
    exclude: tuple[str, ...] = ()
    seen: bool = False
    boosts: tuple[Boost, ...] = ()
    pins: tuple[Pin, ...] = ()
    adjusted: tuple[str, ...] = ()  # preset values clamped to this request (said in the response)

    @property
    def empty(self) -> bool:
        return not (self.diversity or self.mmr or self.exclude or self.seen or self.boosts
                    or self.pins)


SECTIONS = ("diversity", "mmr", "filters", "boosts", "pins")


@dataclass(frozen=True)
class Attribute:
    """One item attribute readable from the fetched records: a column of item_cat or item_dense."""

    name: str
    kind: str  # "cat" | "dense"
    column: int
    vocab: Mapping[str, int] = field(default_factory=dict)
    mean: float = 0.0
    std: float = 1.0
    log1p: bool = False


def attributes(schema: FeatureSchema) -> dict[str, Attribute]:
    """The item attributes rules may name: the item group's categorical and dense features
    (built once per schema object: the request path asks for them every time)."""
    hit = _ATTRIBUTES.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1]
    out = _attributes(schema)
    if len(_ATTRIBUTES) > 8:  # a few model versions over a process's life
        _ATTRIBUTES.clear()
    _ATTRIBUTES[id(schema)] = (schema, out)
    return out


_ATTRIBUTES: dict[int, tuple[FeatureSchema, dict[str, Attribute]]] = {}


def _attributes(schema: FeatureSchema) -> dict[str, Attribute]:
    group = schema.group("item")
    if group is None:
        return {}
    # a hashed feature lists no values: diversity still works on its codes, value boosts do not
    out = {f.name: Attribute(f.name, "cat", j, {v: i + 1 for i, v in enumerate(f.vocab.values)})
           for j, f in enumerate(group.categorical)}
    out.update({f.name: Attribute(f.name, "dense", j, mean=f.mean, std=f.std, log1p=f.log1p)
                for j, f in enumerate(group.dense)})
    return out


# ---------------------------------------------------------------------------------------------
# resolving: preset + request -> Rules


def resolve(
    request: Mapping[str, Any] | None,
    presets: Mapping[str, Mapping[str, Any]],
    default_preset: str | None,
    attrs: Mapping[str, Attribute],
    candidates: Sequence[str],
    top_k: int | None,
    bounds: Bounds,
) -> Rules | None:
    """The rules of one request, or None when no rule applies (the response is today's).

    `request` is the request's `rerank` object with only the fields it set (an explicit null
    turns the preset's section off); without `preset` the file's default preset applies.
    Values the request gives are checked strictly (InvalidRules); a preset's pins and window
    are fitted to this request's list and the adjustment is reported.
    """
    request = request or {}
    name = request.get("preset", default_preset) if "preset" in request else default_preset
    base: Mapping[str, Any] = {}
    if name is not None:
        if name not in presets:
            known = ", ".join(sorted(presets)) or "none configured"
            raise InvalidRules("rerank.preset", f"unknown re-rank preset {name!r} (known: {known})")
        base = presets[name]
    length = len(candidates) if top_k is None else min(top_k, len(candidates))
    adjusted: list[str] = []
    parts: dict[str, tuple[Any, str, bool]] = {}
    for section in SECTIONS:
        if section in request:
            value, where, strict = request[section], f"rerank.{section}", True
        elif section in base:
            value, where, strict = base[section], f"rerank.preset({name}).{section}", False
        else:
            continue
        if value is None:
            continue
        parts[section] = (value, where, strict)
    diversity = mmr = None
    exclude: tuple[str, ...] = ()
    seen = False
    boosts: tuple[Boost, ...] = ()
    pins: tuple[Pin, ...] = ()
    if "diversity" in parts:
        diversity = _diversity(*parts["diversity"], attrs, length, bounds, adjusted)
    if "mmr" in parts:
        mmr = _mmr(*parts["mmr"], attrs)
    if "filters" in parts:
        exclude, seen = _filters(*parts["filters"], bounds)
    if "boosts" in parts:
        boosts = _boosts(*parts["boosts"], attrs, bounds)
    if "pins" in parts:
        pins = _pins(*parts["pins"], candidates, length, bounds, adjusted)
    rules = Rules(name, diversity, mmr, exclude, seen, boosts, pins, tuple(adjusted))
    return None if rules.empty and not adjusted else rules


class ResolvedCache:
    """Resolved rules by request key (the caller's: the list's length and the request's rules
    minus `filters.exclude`) within a `scope` (the rules file version, the schema and the
    bounds, compared by identity, so experiment arms serving two models share it): requests
    repeat a few rule sets, and resolving checks every field again (docs/benchmarks.md,
    "Re-rank stage"). An entry is (rules, whether the request's own exclude list goes back
    in); only successes are kept, at most `size` (then it starts over)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        # (key, ids of the scope) -> (scope, rules, own exclude); the scope is kept (alive, and
        # to check an id reused after a reload)
        self._entries: dict[Hashable, tuple[tuple[object, ...], Rules | None, bool]] = {}

    def get(self, key: Hashable, scope: tuple[object, ...]) -> tuple[Rules | None, bool] | None:
        hit = self._entries.get((key, *map(id, scope)))
        # tuples compare items by identity first; an object that took a dropped one's id
        # matches only if equal to it (the same rules, schema, bounds: the same answer)
        if hit is None or hit[0] != scope:
            return None
        return hit[1], hit[2]

    def put(self, key: Hashable, scope: tuple[object, ...], rules: Rules | None,
            preset: str | None, own_exclude: bool) -> None:
        """Keep `rules`, resolved from the whole request, for `key`; with `own_exclude` (the
        request gave `filters`) they are kept without its exclude list (`with_exclude`)."""
        if len(self._entries) >= self.size:
            self._entries.clear()  # old rules versions go with it
        if own_exclude:
            r = rules or Rules(preset)
            rules = Rules(r.preset, r.diversity, r.mmr, (), r.seen, r.boosts, r.pins, r.adjusted)
        self._entries[(key, *map(id, scope))] = (scope, rules, own_exclude)


def with_exclude(rules: Rules, exclude: Sequence[str], bounds: Bounds) -> Rules | None:
    """Cached rules with this request's `filters.exclude`, checked as `resolve` checks it."""
    ex, _ = _filters({"exclude": exclude}, "rerank.filters", True, bounds)
    r = Rules(rules.preset, rules.diversity, rules.mmr, ex, rules.seen, rules.boosts,
              rules.pins, rules.adjusted)
    return None if r.empty and not r.adjusted else r


def _attr(attrs: Mapping[str, Attribute], where: str, name: Any, kind: str | None) -> Attribute:
    if not isinstance(name, str) or name not in attrs:
        known = ", ".join(sorted(a for a in attrs if kind is None or attrs[a].kind == kind))
        raise InvalidRules(f"{where}.attribute",
                           f"unknown item attribute {str(name)[:64]!r} (known: {known or 'none'})")
    a = attrs[name]
    if kind is not None and a.kind != kind:
        raise InvalidRules(f"{where}.attribute",
                           f"{name!r} is a dense feature; this rule needs a categorical one")
    return a


def _int(where: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRules(where, "must be an integer")
    if value < lo or (hi is not None and value > hi):
        raise InvalidRules(where, f"must be between {lo} and {hi}" if hi is not None
                           else f"must be at least {lo}")
    return value


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRules(where, "must be a finite number")
    return float(value)


def _mapping(where: str, value: Any, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):  # JSON and TOML objects are dicts
        raise InvalidRules(where, "must be an object")
    for key in value:
        if key not in allowed:
            raise InvalidRules(f"{where}.{str(key)[:64]}",
                               f"unknown field (allowed: {', '.join(allowed)})")
    return value


def _diversity(value: Any, where: str, strict: bool, attrs: Mapping[str, Attribute],
               length: int, bounds: Bounds, adjusted: list[str]) -> Diversity | None:
    v = _mapping(where, value, ("attribute", "max_per_window", "window", "depth"))
    attr = _attr(attrs, where, v.get("attribute"), "cat")
    k = _int(f"{where}.max_per_window", v.get("max_per_window", 1), 1)
    w = _int(f"{where}.window", v.get("window"), 2, bounds.max_window)
    default_depth = min(max(bounds.diversity_depth, w), bounds.max_depth)
    depth = _int(f"{where}.depth", v.get("depth", default_depth), 2, bounds.max_depth)
    if depth < w:
        raise InvalidRules(f"{where}.depth", f"must be at least the window ({w})")
    if w > length:
        if strict:
            raise InvalidRules(f"{where}.window",
                               f"window {w} is larger than the list ({length} items)")
        adjusted.append(f"diversity.window {w} -> {length} (the list's length)")
        w = length
    if k >= w:
        if strict:
            raise InvalidRules(f"{where}.max_per_window",
                               f"must be less than window ({w}), else the rule does nothing")
        return None
    return Diversity(attr.name, k, w, depth)


def _mmr(value: Any, where: str, strict: bool, attrs: Mapping[str, Attribute]) -> Mmr | None:
    v = _mapping(where, value, ("attribute", "lambda"))
    attr = _attr(attrs, where, v.get("attribute"), "cat")
    lam = _number(f"{where}.lambda", v.get("lambda", 0.5))
    if not 0.0 <= lam <= 1.0:
        raise InvalidRules(f"{where}.lambda", "must be between 0 and 1")
    return None if lam == 1.0 else Mmr(attr.name, lam)  # λ = 1 is the score order


def _filters(value: Any, where: str, strict: bool, bounds: Bounds) -> tuple[tuple[str, ...], bool]:
    v = _mapping(where, value, ("exclude", "seen"))
    exclude = v.get("exclude", [])
    # the items' types were checked by the schema (service.schemas.FilterRule) already
    if not isinstance(exclude, list | tuple):
        raise InvalidRules(f"{where}.exclude", "must be a list of item ids")
    if len(exclude) > bounds.max_exclude:
        raise InvalidRules(f"{where}.exclude",
                           f"at most {bounds.max_exclude} ids (got {len(exclude)})")
    seen = v.get("seen", False)
    if not isinstance(seen, bool):
        raise InvalidRules(f"{where}.seen", "must be true or false")
    return tuple(exclude), seen


def _factor(where: str, value: Any, bounds: Bounds) -> float:
    f = _number(where, value)
    if not bounds.boost_min <= f <= bounds.boost_max:
        raise InvalidRules(where, f"factor must be between {bounds.boost_min:g} and "
                                  f"{bounds.boost_max:g}")
    return f


def _boosts(value: Any, where: str, strict: bool, attrs: Mapping[str, Attribute],
            bounds: Bounds) -> tuple[Boost, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidRules(where, "must be a list of boosts")
    out = []
    for i, b in enumerate(value):
        at = f"{where}[{i}]"
        v = _mapping(at, b, ("attribute", "values", "edges", "factors"))
        attr = _attr(attrs, at, v.get("attribute"), None)
        if attr.kind == "cat":
            values = _mapping(f"{at}.values", v.get("values"), tuple(attr.vocab) or ("",)) \
                if isinstance(v.get("values"), dict) else None
            if values is None or "edges" in v or "factors" in v:
                raise InvalidRules(f"{at}.values", "a categorical attribute takes "
                                   "`values`: {value: factor}")
            out.append(Boost(attr.name, tuple(
                (str(k), _factor(f"{at}.values.{k}", f, bounds)) for k, f in values.items())))
        else:
            edges, factors = v.get("edges"), v.get("factors")
            if "values" in v or not isinstance(edges, list | tuple) or not isinstance(
                    factors, list | tuple) or not edges:
                raise InvalidRules(f"{at}.edges", "a dense attribute takes `edges` (bucket "
                                   "bounds, increasing) and `factors` (one more than edges)")
            e = [_number(f"{at}.edges[{j}]", x) for j, x in enumerate(edges)]
            if any(b2 <= b1 for b1, b2 in itertools.pairwise(e)):
                raise InvalidRules(f"{at}.edges", "must be strictly increasing")
            if len(factors) != len(e) + 1:
                raise InvalidRules(f"{at}.factors",
                                   f"needs {len(e) + 1} factors for {len(e)} edges")
            fs = [_factor(f"{at}.factors[{j}]", x, bounds) for j, x in enumerate(factors)]
            out.append(Boost(attr.name, edges=tuple(e), factors=tuple(fs)))
    return tuple(out)


def _pins(value: Any, where: str, strict: bool, candidates: Sequence[str], length: int,
          bounds: Bounds, adjusted: list[str]) -> tuple[Pin, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidRules(where, "must be a list of {id, position}")
    limit = math.floor(bounds.max_pinned_share * length + 1e-9)
    cands = set(candidates)
    out: list[Pin] = []
    ids: set[str] = set()
    positions: set[int] = set()
    for i, p in enumerate(value):
        at = f"{where}[{i}]"
        v = _mapping(at, p, ("id", "position"))
        pid = v.get("id")
        if not isinstance(pid, str):
            raise InvalidRules(f"{at}.id", "must be an item id")
        pos = _int(f"{at}.position", v.get("position"), 0)
        problem = None
        if pid not in cands:
            problem, f = "not one of the candidates", f"{at}.id"
        elif pos >= length:
            problem, f = f"position past the end of the list ({length} items)", f"{at}.position"
        elif pid in ids:
            problem, f = "pinned twice", f"{at}.id"
        elif pos in positions:
            problem, f = "position pinned twice", f"{at}.position"
        elif len(out) >= limit:
            problem, f = (f"more than {bounds.max_pinned_share:g} of the list's {length} "
                          f"positions pinned (at most {limit})", where)
        if problem is not None:
            if strict:
                raise InvalidRules(f, problem)
            adjusted.append(f"pin {pid[:64]}@{pos} skipped: {problem}")
            continue
        out.append(Pin(pid, pos))
        ids.add(pid)
        positions.add(pos)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# applying: final scores -> served order


@dataclass(frozen=True)
class Filtered:
    """What the filters did before scoring: which candidates they keep (None when they keep
    every one), the rules that dropped something (in RULES order), and what could not apply."""

    kept: bytes | None  # per candidate 1 = kept, 0 = dropped (an `itertools.compress` selector)
    applied: tuple[str, ...] = ()
    relaxed: tuple[dict[str, Any], ...] = ()

    @functools.cached_property
    def keep(self) -> np.ndarray | None:
        """The positions of the kept candidates, ascending (None: every one)."""
        return None if self.kept is None else np.flatnonzero(np.frombuffer(self.kept, bool))

    @property
    def count(self) -> int:
        """How many candidates were dropped."""
        return 0 if self.kept is None else self.kept.count(0)


def filter_candidates(rules: Rules, candidates: Sequence[str],
                      seen: Collection[bytes | str] | None) -> Filtered:
    """Which candidates pass the filters: the excluded ids and, with `rules.seen`, the members
    of the user's seen set (as Redis gives them; None when the fetch degraded, so the seen
    filter cannot apply and the result says so) are dropped.

    One membership pass over the candidates for both filters, only when one of them hits;
    C loops throughout (`isdisjoint`, `map` of a set's `__contains__`, `bytes.translate`)."""
    relaxed: tuple[dict[str, Any], ...] = ()
    drop: set[str] = set()
    applied: list[str] = []
    if rules.exclude:
        excluded = set(rules.exclude)
        if not excluded.isdisjoint(candidates):
            drop, applied = excluded, ["filter"]
    if rules.seen:
        if seen is None:  # degraded: no feature store answer, no seen set
            relaxed = ({"rule": "seen", "reason": "unavailable"},)
        elif seen:
            members = {m.decode("utf-8", "replace") if isinstance(m, bytes) else str(m)
                       for m in seen}
            if not members.isdisjoint(candidates):
                drop = members.union(drop)
                applied.append("seen")
    if not applied:
        return Filtered(None, (), relaxed)
    # 1 = kept, as a bool array's bytes
    kept = bytes(map(drop.__contains__, candidates)).translate(_KEEP)
    return Filtered(kept, tuple(applied), relaxed)


@dataclass
class Outcome:
    """What the stage did: the scores and order served, and what to tell the client."""

    final: np.ndarray  # [N] final scores after boosts
    order: np.ndarray  # served candidate positions, at most top_k
    applied: list[str]  # rule names that changed something, in RULES order
    filtered: int
    relaxed: list[dict[str, Any]]
    moved_from: np.ndarray | None = None  # [K] position in today's order of each served item
    moved_by: list[list[str]] | None = None  # [K] rules whose step changed the item's position


def raw_column(attr: Attribute, cat: np.ndarray | None, dense: np.ndarray | None) -> np.ndarray:
    """The attribute's values for every candidate: vocabulary codes, or raw dense values."""
    if attr.kind == "cat":
        assert cat is not None
        return cat[:, attr.column]
    assert dense is not None
    x = dense[:, attr.column].astype(np.float64) * attr.std + attr.mean
    return np.expm1(x) if attr.log1p else x


def boost_factors(boosts: Sequence[Boost], attrs: Mapping[str, Attribute],
                  cat: np.ndarray | None, dense: np.ndarray | None, n: int) -> np.ndarray:
    """The product of every boost's factor per candidate [N]."""
    factor = np.ones(n, dtype=np.float64)
    for b in boosts:
        attr = attrs[b.attribute]
        col = raw_column(attr, cat, dense)
        if attr.kind == "cat":
            table = np.ones(max(attr.vocab.values(), default=0) + 1, dtype=np.float64)
            for value, f in b.values:
                if value in attr.vocab:
                    table[attr.vocab[value]] = f
            factor *= table[np.clip(col, 0, table.size - 1)]
        else:
            factor *= np.asarray(b.factors)[np.digitize(col, np.asarray(b.edges), right=False)]
    return factor


def apply(rules: Rules, final: np.ndarray, candidates: Sequence[str],
          attrs: Mapping[str, Attribute], inputs: Mapping[str, np.ndarray],
          top_k: int | None, *, filtered: Filtered | None = None, explain: bool = False,
          order: np.ndarray | None = None) -> Outcome:
    """Re-rank the candidates the filters kept (`filter_candidates`; `filtered` says what they
    did): boosts, MMR, pins, diversity (the module docstring).

    `candidates`, `final` and `inputs` are of the kept candidates only; a pinned id that is not
    among them was filtered. `order` may pass today's full order of `final` when it is known."""
    n = len(candidates)
    cat = inputs.get(input_name("item", "cat"))
    dense = inputs.get(input_name("item", "dense"))
    applied: list[str] = [] if filtered is None else list(filtered.applied)
    relaxed: list[dict[str, Any]] = [] if filtered is None else list(filtered.relaxed)
    steps: list[tuple[str, np.ndarray]] = []  # (rule, order after it) for explain
    base = order if order is not None and order.size == n else score_order(final)
    if explain:
        steps.append(("", base))
    order = base
    if rules.boosts:
        factor = boost_factors(rules.boosts, attrs, cat, dense, n)
        if (factor != 1.0).any():
            final = final * factor
            order = score_order(final)
            applied.append("boost")
            if explain:
                steps.append(("boost", order))
    if rules.mmr is not None and order.size > 1:
        codes = raw_column(attrs[rules.mmr.attribute], cat, dense)
        new = mmr_order(order, final, codes, rules.mmr.lam)
        if not np.array_equal(new, order):
            applied.append("mmr")
            order = new
            if explain:
                steps.append(("mmr", order))
    length = order.size if top_k is None else min(top_k, order.size)
    pinned: dict[int, int] = {}
    if rules.pins:
        index = {c: i for i, c in enumerate(candidates)}
        for pin in rules.pins:
            i = index.get(pin.id, -1)
            if i < 0:  # the checks made it a candidate: the filters dropped it
                relaxed.append({"rule": "pin", "id": pin.id, "reason": "filtered"})
                continue
            pinned[pin.position] = i
        if pinned:
            keep = np.ones(n, dtype=bool)
            keep[list(pinned.values())] = False
            order = order[keep[order]]
            length = min(length, order.size + len(pinned))
            pinned = _fit_pins(pinned, length)
            plain = _insert_pins(order, pinned, length)
            if not np.array_equal(plain, order[:length]):
                applied.append("pin")
            if explain:
                steps.append(("pin", plain))
    if rules.diversity is not None and length > 1:
        d = rules.diversity
        codes = raw_column(attrs[d.attribute], cat, dense)
        served, stuck, changed = diversify(order, codes, d.max_per_window, d.window, length,
                                           pinned, d.depth)
        if changed:
            applied.append("diversity")
        if stuck:
            applied.append("diversity_relaxed")
            relaxed.append({"rule": "diversity", "positions": stuck})
        if explain:
            steps.append(("diversity", served))
    else:
        served = _insert_pins(order, pinned, length)
    out = Outcome(final, served, applied, 0 if filtered is None else filtered.count, relaxed)
    if explain:
        out.moved_from, out.moved_by = _attribution(steps, served, n)
    return out


def score_order(final: np.ndarray) -> np.ndarray:
    """All positions by score descending, ties by position: `ranking.rank_order`, by a
    stable argsort (the same order, cheaper than its lexsort)."""
    return np.argsort(-np.asarray(final, dtype=np.float64), kind="stable")


def mmr_order(order: np.ndarray, final: np.ndarray, codes: np.ndarray, lam: float) -> np.ndarray:
    """MMR with similarity = same value: each value's best item keeps λ·rel, the others pay
    (1−λ); out-of-vocabulary values pay nothing. Ties keep the current order."""
    s = final[order]
    lo, hi = float(s.min()), float(s.max())
    rel = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    c = codes[order]
    _, first = np.unique(c, return_index=True)
    head = np.zeros(order.size, dtype=bool)
    head[first] = True
    head |= c == OOV_INDEX
    key = lam * rel - (1.0 - lam) * (~head)
    return order[np.argsort(-key, kind="stable")]


def _fit_pins(pinned: dict[int, int], length: int) -> dict[int, int]:
    """Pins past the end of a list the filters shortened move to its last free positions."""
    if all(p < length for p in pinned):
        return dict(sorted(pinned.items()))
    out = {p: i for p, i in pinned.items() if p < length}
    free = [p for p in range(length - 1, -1, -1) if p not in out]
    for p, i in sorted(pinned.items()):
        if p >= length and free:
            out[free.pop(0)] = i
    return dict(sorted(out.items()))


def _insert_pins(order: np.ndarray, pinned: Mapping[int, int], length: int) -> np.ndarray:
    """The order with the pinned items at their positions, cut to `length`."""
    if not pinned:
        return order[:length]
    out = list(order[:length].tolist())
    for pos, i in pinned.items():  # ascending positions
        out.insert(pos, i)
    return np.asarray(out[:length], dtype=np.int64)


def _attribution(steps: list[tuple[str, np.ndarray]], served: np.ndarray,
                 n: int) -> tuple[np.ndarray, list[list[str]]]:
    """Per served item: its position in today's order, and the steps that moved it: those that
    changed its rank among the items present both before and after the step (so dropping an
    item above moves nobody, while a pin or a held-back item moves the ones it passes)."""
    def positions(order: np.ndarray) -> np.ndarray:
        pos = np.full(n, -1, dtype=np.int64)
        pos[order] = np.arange(order.size)
        return pos

    moved_by: list[list[str]] = [[] for _ in range(served.size)]
    for (_, before), (rule, after) in itertools.pairwise(steps):
        in_before, in_after = positions(before) >= 0, positions(after) >= 0
        both = in_before & in_after
        rank_before = positions(before[both[before]])
        rank_after = positions(after[both[after]])
        for r in np.flatnonzero(rank_before[served] != rank_after[served]).tolist():
            moved_by[r].append(rule)
    return positions(steps[0][1])[served], moved_by


def violations(codes: Sequence[int], k: int, w: int) -> list[int]:
    """Start positions of the windows of w that hold more than k items of one known value."""
    out = []
    for s in range(max(0, len(codes) - w + 1)):
        counts: dict[int, int] = {}
        for c in codes[s:s + w]:
            if c != OOV_INDEX:
                counts[c] = counts.get(c, 0) + 1
        if any(v > k for v in counts.values()):
            out.append(s)
    return out


def diversify(order: np.ndarray, codes: np.ndarray, k: int, w: int, length: int,
              pinned: Mapping[int, int], depth: int | None = None
              ) -> tuple[np.ndarray, list[int], bool]:
    """`length` positions, the first `depth` filled best-first under "at most k of a value in
    any w consecutive", pinned items at their positions, the rest in order; (served order,
    positions where it had to relax, whether it differs from the plain order with the pins)."""
    full = length
    length = full if depth is None else min(depth, full)
    if not pinned:
        served, stuck, changed = _diversify_plain(order, codes, k, w, length, full)
        if not stuck:
            return served, stuck, changed
        head = served[:length]
    else:
        stream, code = order.tolist(), codes.tolist()
        taken, stuck = _fill(stream, code, k, w, length, pinned, relax=True)
        head = np.asarray(taken, dtype=np.int64)
    if stuck:
        stream, code = order.tolist(), codes.tolist()
        if _could_fit(stream, code, k, w, length, pinned):
            # keep the best-first prefix up to a few windows before the first stuck position
            start = max(0, stuck[0] - max(SEARCH_BACK, 4 * w))
            found = _search(stream, code, k, w, length, pinned, SEARCH_BUDGET,
                            head[:start].tolist())
            if found is not None:
                head, stuck = np.asarray(found, dtype=np.int64), []
    if length == full:
        served = head
    else:  # below the depth: the pins there, and the items not placed in order
        keep = np.ones(codes.shape[0], dtype=bool)
        keep[head] = False
        rest = order[keep[order]]
        below = {p - length: i for p, i in pinned.items() if p >= length}
        if below:
            keep[list(below.values())] = False
            rest = order[keep[order]]
        served = np.concatenate([head, _insert_pins(rest, below, full - length)])
    return served, stuck, not np.array_equal(served, _insert_pins(order, pinned, full))


def _diversify_plain(order: np.ndarray, codes: np.ndarray, k: int, w: int, length: int,
                     full: int) -> tuple[np.ndarray, list[int], bool]:
    """`diversify` without pins: the best-first fill of `length` positions over the stream's
    values, then the items it did not place in order, cut to `full`.

    The fill reads the stream only as far as it gets: first its first 2·length + w values (it
    rarely holds back more); only when that runs dry before the positions are filled is it
    run again on the whole stream, so the answer is the same as over the whole stream."""
    m = order.size
    head = min(m, 2 * length + w)
    taken, stuck, i, left = _fill_fast(codes[order[:head]].tolist(), k, w, length)
    if head < m and (stuck or len(taken) < length):
        taken, stuck, i, left = _fill_fast(codes[order].tolist(), k, w, length)
    if taken == list(range(len(taken))):  # every position took the stream's next item
        return order[:full], stuck, False
    idx = np.asarray(taken + left if left else taken, dtype=np.int64)[:full]
    served = order[idx]
    if idx.size < full:
        served = np.concatenate([served, order[i:i + full - idx.size]])
    return served, stuck, True


def _fits(c: int, p: int, placed: Mapping[int, list[int]], k: int, w: int,
          future: Mapping[int, list[int]]) -> bool:
    """Whether a value-c item may go at position p: no k+1 items of c within w positions."""
    if c == OOV_INDEX:
        return True
    ps = placed.get(c)
    ahead = future.get(c)
    if not ahead:
        return ps is None or len(ps) < k or p - ps[-k] >= w
    seq = [*(ps or []), p, *[q for q in ahead if q > p]]
    me = len(ps or [])
    for a in range(max(0, me - k), me + 1):
        b = a + k
        if b < len(seq) and seq[b] - seq[a] < w:
            return False
    return True


def _pin_future(pinned: Mapping[int, int], code: Sequence[int]) -> dict[int, list[int]]:
    future: dict[int, list[int]] = {}
    for pos, i in sorted(pinned.items()):
        future.setdefault(code[i], []).append(pos)
    return future


def _fill(stream: list[int], code: list[int], k: int, w: int, length: int,
          pinned: Mapping[int, int], *, relax: bool) -> tuple[list[int], list[int]]:
    """Best-first fill: each position takes the best remaining item that fits; held-back items
    wait per value. Where nothing fits, the least frequent value of the last w−1 positions."""
    future = _pin_future(pinned, code)
    placed: dict[int, list[int]] = {}
    held: dict[int, deque[tuple[int, int]]] = {}  # value -> (stream rank, item), best first
    out: list[int] = []
    stuck: list[int] = []
    i, n = 0, len(stream)
    for p in range(length):
        if p in pinned:
            item = pinned[p]
            c = code[item]
            out.append(item)
            placed.setdefault(c, []).append(p)
            continue
        best_c, best_rank = -1, n
        for c, queue in held.items():
            if queue[0][0] < best_rank and _fits(c, p, placed, k, w, future):
                best_c, best_rank = c, queue[0][0]
        item = -1
        if best_c >= 0:
            item = held[best_c].popleft()[1]
            if not held[best_c]:
                del held[best_c]
        else:
            while i < n:
                cand = stream[i]
                c = code[cand]
                if c == OOV_INDEX or _fits(c, p, placed, k, w, future):
                    item = cand
                    i += 1
                    break
                held.setdefault(c, deque()).append((i, cand))
                i += 1
        if item < 0:
            if not held:
                break  # nothing left to serve
            stuck.append(p)
            recent = out[max(0, len(out) - (w - 1)):]
            best_c = min(held, key=lambda v: (sum(code[x] == v for x in recent), held[v][0][0]))
            item = held[best_c].popleft()[1]
            if not held[best_c]:
                del held[best_c]
        c = code[item]
        out.append(item)
        placed.setdefault(c, []).append(p)
    return out, stuck


def _fill_fast(scode: list[int], k: int, w: int, length: int
               ) -> tuple[list[int], list[int], int, list[int]]:
    """`_fill` without pins, over the stream's values `scode` (stream order): the stream
    indices taken for each position, the stuck positions, how far the stream was read and the
    items read but not taken (ascending).

    While nothing is held back and the stream's next item fits, it is taken at once (the
    common case). Otherwise O(log) per position: a value may be placed again from
    `ready[value]` on; held-back values wait in a heap by that position, and once ready in a
    heap by their best item's rank (they outrank the stream's next item)."""
    out: list[int] = []
    append = out.append
    ready = dict.fromkeys(scode, 0)  # value -> first position it may take (OOV stays 0)
    history: dict[int, deque[int]] = {}  # value -> its last k positions (k > 1)
    held: dict[int, deque[int]] = {}  # value -> stream indices held back, best first
    waiting: list[tuple[int, int]] = []  # (ready position, value) of held values
    avail: list[tuple[int, int]] = []  # (best held index, value) of held values now ready
    stuck: list[int] = []
    push, pop = heapq.heappush, heapq.heappop
    i, n = 0, len(scode)
    for p in range(length):
        if not held and i < n:  # nothing waits: the stream's next item, if it fits
            c = scode[i]
            if ready[c] <= p:
                append(i)
                i += 1
                if c != OOV_INDEX:
                    if k == 1:
                        ready[c] = p + w
                    else:
                        _placed(c, p, k, w, ready, history)
                continue  # (stale `waiting` entries are dropped below, as they come up)
        while waiting and waiting[0][0] <= p:
            t, c = pop(waiting)
            if c in held and ready[c] == t:  # else a stale entry
                push(avail, (held[c][0], c))
        if avail:
            c = pop(avail)[1]
            queue = held[c]
            item = queue.popleft()
            if not queue:
                del held[c]
        else:
            while i < n:
                c = scode[i]
                if ready[c] <= p:
                    break
                queue_ = held.get(c)
                if queue_ is None:
                    held[c] = deque((i,))
                    push(waiting, (ready[c], c))
                else:
                    queue_.append(i)
                i += 1
            else:
                if not held:
                    break  # nothing left to serve
                stuck.append(p)
                recent = [scode[x] for x in out[max(0, len(out) - (w - 1)):]]
                c = min(held, key=lambda v: (recent.count(v), held[v][0]))
                queue = held[c]
                i_held = queue.popleft()
                if not queue:
                    del held[c]
                append(i_held)
                _placed(c, p, k, w, ready, history)
                if c in held:
                    push(waiting, (ready[c], c))
                continue
            item = i
            i += 1
        append(item)
        if c != OOV_INDEX:
            if k == 1:
                ready[c] = p + w
            else:
                _placed(c, p, k, w, ready, history)
            if c in held:
                push(waiting, (ready[c], c))
    left = sorted(itertools.chain.from_iterable(held.values())) if held else []
    return out, stuck, i, left


def _placed(c: int, p: int, k: int, w: int, ready: dict[int, int],
            history: dict[int, deque[int]]) -> None:
    """Value c was placed at p: from when it may be placed again."""
    if c == OOV_INDEX:
        return
    if k == 1:
        ready[c] = p + w
        return
    h = history.get(c)
    if h is None:
        h = history[c] = deque()
    h.append(p)
    if len(h) > k:
        h.popleft()
    if len(h) == k:
        ready[c] = h[0] + w


def _could_fit(stream: list[int], code: list[int], k: int, w: int, length: int,
               pinned: Mapping[int, int]) -> bool:
    """A necessary condition for a fill without relaxing: enough items that could ever fit."""
    counts: dict[int, int] = {}
    for x in stream:
        counts[code[x]] = counts.get(code[x], 0) + 1
    cap = k * (length // w) + min(k, length % w)
    total = sum(p < length for p in pinned)
    total += sum(v if c == OOV_INDEX else min(v, cap) for c, v in counts.items())
    return total >= length


def _search(stream: list[int], code: list[int], k: int, w: int, length: int,
            pinned: Mapping[int, int], budget: int,
            prefix: list[int] | None = None) -> list[int] | None:
    """Depth-first search for a fill without relaxing after a kept `prefix` (the best-first
    fill's first positions), trying values best item first at each position (so its first
    complete fill is the best-first one wherever one exists); gives up after `budget`
    placements."""
    future = _pin_future(pinned, code)
    groups: dict[int, list[int]] = {}
    for x in stream:
        groups.setdefault(code[x], []).append(x)
    rank = {x: r for r, x in enumerate(stream)}
    taken = dict.fromkeys(groups, 0)
    placed: dict[int, list[int]] = {}
    out: list[int] = []
    for p, item in enumerate(prefix or []):  # a value's items go in stream order: its first ones
        c = code[item]
        placed.setdefault(c, []).append(p)
        if p not in pinned:
            taken[c] += 1
        out.append(item)
    base = len(out)
    if base >= length:
        return out
    choices: list[list[int]] = []  # per position: values still to try
    tries = 0

    def options(p: int) -> list[int]:
        if p in pinned:
            return [-1]
        vals = [c for c, items in groups.items()
                if taken[c] < len(items) and _fits(c, p, placed, k, w, future)]
        vals.sort(key=lambda c: rank[groups[c][taken[c]]], reverse=True)  # pop() takes the best
        return vals

    choices.append(options(base))
    while choices:
        p = len(out)
        if not choices[-1]:
            choices.pop()
            if len(out) == base:
                return None
            q = len(out) - 1  # undo the placement at q
            item = out.pop()
            c = code[item]
            placed[c].pop()
            if q not in pinned:
                taken[c] -= 1
            continue
        tries += 1
        if tries > budget:
            return None
        c = choices[-1].pop()
        if c == -1:
            item = pinned[p]
            c = code[item]
        else:
            item = groups[c][taken[c]]
            taken[c] += 1
        out.append(item)
        placed.setdefault(c, []).append(p)
        if len(out) == length:
            return out
        choices.append(options(len(out)))
    return None
