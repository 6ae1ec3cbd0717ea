"""Model lifecycle: load a version, prove it works, warm it up, swap it in with one assignment.

A request takes `registry.current` once and uses that object to the end, so every response
names exactly one version, and a swap never disturbs requests in flight: the old model stays
alive until the last request holding it finishes (plain reference counting).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from ranker.schema import FeatureSchema

log = logging.getLogger("ranker.registry")

ORT_DTYPES = {"int64": "tensor(int64)", "float32": "tensor(float)"}
NP_DTYPES = {"int64": np.int64, "float32": np.float32}


class ModelLoadError(Exception):
    """A model version that failed a check; the message says which and why."""


class NoModelError(ModelLoadError):
    """The repository holds no complete version of the configured model."""


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
        raise ModelLoadError(f"graph inputs {got_in} != manifest inputs {want_in}")
    got_out = {o.name for o in session.get_outputs()}
    want_out = {o.name for o in manifest.outputs}
    if got_out != want_out:
        raise ModelLoadError(f"graph outputs {sorted(got_out)} != manifest {sorted(want_out)}")
    missing = [t for t in manifest.tasks if t not in got_out]
    if missing:
        raise ModelLoadError(f"tasks without an output: {missing}")


def check_golden(session: ort.InferenceSession, manifest: Manifest) -> float:
    """Run the manifest's golden sample; the worst error must be within its atol."""
    dtypes = {s.name: NP_DTYPES[s.dtype] for s in manifest.inputs}
    try:
        inputs = {k: np.asarray(v, dtype=dtypes[k]) for k, v in manifest.golden.inputs.items()}
        names = list(manifest.golden.outputs)
        got = session.run(names, inputs)
    except Exception as e:  # onnxruntime raises several types for bad feeds
        raise ModelLoadError(f"golden sample does not run: {e}") from e
    worst = 0.0
    for name, out in zip(names, got, strict=True):
        want = np.asarray(manifest.golden.outputs[name], dtype=np.float64)
        err = float(np.max(np.abs(out - want))) if want.size else 0.0
        if not err <= manifest.golden.atol:  # also catches NaN
            raise ModelLoadError(f"golden output {name!r} off by {err} > {manifest.golden.atol}")
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
    try:
        manifest = load_manifest(path)
        verify_files(path, manifest)
        schema = load_schema(path, manifest)
    except (ManifestError, OSError, ValueError) as e:
        raise ModelLoadError(str(e)) from e
    try:
        session = make_session(path / MODEL_FILE, intra_op, inter_op)
    except Exception as e:
        raise ModelLoadError(f"{path}: onnxruntime cannot load the model: {e}") from e
    check_signature(session, manifest)
    check_golden(session, manifest)
    model = LoadedModel(manifest, schema, session, Path(path))
    for n in warmup_sizes:  # first runs allocate arenas and pick kernels: keep that off requests
        model.run(model.synthetic_inputs(n))
    if warmup_sizes:
        model.timing = time_runs(model, max(warmup_sizes))
    model.load_seconds = time.perf_counter() - t0
    return model


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
    """What a reload did: "success", "unchanged" or "failure", and for which version."""

    result: str
    version: int | None
    detail: str = ""


SwapHook = Callable[["LoadedModel | None", "LoadedModel"], None]  # (old, new) after a swap
FailureHook = Callable[[int, str], None]  # (version, why) after a refusal


class ModelRegistry:
    """Holds the serving model of one name; loads newer versions and swaps them in atomically.

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
        on_swap: SwapHook | None = None,
        on_failure: FailureHook | None = None,
    ) -> None:
        self.repo = Path(repo)
        self.name = name
        self._load_kwargs = {
            "intra_op": intra_op,
            "inter_op": inter_op,
            "warmup_sizes": tuple(warmup_sizes),
        }
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()  # one load at a time; serving never takes it
        # versions refused, with the state of their files then: a watcher retries one only
        # when its files changed (e.g. a hand copy that was incomplete at the first look)
        self._failed: dict[int, tuple[str, tuple]] = {}
        self._on_swap = on_swap
        self._on_failure = on_failure

    def close(self) -> None:
        """Stop serving: drop the current model (its session goes with the last reference)."""
        self._current = None  # no lock: a load still running in a thread must not block this

    @property
    def current(self) -> LoadedModel | None:
        """The serving model; take it once per request and keep the reference."""
        return self._current

    @property
    def failed_versions(self) -> dict[int, str]:
        return {v: why for v, (why, _) in self._failed.items()}

    def newest_version(self) -> int | None:
        versions = list_versions(self.repo, self.name)
        return versions[-1] if versions else None

    def reload(self, version: int | None = None, *, retry_failed: bool = True) -> ReloadResult:
        """Load `version` (default: the newest) unless it is already serving; swap on success."""
        with self._lock:
            target = version if version is not None else self.newest_version()
            if target is None:
                detail = f"no complete version of {self.name!r} under {self.repo}"
                if self._current is None:
                    raise NoModelError(detail)
                return ReloadResult("unchanged", self._current.version, detail)
            cur = self._current
            if cur is not None and cur.version == target:
                return ReloadResult("unchanged", target, "already serving")
            path = version_dir(self.repo, self.name, target)
            refused = self._failed.get(target)
            if not retry_failed and refused is not None and refused[1] == dir_state(path):
                return ReloadResult("unchanged", cur.version if cur else None, "refused before")
            try:
                model = load_version(path, **self._load_kwargs)  # type: ignore[arg-type]
                if model.name != self.name or model.version != target:
                    raise ModelLoadError(
                        f"{path}: manifest says {model.name}/{model.version}, expected "
                        f"{self.name}/{target}"
                    )
            except ModelLoadError as e:
                self._failed[target] = (str(e), dir_state(path))
                log.error("model %s version %s refused: %s", self.name, target, e)
                if self._on_failure is not None:
                    self._on_failure(target, str(e))
                return ReloadResult("failure", target, str(e))
            old = self._current
            self._current = model  # the swap: one reference assignment
            self._failed.pop(target, None)
            log.info("serving model %s version %s (loaded in %.2fs)", self.name, target,
                     model.load_seconds)
            if self._on_swap is not None:
                self._on_swap(old, model)
            return ReloadResult("success", target, f"loaded in {model.load_seconds:.3f}s")
