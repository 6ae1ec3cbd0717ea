"""The re-rank rules file: named presets in TOML, reloaded when the file changes.

    default_preset = "feed"            # optional: applied to requests that name no preset

    [presets.feed.diversity]
    attribute = "category"
    max_per_window = 1
    window = 3

    [presets.feed.filters]
    seen = true

    [[presets.feed.boosts]]
    attribute = "age_days"
    edges = [7, 30]
    factors = [1.3, 1.0, 0.8]

Every preset has the sections of the request's `rerank` object (service.schemas.RerankSpec,
checked the same way) and must stay within the settings' bounds. The request path asks
`RulesFile.current()`, which looks at the file's mtime at most every `rerank_rules_poll_s`; a
changed file is parsed and checked whole, and only a valid one replaces the rules: an invalid
one is logged and counted (`ranker_rerank_rules_reloads_total{result="failure"}`) and the old
rules keep serving. At startup an invalid file stops the service (as a bad setting does).
Attributes are checked per request against the serving model's item features, since the file
does not know which model serves.
"""

from __future__ import annotations

import logging
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service import metrics
from service.rerank import Bounds
from service.schemas import RerankSpec

log = logging.getLogger("ranker.rerank")


class RulesFileError(ValueError):
    """The rules file cannot be read or breaks a rule; the message names the key."""


@dataclass(frozen=True)
class RulesConfig:
    """The presets in force (raw sections, as a request's `rerank` object would give them)."""

    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    default_preset: str | None = None


def parse_rules(text: str, bounds: Bounds) -> RulesConfig:
    """Parse and check a rules file's text (RulesFileError naming the key)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RulesFileError(f"not valid TOML: {e}") from e
    unknown = set(raw) - {"default_preset", "presets"}
    if unknown:
        raise RulesFileError(f"unknown key(s) {sorted(unknown)} (allowed: default_preset, presets)")
    presets = raw.get("presets", {})
    if not isinstance(presets, dict):
        raise RulesFileError("presets: must be a table of presets")
    checked: dict[str, dict[str, Any]] = {}
    for name, body in presets.items():
        where = f"presets.{name}"
        if not isinstance(body, dict):
            raise RulesFileError(f"{where}: must be a table")
        if "preset" in body:
            raise RulesFileError(f"{where}.preset: a preset cannot name another preset")
        try:
            spec = RerankSpec.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise RulesFileError(f"{where}.{loc}: {err['msg']}") from e
        _check_bounds(where, spec, bounds)
        checked[name] = spec.model_dump(exclude_unset=True, by_alias=True)
    default = raw.get("default_preset")
    if default is not None and default not in checked:
        raise RulesFileError(f"default_preset: {default!r} is not one of the presets "
                             f"({', '.join(sorted(checked)) or 'none'})")
    return RulesConfig(checked, default)


def _check_bounds(where: str, spec: RerankSpec, bounds: Bounds) -> None:
    if spec.diversity is not None and spec.diversity.window > bounds.max_window:
        raise RulesFileError(f"{where}.diversity.window: at most {bounds.max_window}")
    for i, b in enumerate(spec.boosts or []):
        factors = list((b.values or {}).values()) + list(b.factors or [])
        for f in factors:
            if not bounds.boost_min <= f <= bounds.boost_max:
                raise RulesFileError(f"{where}.boosts[{i}]: factor {f:g} outside "
                                     f"[{bounds.boost_min:g}, {bounds.boost_max:g}]")
    if spec.filters is not None and len(spec.filters.exclude) > bounds.max_exclude:
        raise RulesFileError(f"{where}.filters.exclude: at most {bounds.max_exclude} ids")


def load_rules(path: Path, bounds: Bounds) -> RulesConfig:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RulesFileError(f"cannot read {path}: {e}") from e
    return parse_rules(text, bounds)


class RulesFile:
    """The rules in force: the file's last valid content (or none without a file)."""

    def __init__(self, path: Path | None, bounds: Bounds, poll_s: float = 1.0) -> None:
        self.path = path
        self.bounds = bounds
        self.poll_s = poll_s
        self.config = RulesConfig()
        self._stamp: tuple[int, int] | None = None
        self._next = 0.0
        if path is not None:  # at startup an invalid file is an error, not a warning
            self._stamp = _stamp(path)
            self.config = load_rules(path, bounds)
            metrics.RERANK_RELOADS.labels("success").inc()
            self._next = time.monotonic() + poll_s

    def current(self) -> RulesConfig:
        """The rules in force, re-read first if the file changed (checked every poll_s)."""
        if self.path is not None:
            now = time.monotonic()
            if now >= self._next:
                self._next = now + self.poll_s
                self.check()
        return self.config

    def check(self) -> bool:
        """Reload if the file's mtime or size changed; True if new rules were taken."""
        assert self.path is not None
        try:
            stamp = _stamp(self.path)
        except OSError as e:
            stamp = None
            why = f"cannot stat: {e}"
        if stamp is not None and stamp == self._stamp:
            return False
        if stamp is not None:
            try:
                config = load_rules(self.path, self.bounds)
            except RulesFileError as e:
                why = str(e)
            else:
                self._stamp, self.config = stamp, config
                metrics.RERANK_RELOADS.labels("success").inc()
                log.info("re-rank rules reloaded from %s: presets %s", self.path,
                         sorted(config.presets))
                return True
        if self._stamp is not None or stamp is not None:  # log a bad version once
            self._stamp = stamp
            metrics.RERANK_RELOADS.labels("failure").inc()
            log.error("re-rank rules file %s refused, the previous rules stay: %s",
                      self.path, why)
        return False


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size
