"""Model lifecycle: load a version, prove it works, warm it up, swap it in with one assignment.

A request takes `registry.current` once and uses that object to the end, so every response
names exactly one version, and a swap never disturbs requests in flight: the old model stays
alive until the last request holding it finishes (plain reference counting).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ranker.manifest import (
    GATES_OUTPUT,
    MODEL_FILE,
    Manifest,
    ManifestError,
    list_versions,
    load_manifest,
    load_schema,
    verify_files,
    version_dir,
)
from ranker.schema import CANDIDATE_ENTITY, DenseFeature, FeatureSchema

log = logging.getLogger("ranker.registry")

ORT_DTYPES = {"int64": "tensor(int64)", "float32": "tensor(float)"}
NP_DTYPES = {"int64": np.int64, "float32": np.float32}


# the checks a version must pass, in order; a refusal names the one it failed (public answers
# show only this name, never the detail, which carries filesystem paths)
CHECKS = ("manifest", "files", "onnx", "signature", "golden", "warmup", "identity")
PIN_FILE = "PINNED"  # models/<name>/PINNED: the version every worker serves, one line


class ModelLoadError(Exception):
    """A model version that failed a check; `check` names which, the message says why."""

    def __init__(self, message: str, check: str = "load") -> None:
        super().__init__(message)
        self.check = check


class NoModelError(ModelLoadError):
    """The repository holds no complete version of the configured model."""


class PinFileError(ValueError):
    """The pin file exists but does not hold a version number."""


@dataclass
class LoadedModel:
    """One checked, warmed version: its manifest, schema and onnxruntime session."""

    manifest: Manifest
    schema: FeatureSchema
    session: ort.InferenceSession
    path: Path
    load_seconds: float = 0.0
    loaded_at: float = field(default_factory=time.time)
    # (batch size, best seconds of one run) at the largest warm-up size; None without warm-up
    timing: tuple[int, float] | None = None
    # resident memory the process grew by over this version's load and warm-up (None where
    # /proc is not there); an estimate: other threads allocate meanwhile
    memory_bytes: int | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest.tasks)

    @property
    def has_gates(self) -> bool:
        return self.manifest.has_gates

    @property
    def output_names(self) -> list[str]:
        return [*self.tasks, *([GATES_OUTPUT] if self.has_gates else [])]

    @cached_property
    def input_names(self) -> tuple[str, ...]:
        """The model's inputs in order (kept: the schema walk is slow for a per-request path)."""
        return tuple(s.name for s in self.schema.input_specs())

    @cached_property
    def candidate_inputs(self) -> frozenset[str]:
        """The inputs with one row per candidate (the others have one row per request)."""
        return frozenset(s.name for s in self.schema.input_specs()
                         if s.entity == CANDIDATE_ENTITY)

    def run(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """One batched call: (per-task scores [N, T] float32, gates [N, T, M] or None)."""
        outs = self.session.run(self.output_names, inputs)
        scores = np.stack(outs[: len(self.tasks)], axis=1)
        gates = outs[len(self.tasks)] if self.has_gates else None
        return scores, gates

    def estimated_run_s(self, n: int) -> float:
        """Seconds one run of n candidates should take, scaled from the warm-up timing (inf if
        the model was not timed): decides whether a request can run inference inline."""
        if self.timing is None:
            return float("inf")
        size, seconds = self.timing
        return seconds * max(n, 1) / size

    @cached_property
    def dense_context(self) -> dict[str, DenseFeature]:
        """The model's dense context features by name (their request values must be numbers)."""
        group = self.schema.group("context")
        return {f.name: f for f in group.dense} if group is not None else {}

    def context_inputs(self, context: dict[str, Any] | None) -> dict[str, np.ndarray]:
        """The request's context features as batch-1 inputs (`FeatureSchema.context_inputs`)."""
        return self.schema.context_inputs(context)

    def synthetic_inputs(self, n: int) -> dict[str, np.ndarray]:
        """Default-valued inputs for n candidates (`FeatureSchema.default_inputs`), for warm-up."""
        return self.schema.default_inputs(n)


def make_session(path: Path, intra_op: int, inter_op: int) -> ort.InferenceSession:
    """A CPU session with bounded threads: request concurrency comes from the executor instead."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op
    opts.inter_op_num_threads = inter_op
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_signature(session: ort.InferenceSession, manifest: Manifest) -> None:
    """The graph's inputs and outputs must be exactly the ones the manifest promises."""
    got_in = [(i.name, i.type) for i in session.get_inputs()]
    want_in = [(s.name, ORT_DTYPES.get(s.dtype, s.dtype)) for s in manifest.inputs]
    if got_in != want_in:
        raise ModelLoadError(f"graph inputs {got_in} != manifest inputs {want_in}", "signature")
    got_out = {o.name for o in session.get_outputs()}
    want_out = {o.name for o in manifest.outputs}
    if got_out != want_out:
        raise ModelLoadError(f"graph outputs {sorted(got_out)} != manifest {sorted(want_out)}",
                             "signature")
    missing = [t for t in manifest.tasks if t not in got_out]
    if missing:
        raise ModelLoadError(f"tasks without an output: {missing}", "signature")


def check_golden(session: ort.InferenceSession, manifest: Manifest) -> float:
    """Run the manifest's golden sample; the worst error must be within its atol."""
    dtypes = {s.name: NP_DTYPES[s.dtype] for s in manifest.inputs}
    try:
        inputs = {k: np.asarray(v, dtype=dtypes[k]) for k, v in manifest.golden.inputs.items()}
        names = list(manifest.golden.outputs)
        got = session.run(names, inputs)
    except Exception as e:  # onnxruntime raises several types for bad feeds
        raise ModelLoadError(f"golden sample does not run: {e}", "golden") from e
    worst = 0.0
    for name, out in zip(names, got, strict=True):
        want = np.asarray(manifest.golden.outputs[name], dtype=np.float64)
        err = float(np.max(np.abs(out - want))) if want.size else 0.0
        if not err <= manifest.golden.atol:  # also catches NaN
            raise ModelLoadError(f"golden output {name!r} off by {err} > {manifest.golden.atol}",
                                 "golden")
        worst = max(worst, err)
    return worst


def load_version(
    path: Path,
    *,
    intra_op: int = 1,
    inter_op: int = 1,
    warmup_sizes: tuple[int, ...] = (1, 100, 500, 1000),
) -> LoadedModel:
    """Load and check one version directory, or raise ModelLoadError saying what is wrong."""
    t0 = time.perf_counter()
    rss0 = rss_bytes()
    check = "manifest"
    try:
        manifest = load_manifest(path)
        check = "files"
        verify_files(path, manifest)
        check = "manifest"
        schema = load_schema(path, manifest)
    except (ManifestError, OSError, ValueError) as e:
        raise ModelLoadError(str(e), check) from e
    try:
        session = make_session(path / MODEL_FILE, intra_op, inter_op)
    except Exception as e:
        raise ModelLoadError(f"{path}: onnxruntime cannot load the model: {e}", "onnx") from e
    check_signature(session, manifest)
    check_golden(session, manifest)
    model = LoadedModel(manifest, schema, session, Path(path))
    warm_up(model, warmup_sizes)
    model.load_seconds = time.perf_counter() - t0
    rss1 = rss_bytes()
    model.memory_bytes = None if rss0 is None or rss1 is None else max(rss1 - rss0, 0)
    return model


def rss_bytes() -> int | None:
    """This process's resident set size (Linux /proc), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def warm_up(model: LoadedModel, sizes: tuple[int, ...]) -> None:
    """Run every warm-up size once, then time the largest; a failure refuses the version.

    First runs allocate arenas and pick kernels: that is kept off requests. A graph can pass
    the golden sample (a few candidates) and still fail at a larger batch (a frozen shape, an
    op out of bounds, memory): onnxruntime raises several exception types for that, all of
    them a refusal here, never an error that escapes the reload.
    """
    n = 0
    try:
        for n in sizes:
            model.run(model.synthetic_inputs(n))
        if sizes:
            n = max(sizes)
            model.timing = time_runs(model, n)
    except Exception as e:  # onnxruntime's Fail/InvalidArgument/RuntimeException, MemoryError
        raise ModelLoadError(f"warm-up at {n} candidates failed: {type(e).__name__}: {e}",
                             "warmup") from e


def time_runs(model: LoadedModel, n: int, repeats: int = 5) -> tuple[int, float]:
    """(n, best seconds of `repeats` runs of a warmed n-candidate batch)."""
    inputs = model.synthetic_inputs(n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.run(inputs)
        best = min(best, time.perf_counter() - t0)
    return n, best


def dir_state(path: Path) -> tuple:
    """(name, size, mtime) of every file in a version directory: changes when anything is edited."""
    try:
        return tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in Path(path).iterdir()
                            if p.is_file() for st in [p.stat()]))
    except OSError:
        return ()


@dataclass
class ReloadResult:
    """What a reload did: "success", "unchanged", "failure" or "pinned", for which version.

    `check` names the check a refused version failed ("" otherwise).
    """

    result: str
    version: int | None
    detail: str = ""
    check: str = ""


@dataclass(frozen=True)
class Refusal:
    """A refused version: the check it failed, why, and the state of its files then."""

    check: str
    detail: str
    files: tuple


@dataclass(frozen=True)
class Pin:
    """The version every worker must serve and where that comes from ("file" or "setting")."""

    version: int
    source: str


def read_pin(path: Path) -> int | None:
    """The version in a pin file; None if there is no file; PinFileError if it is not one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PinFileError(f"pin file unreadable: {e.strerror}") from e
    text = text.strip()
    if not text.isdigit() or not 0 <= int(text) < 2**31:
        raise PinFileError(f"pin file holds {text[:20]!r}, not a version number")
    return int(text)


def write_pin(path: Path, version: int) -> None:
    """Write the pin file through a temporary file and a rename (readers see all or nothing)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{version}\n")
    os.replace(tmp, path)


SwapHook = Callable[["LoadedModel | None", "LoadedModel"], None]  # (old, new) after a swap
FailureHook = Callable[[int, str], None]  # (version, why) after a refusal


class ModelRegistry:
    """Holds the serving model of one name; loads newer versions and swaps them in atomically.

    The version to serve is the pinned one when a pin exists (the pin file
    `<repo>/<name>/PINNED`, written by `pin()`, else the `pinned` argument, i.e. the
    `RANKER_MODEL_VERSION` setting), otherwise the newest complete version. Every worker
    process has its own registry and reads the same pin file, so a pin reaches all of them.

    `on_swap(old, new)` runs after a swap, `on_failure(version, why)` after a refusal.
    """

    def __init__(
        self,
        repo: Path,
        name: str,
        *,
        intra_op: int = 1,
        inter_op: int = 1,
        warmup_sizes: tuple[int, ...] = (1, 100, 500, 1000),
        pinned: int | None = None,
        on_swap: SwapHook | None = None,
        on_failure: FailureHook | None = None,
    ) -> None:
        self.repo = Path(repo)
        self.name = name
        self.pin_path = self.repo / name / PIN_FILE
        self.pinned_setting = pinned
        self._load_kwargs = {
            "intra_op": intra_op,
            "inter_op": inter_op,
            "warmup_sizes": tuple(warmup_sizes),
        }
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()  # one load at a time; serving never takes it
        # versions refused, with the state of their files then: a watcher retries one only
        # when its files changed (e.g. a hand copy that was incomplete at the first look)
        self._failed: dict[int, Refusal] = {}
        self._on_swap = on_swap
        self._on_failure = on_failure
        # versions an experiments file names besides the current one: (name, version) -> model
        self._extra: dict[tuple[str, int], LoadedModel] = {}

    def close(self) -> None:
        """Stop serving: drop the current model (its session goes with the last reference)."""
        self._current = None  # no lock: a load still running in a thread must not block this
        self._extra = {}

    # -- several versions at once (experiment arms, the shadow) -------------------------------

    def catalog_versions(self) -> dict[str, list[int]]:
        """Every model name in the repository and its complete versions."""
        names = [p.name for p in self.repo.iterdir() if p.is_dir()] if self.repo.is_dir() else []
        return {n: list_versions(self.repo, n) for n in sorted(names)}

    @property
    def extra(self) -> dict[tuple[str, int], LoadedModel]:
        """The versions loaded for experiments, besides the current one."""
        return dict(self._extra)

    def ensure(self, wanted: set[tuple[str, int | None]]
               ) -> dict[tuple[str, int | None], LoadedModel]:
        """Load, check and warm every (name, version) in `wanted` (None: the name's newest),
        keep them, drop the extra versions no longer wanted; the current model is reused.
        ModelLoadError names the first that fails (nothing is dropped then)."""
        with self._lock:
            cur = self._current
            out: dict[tuple[str, int | None], LoadedModel] = {}
            keep: dict[tuple[str, int], LoadedModel] = {}
            for name, version in sorted(wanted, key=lambda p: (p[0], p[1] or 0)):
                v = version
                if v is None:
                    versions = list_versions(self.repo, name)
                    if not versions:
                        raise ModelLoadError(f"no complete version of {name!r}", "manifest")
                    v = versions[-1]
                if cur is not None and (cur.name, cur.version) == (name, v):
                    out[name, version] = cur
                    continue
                model = keep.get((name, v)) or self._extra.get((name, v))
                if model is None:
                    model = load_version(version_dir(self.repo, name, v), **self._load_kwargs)  # type: ignore[arg-type]
                    if (model.name, model.version) != (name, v):
                        raise ModelLoadError(f"manifest says {model.name}/{model.version}, "
                                             f"expected {name}/{v}", "identity")
                    log.info("experiments: loaded model %s version %s (%.2fs, %s bytes)",
                             name, v, model.load_seconds, model.memory_bytes)
                keep[name, v] = model
                out[name, version] = model
            self._extra = keep
            return out

    @property
    def current(self) -> LoadedModel | None:
        """The serving model; take it once per request and keep the reference."""
        return self._current

    @property
    def failed_versions(self) -> dict[int, str]:
        return {v: r.detail for v, r in self._failed.items()}

    def refused(self) -> dict[int, str]:
        """Refused versions still in the repository and the check each failed."""
        present = set(list_versions(self.repo, self.name))
        return {v: r.check for v, r in sorted(self._failed.items()) if v in present}

    def newest_version(self) -> int | None:
        versions = list_versions(self.repo, self.name)
        return versions[-1] if versions else None

    def pin(self) -> Pin | None:
        """The pin in force: the pin file, else the setting, else None (PinFileError if the
        file is unreadable: then nobody can tell what to serve, and nothing moves)."""
        from_file = read_pin(self.pin_path)
        if from_file is not None:
            return Pin(from_file, "file")
        if self.pinned_setting is not None:
            return Pin(self.pinned_setting, "setting")
        return None

    def target_version(self) -> int | None:
        """The version this process should serve: the pinned one, else the newest."""
        pin = self.pin()
        return pin.version if pin is not None else self.newest_version()

    def fallback(self) -> bool:
        """Serving an older version because every newer one was refused (and nothing pins)."""
        cur = self._current
        if cur is None or self.pin() is not None:
            return False
        return any(v > cur.version for v in self.refused())

    def reload(self, version: int | None = None, *, retry_failed: bool = True) -> ReloadResult:
        """Load `version` (default: the pinned, else the newest) unless it is already serving;
        swap on success. While a pin is in force, another explicit version is refused
        ("pinned"): the pin would undo it at the next poll."""
        with self._lock:
            pin = self.pin()
            if version is not None and pin is not None and version != pin.version:
                cur = self._current
                return ReloadResult("pinned", cur.version if cur else None,
                                    f"pinned to version {pin.version} ({pin.source}); "
                                    "unpin first")
            target = version if version is not None else (
                pin.version if pin is not None else self.newest_version())
            return self._reload(target, retry_failed)

    def load_initial(self, *, retry_failed: bool = True) -> ReloadResult:
        """Start-up: the pinned version, else the newest version that passes every check.

        Newer versions refused on the way are remembered (a watcher does not retry them until
        their files change) and make `fallback()` true. A pinned version that is refused is
        not replaced by another: the process starts unready and says why.
        """
        with self._lock:
            pin = self.pin()
            if pin is not None:
                return self._reload(pin.version, retry_failed)
            versions = list_versions(self.repo, self.name)
            if not versions:
                raise NoModelError(f"no complete version of {self.name!r} under {self.repo}")
            first: ReloadResult | None = None
            for v in reversed(versions):
                res = self._reload(v, retry_failed)
                if self._current is not None:
                    if v != versions[-1]:
                        log.warning("model %s: serving version %s, newer versions refused: %s",
                                    self.name, v, self.refused())
                    return res
                first = first or res
            assert first is not None
            return first

    def set_pin(self, version: int) -> ReloadResult:
        """Pin `version`: load and check it here, then write the pin file every worker reads.

        A version that is not complete or fails a check is not pinned (the file is untouched);
        neither is one whose pin file cannot be written (a read-only repository).
        """
        with self._lock:
            cur = self._current
            if version not in list_versions(self.repo, self.name):
                return ReloadResult("failure", version,
                                    f"no complete version {version} of {self.name!r}",
                                    "manifest")
            model: LoadedModel | None = None
            if cur is None or cur.version != version:
                loaded = self._load(version)
                if isinstance(loaded, ReloadResult):
                    return loaded
                model = loaded
            try:
                write_pin(self.pin_path, version)
            except OSError as e:
                return ReloadResult("failure", version,
                                    f"cannot write the pin file: {e.strerror}", "pin")
            if model is not None:
                self._swap(model)
            log.info("model %s pinned to version %s", self.name, version)
            return ReloadResult("success", version, f"pinned to version {version}")

    def clear_pin(self) -> ReloadResult:
        """Remove the pin file, then serve what is in force without it (the setting's pin,
        else the newest version)."""
        with self._lock:
            try:
                self.pin_path.unlink(missing_ok=True)
            except OSError as e:
                cur = self._current
                return ReloadResult("failure", cur.version if cur else None,
                                    f"cannot remove the pin file: {e.strerror}", "pin")
            log.info("model %s unpinned", self.name)
            pin = self.pin()
            target = pin.version if pin is not None else self.newest_version()
            return self._reload(target, False)

    # -- under the lock ---------------------------------------------------------------------

    def _reload(self, target: int | None, retry_failed: bool) -> ReloadResult:
        cur = self._current
        if target is None:
            detail = f"no complete version of {self.name!r} under {self.repo}"
            if cur is None:
                raise NoModelError(detail)
            return ReloadResult("unchanged", cur.version, detail)
        if cur is not None and cur.version == target:
            return ReloadResult("unchanged", target, "already serving")
        refused = self._failed.get(target)
        path = version_dir(self.repo, self.name, target)
        if not retry_failed and refused is not None and refused.files == dir_state(path):
            return ReloadResult("unchanged", cur.version if cur else None, "refused before",
                                refused.check)
        loaded = self._load(target)
        if isinstance(loaded, ReloadResult):
            return loaded
        self._swap(loaded)
        return ReloadResult("success", target, f"loaded in {loaded.load_seconds:.3f}s")

    def _load(self, target: int) -> LoadedModel | ReloadResult:
        """The checked, warmed model of `target`, or the failure (remembered, reported)."""
        path = version_dir(self.repo, self.name, target)
        try:
            model = load_version(path, **self._load_kwargs)  # type: ignore[arg-type]
            if model.name != self.name or model.version != target:
                raise ModelLoadError(
                    f"{path}: manifest says {model.name}/{model.version}, expected "
                    f"{self.name}/{target}", "identity")
        except ModelLoadError as e:
            self._failed[target] = Refusal(e.check, str(e), dir_state(path))
            log.error("model %s version %s refused (%s): %s", self.name, target, e.check, e)
            if self._on_failure is not None:
                self._on_failure(target, str(e))
            return ReloadResult("failure", target, str(e), e.check)
        return model

    def _swap(self, model: LoadedModel) -> None:
        old = self._current
        self._current = model  # the swap: one reference assignment
        self._failed.pop(model.version, None)
        log.info("serving model %s version %s (loaded in %.2fs)", self.name, model.version,
                 model.load_seconds)
        if self._on_swap is not None:
            self._on_swap(old, model)
