"""The experiments file: arms with traffic shares and a deterministic, sticky assignment. Pure.

`RANKER_EXPERIMENTS_FILE` is TOML (docs/experiments.md has the full format)::

    traffic_salt = "traffic-1"        # optional; the hash that places users in experiments

    [[experiment]]
    name = "v2-vs-v1"
    salt = "2026-12"                  # the hash that places the experiment's users in arms
    traffic = [0.0, 0.5]              # optional, default [0, 1]: the slice of users it covers
    [[experiment.arm]]
    name = "control"
    share = 0.5
    model_version = 1
    [[experiment.arm]]
    name = "treatment"
    share = 0.5
    model_version = 2                 # or model_name, weights, preset, scoring
    [experiment.canary]               # optional: parsed and validated; acted on by the canary
    arm = "treatment"
    steps = [0.01, 0.05, 0.25, 1.0]
    step_s = 600
    max_error_ratio = 0.01
    max_p99_ms = 50

Assignment of a user id (`Experiments.assign`), two independent stable hashes (sha256, never
Python's salted `hash`), each mapped to [0, 1):

1. `t = unit_hash(traffic_salt, user_id)`: the user is in the experiment whose `traffic` range
   [lo, hi) holds t, or in none. **Overlap rule**: the traffic ranges of a file's experiments
   must be disjoint, so a user is in at most one experiment and two experiments never change
   the same request (no layers: one experiment per user, by construction).
2. `u = unit_hash(salt, user_id)`: the arm whose contiguous share range holds u (arms in file
   order; an experiment's canary arm first, so a canary that grows keeps its users).

Same file, same user id, same arm: sticky across requests, processes and restarts. Another salt
gives an assignment independent of the first.

Validation names the path and the limit (`experiment[1].arm[0].share: ...`); every error of a
file is reported at once. With a `Catalog` (the serving side's model versions, presets, tasks,
weight bounds) arms are checked against it too; without one (the offline report) only the
file's own structure is. `ExperimentsLoader` keeps the config in force when a new file is
refused, so a reload without restart is one call.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import itertools
import math
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

from service.ranking import InvalidWeights, resolve_weights, unit_hash
from service.settings import Settings

SCORINGS: tuple[str, ...] = typing.get_args(Settings.model_fields["scoring"].annotation)
SHARE_TOLERANCE = 1e-9
DEFAULT_TRAFFIC_SALT = "traffic"
FORCE_HEADER = "X-Ranker-Arm"  # "experiment/arm"; admin key required (checked where it is wired)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # goes into a header and metric labels
_TOP_KEYS = {"traffic_salt", "experiment", "shadow"}
_EXPERIMENT_KEYS = {"name", "salt", "traffic", "arm", "canary"}
_ARM_KEYS = {"name", "share", "model_name", "model_version", "weights", "preset", "scoring"}
_CANARY_KEYS = {"arm", "steps", "step_s", "max_error_ratio", "max_p99_ms", "start"}
_SHADOW_KEYS = {"model_name", "model_version", "share"}


class ExperimentsError(ValueError):
    """An experiments file that is refused: every problem, each as `path: message`."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = list(errors)


class ForcedArmError(ValueError):
    """A forced-arm header value that names no declared experiment and arm."""


@dataclass(frozen=True)
class Overrides:
    """What an arm changes in a request; None leaves the request's (or the default's) value."""

    model_name: str | None = None
    model_version: int | None = None
    weights: Mapping[str, float] | None = None
    preset: str | None = None
    scoring: str | None = None


@dataclass(frozen=True)
class Arm:
    """One arm: its name, its share of the experiment's users and what it overrides."""

    name: str
    share: float
    overrides: Overrides = field(default_factory=Overrides)


