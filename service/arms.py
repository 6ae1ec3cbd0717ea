"""Experiments on the serving side: the file in force, the arms' models, the canary controller.

`Arms` holds one `ArmsConfig` (the validated file and the loaded, warmed model of every arm and
of the shadow), swapped by one assignment when the file changes. The lifespan calls `tick()` in
a thread every `experiments_poll_s`: a changed file (mtime, size) is validated against the
repository, its models are loaded and warmed, and only then is it swapped in; a refused file is
logged, counted (`ranker_experiments_reloads_total{result="failure"}`) and the old one kept. At
start-up a refused file is an error (the service does not start), like a bad setting.

**Canary.** Each worker runs its own controller; the decision is shared without talking:

- the step is a function of time: `steps[(now - start) // step_s]`, `start` from the file (else
  the file's mtime), so every worker serves the same share at the same moment;
- a breach (the canary arm's error ratio or p99 over the last `canary_window_s` in this worker,
  once it has `canary_min_requests` outcomes) writes `<experiments file>.rollback.json` (the
  experiment, the arm, why, and the sha256 of the experiments file it applies to); every
  worker reads it on its tick, so a rollback seen by one worker reaches all within one poll.
  Editing the experiments file (a new sha256) starts the canary afresh.

A file rather than Redis: the rollback must hold when Redis is down, and the experiments file
it belongs to is already on a disk every worker reads.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service import metrics
from service.experiments import (
    Assignment,
    Catalog,
    Experiment,
    Experiments,
    ExperimentsError,
    ExperimentsLoader,
    unit_hash,
)
from service.registry import LoadedModel, ModelLoadError, ModelRegistry
from service.settings import Settings

log = logging.getLogger("ranker.experiments")

ModelKey = tuple[str, int | None]


@dataclass(frozen=True)
class ArmsConfig:
    """The experiments in force and the model each (name, version) of theirs resolves to."""

    experiments: Experiments = field(default_factory=Experiments)
    models: Mapping[ModelKey, LoadedModel] = field(default_factory=dict)
    start: float = 0.0  # the canary schedule's default start: the file's mtime


@dataclass
class Rollback:
    arm: str
    reason: str
    at: float


class Window:
    """One arm's outcomes over the last `window_s` in this worker: (time, ok, seconds)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.items: collections.deque[tuple[float, bool, float]] = collections.deque()
        self.checked = 0.0

    def add(self, now: float, ok: bool, seconds: float) -> None:
        self.items.append((now, ok, seconds))
        while self.items and self.items[0][0] < now - self.window_s:
            self.items.popleft()

    def verdict(self, min_requests: int, max_error_ratio: float, max_p99_ms: float
                ) -> str | None:
        """Why the arm breaches its limits, or None."""
        n = len(self.items)
        if n < min_requests:
            return None
        errors = sum(1 for _, ok, _ in self.items if not ok)
        if errors / n > max_error_ratio:
            return f"error ratio {errors}/{n} = {errors / n:.3f} > {max_error_ratio:g}"
        p99 = float(np.percentile([s for _, _, s in self.items], 99)) * 1e3
        if p99 > max_p99_ms:
            return f"p99 {p99:.1f} ms > {max_p99_ms:g} ms over {n} requests"
        return None


def rollback_path(experiments_file: Path) -> Path:
    return experiments_file.with_name(experiments_file.name + ".rollback.json")


