"""Shadow scoring: another model scores a request's candidates after its response is built.

The request path only offers a job to a bounded `asyncio.Queue` (`put_nowait`: a full queue
drops the job and counts it, `ranker_shadow_runs_total{result="dropped"}`); one background
task takes jobs one at a time and runs the shadow model on its own thread, at the lowest CPU
priority (nice 19: Linux schedules threads as tasks, so `setpriority` on the thread's id
lowers that thread only): when the CPU is short the live requests get it, and the shadow's
queue fills and drops instead. On the shared inference executor the shadow's inference took
the primary's p50 at N = 500 up by 7-12 % (docs/benchmarks.md). The shadow gets exactly the
inputs the live model ran on, so it must share the live model's feature schema (a run that
fails on them is counted as "failed"). Per request it observes Kendall's tau-b of the
shadow's and the live final scores over all candidates and the overlap of the two top 10s,
and its final scores go to the served log (`shadow`) with the request's record, which waits
for it.

Tau: `scipy.stats.kendalltau` (O(n log n)) when scipy is importable; the service's base
install has no scipy (it is in the `analysis` extra), so otherwise a numpy tau-b over the n²
pairs, fine for the n <= 1000 candidates a request may have (about 10 ms at 1000, off the
request path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from service import metrics
from service.ranking import combine as combine_scores
from service.registry import LoadedModel

if TYPE_CHECKING:
    from service.pipeline import Ranking, Scoring
    from service.servedlog.writer import Served

log = logging.getLogger("ranker.shadow")

try:  # the analysis extra
    from scipy.stats import kendalltau as _scipy_tau
except ImportError:  # pragma: no cover - depends on the install
    _scipy_tau = None


def tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b of two score vectors (ties handled); nan when one is constant."""
    if len(x) < 2:
        return float("nan")
    if _scipy_tau is not None:
        return float(_scipy_tau(x, y).statistic)
    sx = np.sign(x[:, None] - x[None, :]).astype(np.int8)
    sy = np.sign(y[:, None] - y[None, :]).astype(np.int8)
    s = float(np.sum(sx.astype(np.int32) * sy)) / 2
    n0 = len(x) * (len(x) - 1) / 2
    tx = float(np.count_nonzero(sx == 0) - len(x)) / 2
    ty = float(np.count_nonzero(sy == 0) - len(x)) / 2
    denom = np.sqrt((n0 - tx) * (n0 - ty))
    return s / denom if denom > 0 else float("nan")


def top_overlap(live_order: np.ndarray, shadow_final: np.ndarray, k: int = 10) -> float:
    """The share of the live top k that is in the shadow's top k."""
    k = min(k, len(shadow_final), len(live_order))
    if k == 0:
        return float("nan")
    shadow_top = np.argpartition(-shadow_final, k - 1)[:k]
    return len(set(live_order[:k].tolist()) & set(shadow_top.tolist())) / k


@dataclass
class Job:
    model: LoadedModel
    inputs: dict[str, np.ndarray]
    scoring: Scoring
    ranking: Ranking
    held: Served | None  # the request's served-log record, waiting for the shadow's scores


class ShadowScorer:
    """The bounded queue and its one worker task."""

    def __init__(self, size: int, offer_log: Callable[[Served], None] | None = None,
                 executor: Executor | None = None) -> None:
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="shadow",
                                                       initializer=lowest_priority)
        self._own = executor is None
        self.queue: asyncio.Queue[Job] = asyncio.Queue(size)
        self.offer_log = offer_log
        self._task: asyncio.Task[None] | None = None
        self._dropped = metrics.SHADOW_RUNS.labels("dropped")
        self._scored = metrics.SHADOW_RUNS.labels("scored")
        self._failed = metrics.SHADOW_RUNS.labels("failed")

    def offer(self, job: Job) -> bool:
        """Queue a job, never waiting; a full queue drops it (its log record goes unshadowed)."""
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self._dropped.inc()
            self._log(job.held)
            return False
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="shadow-scorer")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._own and isinstance(self.executor, ThreadPoolExecutor):
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            try:
                shadow = await loop.run_in_executor(self.executor, score, job)
            except Exception as e:  # a shadow that fails must never touch serving
                self._failed.inc()
                log.warning("shadow model %s/%s failed: %s: %s", job.model.name,
                            job.model.version, type(e).__name__, e)
                self._log(job.held)
                continue
            self._scored.inc()
            if job.held is not None:
                self._log(job.held._replace(shadow=shadow))

    def _log(self, held: Served | None) -> None:
        if held is not None and self.offer_log is not None:
            self.offer_log(held)


def lowest_priority() -> None:
    """Nice 19 for the calling thread (Linux: a thread is a task with its own nice value)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def score(job: Job) -> np.ndarray:
    """The shadow's final scores [N] (the live request's weights and formula), with the
    agreement metrics observed."""
    scores, _ = job.model.run(job.inputs)
    tasks = job.model.tasks
    w = np.array([job.scoring.weights.get(t, 0.0) for t in tasks], dtype=np.float64)
    final: np.ndarray = combine_scores(scores, w, job.scoring.formula)
    live: Any = job.ranking.final
    tau = tau_b(np.asarray(live, dtype=np.float64), final.astype(np.float64))
    if np.isfinite(tau):
        metrics.SHADOW_TAU.observe(tau)
    overlap = top_overlap(job.ranking.order, final)
    if np.isfinite(overlap):
        metrics.SHADOW_TOP10.observe(overlap)
    return final