@dataclass(frozen=True)
class Canary:
    """A canary schedule: `arm`'s share steps through `steps` every `step_s` seconds while its
    error ratio and p99 stay within the limits (acted on by the canary controller)."""

    arm: str
    steps: tuple[float, ...]
    step_s: float
    max_error_ratio: float
    max_p99_ms: float
    # unix seconds of step 0; None: the experiments file's mtime (the same on every worker)
    start: float | None = None

    def step_at(self, now: float, start: float) -> int:
        """The schedule's step at `now`: one every `step_s` from `start`, the last kept."""
        if now < start:
            return 0
        return min(int((now - start) // self.step_s), len(self.steps) - 1)


@dataclass(frozen=True)
class Shadow:
    """A model that scores a share of requests off the request path (its scores are logged,
    its agreement with the live ranking measured); it never changes a response."""

    model_name: str | None = None
    model_version: int | None = None
    share: float = 1.0


@dataclass(frozen=True)
class Experiment:
    """An experiment: its salt, the slice of users it covers and its arms."""

    name: str
    salt: str
    arms: tuple[Arm, ...]
    traffic: tuple[float, float] = (0.0, 1.0)
    canary: Canary | None = None

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)

    def shares(self) -> dict[str, float]:
        """The declared share of each arm, in file order."""
        return {a.name: a.share for a in self.arms}

    def shares_at(self, step: int) -> dict[str, float]:
        """The shares at canary step `step`: the canary arm's is `steps[step]`, the other arms
        share the rest in proportion to their declared shares."""
        if self.canary is None:
            raise ValueError(f"experiment {self.name!r} has no canary")
        s = self.canary.steps[step]
        others = {a.name: a.share for a in self.arms if a.name != self.canary.arm}
        total = sum(others.values())
        rest = {n: (1.0 - s) * (v / total if total > 0 else 1.0 / len(others))
                for n, v in others.items()}
        return {a.name: s if a.name == self.canary.arm else rest[a.name] for a in self.arms}

    def bounds(self, shares: Mapping[str, float] | None = None) -> list[tuple[float, Arm]]:
        """Each arm's upper bound in [0, 1] (contiguous ranges; the canary arm's first), the
        last exactly 1.0 so that rounding leaves no gap."""
        shares = self.shares() if shares is None else shares
        order = sorted(self.arms, key=lambda a: self.canary is None or a.name != self.canary.arm)
        out, hi = [], 0.0
        for a in order:
            hi += shares[a.name]
            out.append((hi, a))
        out[-1] = (1.0, out[-1][1])
        return out

    @cached_property
    def _declared(self) -> tuple[list[float], list[Arm]]:
        """The declared shares' bounds, computed once (assign runs on every request)."""
        bounds = self.bounds()
        return [hi for hi, _ in bounds], [a for _, a in bounds]

    def assign(self, user_id: str, shares: Mapping[str, float] | None = None) -> Arm:
        """The user's arm, by `unit_hash(salt, user_id)`."""
        if shares is None:
            his, arms = self._declared
        else:
            bounds = self.bounds(shares)
            his, arms = [hi for hi, _ in bounds], [a for _, a in bounds]
        i = bisect.bisect_right(his, unit_hash(self.salt, user_id))
        return arms[min(i, len(arms) - 1)]


@dataclass(frozen=True)
class Assignment:
    """What `Experiments.assign` gives a request: the experiment, the arm, what it overrides."""

    experiment: str
    arm: str
    overrides: Overrides
    forced: bool = False


@dataclass(frozen=True)
class Experiments:
    """A validated experiments file. `assign` is pure: the pipeline calls it per request."""

    experiments: tuple[Experiment, ...] = ()
    traffic_salt: str = DEFAULT_TRAFFIC_SALT
    shadow: Shadow | None = None
    source: str | None = None  # the file it came from
    sha256: str | None = None  # of the file's bytes: a reload of the same bytes changes nothing

    def get(self, name: str) -> Experiment | None:
        return next((e for e in self.experiments if e.name == name), None)

    def experiment_of(self, user_id: str) -> Experiment | None:
        """The experiment whose traffic range holds the user, or None."""
        if not self.experiments:
            return None
        t = unit_hash(self.traffic_salt, user_id)
        return next((e for e in self.experiments if e.traffic[0] <= t < e.traffic[1]), None)

    def assign(
        self, user_id: str, shares: Mapping[str, Mapping[str, float]] | None = None
    ) -> Assignment | None:
        """The user's experiment and arm, or None for a user in no experiment. `shares`
        replaces the declared shares of the experiments it names (a canary's current step)."""
        exp = self.experiment_of(user_id)
        if exp is None:
            return None
        arm = exp.assign(user_id, None if shares is None else shares.get(exp.name))
        return Assignment(exp.name, arm.name, arm.overrides)

    def force(self, value: str) -> Assignment:
        """The assignment a forced-arm header (`experiment/arm`) asks for (QA); ForcedArmError
        when it names no declared experiment and arm."""
        exp_name, sep, arm_name = value.strip().partition("/")
        if not sep or not exp_name or not arm_name:
            raise ForcedArmError(f"{FORCE_HEADER} must be 'experiment/arm', got {value[:140]!r}")
        exp = self.get(exp_name)
        if exp is None:
            known = ", ".join(e.name for e in self.experiments) or "none declared"
            raise ForcedArmError(f"{FORCE_HEADER}: unknown experiment {exp_name[:64]!r} "
                                 f"(known: {known})")
        arm = exp.arm(arm_name)
        if arm is None:
            known = ", ".join(a.name for a in exp.arms)
            raise ForcedArmError(f"{FORCE_HEADER}: experiment {exp.name!r} has no arm "
                                 f"{arm_name[:64]!r} (arms: {known})")
        return Assignment(exp.name, arm.name, arm.overrides, forced=True)

    def models(self, default_model: str) -> set[tuple[str, int | None]]:
        """The (model name, version) pairs the arms serve (None: the name's newest version):
        what the registry must hold loaded and warm besides its own."""
        out = {(a.overrides.model_name or default_model, a.overrides.model_version)
               for e in self.experiments for a in e.arms
               if a.overrides.model_name is not None or a.overrides.model_version is not None}
        if self.shadow is not None:
            out.add((self.shadow.model_name or default_model, self.shadow.model_version))
        return out

    def shares(self) -> dict[str, dict[str, float]]:
        """Declared shares: experiment -> arm -> share (what the report's SRM check expects)."""
        return {e.name: e.shares() for e in self.experiments}


@dataclass(frozen=True)
class Catalog:
    """What an arm may name on the serving side: models and versions, presets, tasks, bounds."""

    versions: Mapping[str, Sequence[int]]  # model name -> versions available in the repository
    default_model: str
    tasks: Sequence[str]
    presets: Mapping[str, Mapping[str, float]]
    default_weights: Mapping[str, float]
    weight_bounds: tuple[float, float]

    @classmethod
    def from_settings(cls, settings: Settings, versions: Mapping[str, Sequence[int]],
                      tasks: Sequence[str]) -> Catalog:
        return cls(versions=versions, default_model=settings.model_name, tasks=tuple(tasks),
                   presets=settings.presets, default_weights=settings.default_weights,
                   weight_bounds=(settings.weight_min, settings.weight_max))


# ---- parsing and validation -----------------------------------------------------------------


class _Errors:
    """Collects `path: message` lines, so a file's every problem is reported at once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _finite(v: Any) -> float | None:
    """v as a float when it is a finite TOML number (not a bool), else None."""
    return float(v) if _is_number(v) and math.isfinite(v) else None


def _name(raw: Mapping[str, Any], path: str, errs: _Errors) -> str | None:
    v = raw.get("name")
    if not isinstance(v, str) or not _NAME.match(v):
        errs.add(f"{path}.name", f"required: 1-64 of letters, digits, '.', '_', '-' "
                 f"(got {v!r:.80})")
        return None
    return v


def _unknown_keys(raw: Mapping[str, Any], allowed: set[str], path: str, errs: _Errors) -> None:
    for k in sorted(set(raw) - allowed):
        errs.add(f"{path}.{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _table_list(raw: Any, path: str, errs: _Errors) -> list[Mapping[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        errs.add(path, f"must be an array of tables ([[{path.rsplit('.', 1)[-1]}]])")
        return []
    return raw


def _parse_overrides(raw: Mapping[str, Any], path: str, errs: _Errors,
                     catalog: Catalog | None) -> Overrides:
    model_name = raw.get("model_name")
    if model_name is not None and not isinstance(model_name, str):
        errs.add(f"{path}.model_name", "must be a string")
        model_name = None
    version = raw.get("model_version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                or version < 1):
        errs.add(f"{path}.model_version", f"must be an integer >= 1 (got {version!r:.40})")
        version = None
    weights = raw.get("weights")
    if weights is not None and (not isinstance(weights, dict)
                                or not all(_is_number(w) for w in weights.values())):
        errs.add(f"{path}.weights", "must be a table of task = number")
        weights = None
    preset = raw.get("preset")
    if preset is not None and not isinstance(preset, str):
        errs.add(f"{path}.preset", "must be a string")
        preset = None
    scoring = raw.get("scoring")
    if scoring is not None and scoring not in SCORINGS:
        errs.add(f"{path}.scoring", f"unknown scoring {scoring!r:.40} (known: "
                 f"{', '.join(SCORINGS)})")
        scoring = None
    if catalog is not None:
        _check_against(catalog, path, errs, model_name, version, weights, preset)
    return Overrides(
        model_name=model_name, model_version=version,
        weights=None if weights is None else MappingProxyType({k: float(w)
                                                                for k, w in weights.items()}),
        preset=preset, scoring=scoring,
    )


def _check_against(catalog: Catalog, path: str, errs: _Errors, model_name: str | None,
                   version: int | None, weights: Mapping[str, float] | None,
                   preset: str | None) -> None:
    """An arm's model, version, preset and weights exist and are within the service's limits."""
    name = model_name or catalog.default_model
    available = list(catalog.versions.get(name, ()))
    if not available:
        known = ", ".join(sorted(n for n, v in catalog.versions.items() if v)) or "none"
        errs.add(f"{path}.model_name" if model_name else f"{path}.model_version",
                 f"no version of model {name!r} in the repository (models: {known})")
    elif version is not None and version not in available:
        errs.add(f"{path}.model_version", f"version {version} of model {name!r} is not in the "
                 f"repository (available: {', '.join(map(str, available))})")
    try:
        resolve_weights(catalog.tasks, weights, preset, defaults=catalog.default_weights,
                        presets=catalog.presets, bounds=catalog.weight_bounds)
    except InvalidWeights as e:  # the request's own rule, so an arm can set what a request can
        errs.add(f"{path}.{e.field}", e.message)


def _parse_arm(raw: Mapping[str, Any], path: str, errs: _Errors,
               catalog: Catalog | None) -> Arm | None:
    _unknown_keys(raw, _ARM_KEYS, path, errs)
    name = _name(raw, path, errs)
    share = _finite(raw.get("share"))
    if share is None or not 0.0 <= share <= 1.0:
        errs.add(f"{path}.share", f"required: a number in [0, 1] (got {raw.get('share')!r:.40})")
        share = None
    overrides = _parse_overrides(raw, path, errs, catalog)
    if name is None or share is None:
        return None
    return Arm(name=name, share=float(share), overrides=overrides)


def _parse_traffic(raw: Any, path: str, errs: _Errors) -> tuple[float, float]:
    if raw is None:
        return (0.0, 1.0)
    if (isinstance(raw, list) and len(raw) == 2 and all(_is_number(x) for x in raw)
            and 0.0 <= raw[0] < raw[1] <= 1.0):
        return (float(raw[0]), float(raw[1]))
    errs.add(path, f"must be [lo, hi] with 0 <= lo < hi <= 1 (got {raw!r:.60})")
    return (0.0, 1.0)


def _parse_canary(raw: Any, path: str, errs: _Errors, arms: Sequence[Arm]) -> Canary | None:
    if not isinstance(raw, dict):
        errs.add(path, "must be a table ([experiment.canary])")
        return None
    _unknown_keys(raw, _CANARY_KEYS, path, errs)
    n = len(errs.lines)
    arm = raw.get("arm")
    if not isinstance(arm, str) or arm not in {a.name for a in arms}:
        errs.add(f"{path}.arm", f"must name one of the experiment's arms "
                 f"({', '.join(a.name for a in arms)}; got {arm!r:.40})")
    steps = raw.get("steps")
    if (not isinstance(steps, list) or not steps or not all(_is_number(s) for s in steps)
            or not all(0.0 < s <= 1.0 for s in steps)
            or any(b <= a for a, b in itertools.pairwise(steps))):
        errs.add(f"{path}.steps", f"must be a non-empty, strictly increasing list of shares in "
                 f"(0, 1] (got {steps!r:.60})")
    limits = {"step_s": (0.0, math.inf, False), "max_error_ratio": (0.0, 1.0, True),
              "max_p99_ms": (0.0, math.inf, False)}
    values: dict[str, float] = {}
    for key, (lo, hi, closed) in limits.items():
        v = _finite(raw.get(key))
        if v is None or not (lo <= v if closed else lo < v) or v > hi:
            bound = f"in [{lo:g}, {hi:g}]" if closed else f"> {lo:g} and finite"
            errs.add(f"{path}.{key}", f"required: a number {bound} (got {raw.get(key)!r:.40})")
        else:
            values[key] = v
    start: float | None = None
    if "start" in raw:
        v = raw["start"]
        if isinstance(v, datetime.datetime) and v.tzinfo is not None:
            start = v.timestamp()
        elif _finite(v) is not None and v >= 0:
            start = float(v)
        else:
            errs.add(f"{path}.start", f"must be unix seconds or an offset date-time like "
                     f"2026-12-01T10:00:00Z (got {v!r:.40})")
    if len(errs.lines) > n or not isinstance(arm, str) or not isinstance(steps, list):
        return None
    return Canary(arm=arm, steps=tuple(float(s) for s in steps), start=start, **values)


def _parse_shadow(raw: Any, errs: _Errors, catalog: Catalog | None) -> Shadow | None:
    if not isinstance(raw, dict):
        errs.add("shadow", "must be a table ([shadow])")
        return None
    _unknown_keys(raw, _SHADOW_KEYS, "shadow", errs)
    n = len(errs.lines)
    share = _finite(raw.get("share", 1.0))
    if share is None or not 0.0 < share <= 1.0:
        errs.add("shadow.share", f"a number in (0, 1] (got {raw.get('share')!r:.40})")
    if raw.get("model_name") is None and raw.get("model_version") is None:
        errs.add("shadow", "names no model: set model_name and/or model_version")
    o = _parse_overrides({k: raw[k] for k in ("model_name", "model_version") if k in raw},
                         "shadow", errs, catalog)
    if len(errs.lines) > n or share is None:
        return None
    return Shadow(model_name=o.model_name, model_version=o.model_version, share=share)


def _parse_experiment(raw: Mapping[str, Any], path: str, errs: _Errors,
                      catalog: Catalog | None) -> Experiment | None:
    _unknown_keys(raw, _EXPERIMENT_KEYS, path, errs)
    name = _name(raw, path, errs)
    salt = raw.get("salt")
    if not isinstance(salt, str) or not salt:
        errs.add(f"{path}.salt", "required: a non-empty string (a new salt reshuffles users)")
        salt = None
    traffic = _parse_traffic(raw.get("traffic"), f"{path}.traffic", errs)
    arms: list[Arm] = []
    raw_arms = _table_list(raw.get("arm", []), f"{path}.arm", errs)
    for i, a in enumerate(raw_arms):
        arm = _parse_arm(a, f"{path}.arm[{i}]", errs, catalog)
        if arm is not None:
            arms.append(arm)
    if len(raw_arms) < 2:
        errs.add(f"{path}.arm", f"an experiment needs at least 2 arms, has {len(raw_arms)}")
    seen: dict[str, int] = {}
    for i, a in enumerate(raw_arms):
        n = a.get("name")
        if isinstance(n, str) and n in seen:
            errs.add(f"{path}.arm[{i}].name", f"duplicate arm {n!r} (first at arm[{seen[n]}])")
        elif isinstance(n, str):
            seen[n] = i
    if len(arms) == len(raw_arms) and arms:
        total = math.fsum(a.share for a in arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            errs.add(f"{path}.arm", f"shares sum to {total!r}, must sum to 1 (within "
                     f"{SHARE_TOLERANCE:g})")
    canary = None
    if "canary" in raw:
        canary = _parse_canary(raw["canary"], f"{path}.canary", errs, arms)
    if name is None or salt is None or len(arms) != len(raw_arms):
        return None
    return Experiment(name=name, salt=salt, arms=tuple(arms), traffic=traffic, canary=canary)


def parse_experiments(data: Mapping[str, Any], catalog: Catalog | None = None, *,
                      source: str | None = None, sha256: str | None = None) -> Experiments:
    """Validate a parsed experiments document; ExperimentsError lists every problem."""
    errs = _Errors()
    _unknown_keys(data, _TOP_KEYS, "file", errs)
    traffic_salt = data.get("traffic_salt", DEFAULT_TRAFFIC_SALT)
    if not isinstance(traffic_salt, str) or not traffic_salt:
        errs.add("traffic_salt", "must be a non-empty string")
        traffic_salt = DEFAULT_TRAFFIC_SALT
    raw_exps = _table_list(data.get("experiment", []), "experiment", errs)
    exps: list[Experiment] = []
    for i, raw in enumerate(raw_exps):
        e = _parse_experiment(raw, f"experiment[{i}]", errs, catalog)
        if e is not None:
            exps.append(e)
    _check_across(raw_exps, traffic_salt, errs)
    shadow = _parse_shadow(data["shadow"], errs, catalog) if "shadow" in data else None
    if errs.lines:
        raise ExperimentsError(errs.lines)
    return Experiments(tuple(exps), traffic_salt, shadow, source, sha256)


def _check_across(raw_exps: Sequence[Mapping[str, Any]], traffic_salt: str,
                  errs: _Errors) -> None:
    """Names and salts unique, salts apart from the traffic salt, traffic ranges disjoint."""
    names: dict[str, int] = {}
    salts: dict[str, int] = {}
    for i, raw in enumerate(raw_exps):
        name, salt = raw.get("name"), raw.get("salt")
        if isinstance(name, str):
            if name in names:
                errs.add(f"experiment[{i}].name",
                         f"duplicate experiment {name!r} (first at experiment[{names[name]}])")
            names.setdefault(name, i)
        if isinstance(salt, str) and salt:
            if salt == traffic_salt:
                errs.add(f"experiment[{i}].salt", "must differ from traffic_salt (the arm "
                         "would follow the traffic slice instead of being independent of it)")
            elif salt in salts:
                errs.add(f"experiment[{i}].salt", f"same salt as experiment[{salts[salt]}]: "
                         "each experiment needs its own (or its users repeat the other's split)")
            salts.setdefault(salt, i)
    ranges = []
    for i, r in enumerate(raw_exps):
        bad = _Errors()
        rng = _parse_traffic(r.get("traffic"), "", bad)
        if not bad.lines:  # an invalid range is reported as such, not as an overlap too
            ranges.append((i, rng))
    for j, (i, (lo, hi)) in enumerate(ranges):
        for k, (lo2, hi2) in ranges[:j]:
            if max(lo, lo2) < min(hi, hi2):
                errs.add(f"experiment[{i}].traffic",
                         f"[{lo:g}, {hi:g}) overlaps experiment[{k}]'s [{lo2:g}, {hi2:g}): two "
                         "experiments may not cover the same users; give each a disjoint "
                         "traffic range")


def load_experiments(path: Path, catalog: Catalog | None = None) -> Experiments:
    """Read and validate an experiments file; ExperimentsError when it is refused."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ExperimentsError([f"{path}: cannot read: {e.strerror or e}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ExperimentsError([f"{path}: not TOML: {e}"]) from None
    return parse_experiments(data, catalog, source=str(path),
                             sha256=hashlib.sha256(raw).hexdigest())


@dataclass(frozen=True)
class LoadResult:
    """What a (re)load did: `experiments` is the config in force (the new one, or the old one
    kept when the file was refused, `error` saying why)."""

    ok: bool
    experiments: Experiments
    error: str | None = None
    changed: bool = False


class ExperimentsLoader:
    """Holds the config in force; `load()` swaps in a valid file and keeps the old otherwise."""

    def __init__(self, path: Path | None, catalog: Catalog | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.catalog = catalog
        self.current = Experiments()

    def load(self, catalog: Catalog | None = None) -> LoadResult:
        """Read the file again (with a new catalog if given: versions come and go)."""
        if catalog is not None:
            self.catalog = catalog
        if self.path is None:
            return LoadResult(ok=True, experiments=self.current)
        try:
            new = load_experiments(self.path, self.catalog)
        except ExperimentsError as e:
            return LoadResult(ok=False, experiments=self.current, error=str(e))
        if new == self.current:  # same file, same config: the object in force stays
            return LoadResult(ok=True, experiments=self.current)
        self.current = new
        return LoadResult(ok=True, experiments=new, changed=True)