class Arms:
    """The experiments in force, reloaded without restart; per request `resolve` and `record`."""

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.path = settings.experiments_file
        self.loader = ExperimentsLoader(self.path)
        self.config = ArmsConfig()
        self.rollbacks: dict[str, Rollback] = {}  # experiment -> rollback (of this file)
        self._stamp: tuple[int, int] | None = None
        self._rb_stamp: tuple[int, int] | None = None
        self._windows: dict[tuple[str, str], Window] = {}
        self._lock = threading.Lock()  # reloads (threads) against each other
        self.on_change: Callable[[ArmsConfig], None] | None = None

    # ---- loading ---------------------------------------------------------------------------

    def catalog(self) -> Catalog:
        cur = self.registry.current
        tasks = cur.tasks if cur is not None else list(self.settings.default_weights)
        return Catalog.from_settings(self.settings, self.registry.catalog_versions(), tasks)

    def start(self) -> None:
        """The first load: a refused file raises (ExperimentsError), the service must not start."""
        if self.path is None:
            return
        if not self._reload(strict=True):
            raise ExperimentsError(["experiments file refused"])

    def tick(self) -> None:
        """One poll (in a thread): reload a changed file, read the rollback file, set gauges."""
        if self.path is None:
            return
        try:
            stamp = _stamp(self.path)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._reload(strict=False)
        self._read_rollbacks()
        self._publish(time.time())

    def _reload(self, strict: bool) -> bool:
        assert self.path is not None
        with self._lock:
            try:
                stamp: tuple[int, int] | None = _stamp(self.path)
            except OSError:
                stamp = None
            old = self.loader.current
            res = self.loader.load(self.catalog())
            error = res.error
            models: dict[ModelKey, LoadedModel] = dict(self.config.models)
            if res.ok and res.changed:
                try:
                    models = self.registry.ensure(res.experiments.models(self.settings.model_name))
                except ModelLoadError as e:
                    self.loader.current = old
                    error = f"{e.check}: {e}"
            self._stamp = stamp
            if error is not None:
                metrics.EXPERIMENTS_RELOADS.labels("failure").inc()
                log.error("experiments file %s refused, the experiments in force stay: %s",
                          self.path, error)
                if strict:
                    raise ExperimentsError([error])
                return False
            if res.changed or strict:
                mtime = stamp[0] / 1e9 if stamp is not None else time.time()
                self.config = ArmsConfig(res.experiments, models, mtime)
                self._windows.clear()
                self._rb_stamp = None  # the rollbacks are read again against the new sha256
                self.rollbacks = {}
                metrics.EXPERIMENTS_RELOADS.labels("success").inc()
                for (name, _), m in models.items():
                    if m.memory_bytes is not None:
                        metrics.MODEL_MEMORY.labels(name, str(m.version)).set(m.memory_bytes)
                log.info("experiments loaded from %s: %s", self.path,
                         [e.name for e in res.experiments.experiments])
                if self.on_change is not None:
                    self.on_change(self.config)
            return True

    # ---- the canary ------------------------------------------------------------------------

    def _read_rollbacks(self) -> None:
        assert self.path is not None
        path = rollback_path(self.path)
        try:
            stamp: tuple[int, int] | None = _stamp(path)
        except OSError:
            stamp = None
        if stamp == self._rb_stamp:
            return
        self._rb_stamp = stamp
        for exp, rb in read_rollbacks(path, self.config.experiments.sha256).items():
            if exp not in self.rollbacks:
                log.error("canary of experiment %s rolled back (by another worker): arm %s: %s",
                          exp, rb.arm, rb.reason)
            self.rollbacks[exp] = rb

    def shares(self, now: float) -> dict[str, dict[str, float]]:
        """The shares of every canaried experiment at `now` (a rolled-back canary gets 0)."""
        out = {}
        for e in self.config.experiments.experiments:
            if e.canary is not None:
                out[e.name] = canary_shares(e, now, self.config.start, e.name in self.rollbacks)
        return out

    def _publish(self, now: float) -> None:
        canaried = self.shares(now)
        for e in self.config.experiments.experiments:
            shares = canaried.get(e.name) or e.shares()
            for arm, share in shares.items():
                metrics.ARM_SHARE.labels(e.name, arm).set(share)
            if e.canary is not None:
                metrics.CANARY_SHARE.labels(e.name, e.canary.arm).set(shares[e.canary.arm])

    def state(self, now: float | None = None) -> dict[str, Any]:
        """What /model shows: the file, every experiment's arms and shares now, the canaries."""
        now = time.time() if now is None else now
        cfg = self.config
        shares = self.shares(now)
        exps = []
        for e in cfg.experiments.experiments:
            body: dict[str, Any] = {
                "name": e.name, "traffic": list(e.traffic),
                "arms": [{"name": a.name, "declared_share": a.share,
                          "share": shares.get(e.name, e.shares())[a.name],
                          "model": _model_of(cfg, a.overrides.model_name,
                                             a.overrides.model_version, self.settings)}
                         for a in e.arms]}
            if e.canary is not None:
                c = e.canary
                rb = self.rollbacks.get(e.name)
                start = c.start if c.start is not None else cfg.start
                body["canary"] = {"arm": c.arm, "step": c.step_at(now, start),
                                  "steps": list(c.steps), "start": start, "step_s": c.step_s,
                                  "rolled_back": rb is not None,
                                  "reason": rb.reason if rb is not None else None}
            exps.append(body)
        out: dict[str, Any] = {"file_sha256": cfg.experiments.sha256, "experiments": exps}
        if cfg.experiments.shadow is not None:
            s = cfg.experiments.shadow
            out["shadow"] = {"share": s.share, "model": _model_of(
                cfg, s.model_name, s.model_version, self.settings)}
        return out

    # ---- the request path ------------------------------------------------------------------

    def resolve(self, user_id: str, forced: str | None) -> Assignment | None:
        """The request's arm: the forced one (already authorised), else by assignment."""
        exps = self.config.experiments
        if forced is not None:
            return exps.force(forced)  # ForcedArmError for an unknown experiment or arm
        if not exps.experiments:
            return None
        return exps.assign(user_id, self.shares(time.time()) or None)

    def model_for(self, a: Assignment) -> LoadedModel | None:
        """The arm's model when it names one (None: the model being served)."""
        o = a.overrides
        if o.model_name is None and o.model_version is None:
            return None
        return self.config.models.get((o.model_name or self.settings.model_name, o.model_version))

    def shadow_model(self, request_id: str) -> LoadedModel | None:
        """The shadow model if this request is in the shadow's share (by request id)."""
        s = self.config.experiments.shadow
        if s is None or (s.share < 1.0 and unit_hash("shadow", request_id) >= s.share):
            return None
        return self.config.models.get((s.model_name or self.settings.model_name,
                                       s.model_version))

    def record(self, a: Assignment, ok: bool, seconds: float) -> None:
        """One outcome of an assigned request: metrics, and the canary's verdict."""
        forced = "true" if a.forced else "false"
        metrics.ARM_REQUESTS.labels(a.experiment, a.arm, "ok" if ok else "error", forced).inc()
        metrics.ARM_DURATION.labels(a.experiment, a.arm).observe(seconds)
        if a.forced or a.experiment in self.rollbacks:
            return
        exp = self.config.experiments.get(a.experiment)
        if exp is None or exp.canary is None or exp.canary.arm != a.arm:
            return
        c = exp.canary
        key = (a.experiment, a.arm)
        win = self._windows.get(key)
        if win is None:
            win = self._windows[key] = Window(self.settings.canary_window_s)
        now = time.time()
        win.add(now, ok, seconds)
        if ok and now - win.checked < 0.25:  # a p99 over the window at most 4 times a second
            return
        win.checked = now
        why = win.verdict(self.settings.canary_min_requests, c.max_error_ratio, c.max_p99_ms)
        if why is not None:
            self.roll_back(exp, why, "errors" if why.startswith("error") else "latency")

    def roll_back(self, exp: Experiment, why: str, reason: str) -> None:
        """Share 0 for the canary arm, here at once and in every worker through the file."""
        assert exp.canary is not None and self.path is not None
        rb = Rollback(exp.canary.arm, why, time.time())
        self.rollbacks[exp.name] = rb
        metrics.CANARY_ROLLBACKS.labels(exp.name, exp.canary.arm, reason).inc()
        metrics.CANARY_SHARE.labels(exp.name, exp.canary.arm).set(0)
        metrics.ARM_SHARE.labels(exp.name, exp.canary.arm).set(0)
        log.error("canary of experiment %s rolled back: arm %s: %s", exp.name, rb.arm, why)
        try:
            write_rollback(rollback_path(self.path), exp.name, rb,
                           self.config.experiments.sha256)
        except OSError as e:
            log.error("cannot write the rollback file (other workers keep the canary until "
                      "their own window breaches): %s", e)


def canary_shares(e: Experiment, now: float, default_start: float,
                  rolled_back: bool) -> dict[str, float]:
    """The shares of a canaried experiment at `now`."""
    c = e.canary
    assert c is not None
    if not rolled_back:
        return e.shares_at(c.step_at(now, c.start if c.start is not None else default_start))
    others = {a.name: a.share for a in e.arms if a.name != c.arm}
    total = sum(others.values())
    out = {n: (v / total if total > 0 else 1.0 / len(others)) for n, v in others.items()}
    out[c.arm] = 0.0
    return out


def read_rollbacks(path: Path, sha256: str | None) -> dict[str, Rollback]:
    """The rollbacks recorded for the experiments file of this sha256."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    out = {}
    if isinstance(data, dict):
        for exp, rb in data.items():
            if isinstance(rb, dict) and rb.get("sha256") == sha256:
                out[exp] = Rollback(str(rb.get("arm")), str(rb.get("reason")),
                                    float(rb.get("at", 0.0)))
    return out


def write_rollback(path: Path, experiment: str, rb: Rollback, sha256: str | None) -> None:
    """Add one rollback to the file (a temporary file and a rename: readers see all or none)."""
    try:
        data = orjson.loads(path.read_bytes())
        if not isinstance(data, dict):
            data = {}
    except (OSError, orjson.JSONDecodeError):
        data = {}
    data[experiment] = {"arm": rb.arm, "reason": rb.reason, "at": rb.at, "sha256": sha256}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)


def _model_of(cfg: ArmsConfig, name: str | None, version: int | None,
              settings: Settings) -> dict[str, Any] | None:
    if name is None and version is None:
        return None  # the model being served
    m = cfg.models.get((name or settings.model_name, version))
    if m is None:
        return None
    return {"name": m.name, "version": m.version, "memory_bytes": m.memory_bytes,
            "load_seconds": round(m.load_seconds, 4)}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size
