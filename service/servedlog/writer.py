"""The served log's service side: the request path offers, one background task writes.

`/rank` calls `ServedLog.served(...)` once per response: it counts the impressions by model
version, remembers request id -> version (for feedback rates) and, for a sampled request, puts
a reference tuple (`Served`: the arrays the pipeline already holds, nothing copied) in a bounded
`asyncio.Queue` with `put_nowait`. It never awaits and never raises: a full queue drops the
record and counts it. `/feedback` offers its validated events the same way.

The writer task (`ServedLog.run`, started and flushed by the lifespan) builds each
`ranker.servedlog.ServedRecord` off the request path (the returned items' rows of the model
inputs, in served order), encodes it and XADDs batches of entries, one round trip per
batch (`pack_xadd`: one packed write), `MAXLEN ~ log_stream_maxlen`. A failed batch is
retried a bounded number of times, then dropped and counted; while Redis is down the queue
fills and further entries are dropped as `redis_unavailable`. Memory stays bounded by the
queue size throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

import numpy as np
import redis.asyncio as aredis
from redis.exceptions import RedisError

from ranker.servedlog import (
    FeedbackEvent,
    ServedRecord,
    encode_feedback,
    encode_served,
    feedback_stream,
    served_stream,
)
from service import metrics
from service.featurestore.reader import close_client, make_client
from service.registry import LoadedModel
from service.settings import Settings

if TYPE_CHECKING:
    from service.pipeline import Ranking, Scoring
    from service.schemas import RankRequest
    from service.state import RedisClient

log = logging.getLogger("ranker.servedlog")

SERVED, FEEDBACK = "served", "feedback"
# after the first entry of a batch, wait this long for more: at low load one Redis round trip
# then carries several records instead of one per request (measured: docs/benchmarks.md)
LINGER_S = 0.02
# the writer's work waits for a moment with no /rank in the pipeline (`wake`), so that it falls
# between requests rather than inside one; at most this long, and never with the queue over
# half full: under sustained load it then works alongside the requests
DEFER_MAX_S = 0.1
WRITE_ATTEMPTS = 3  # per batch; then the batch is dropped as redis_unavailable
RETRY_BACKOFF_S = 0.05  # doubled after each failed attempt
UNKNOWN_VERSION = "unknown"
V = TypeVar("V")


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request is logged: a stable hash of its id below `rate` (same on every
    worker and every run; Python's own `hash` is salted per process)."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2.0**64


class RecentVersions(Generic[V]):
    """Request id -> model version (or arm) of the most recently served requests, at most
    `size` (the oldest is forgotten first), so a feedback event can be attributed to it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._map: OrderedDict[str, V] = OrderedDict()

    def add(self, request_id: str, version: V) -> None:
        m = self._map
        m[request_id] = version
        if len(m) > self.size:
            m.popitem(last=False)

    def get(self, request_id: str) -> V | None:
        return self._map.get(request_id)

    def __len__(self) -> int:
        return len(self._map)


class Served(NamedTuple):
    """What the request path hands over: references only; the record is built by the writer."""

    ts: float
    request_id: str
    req: RankRequest
    model: LoadedModel
    scoring: Scoring
    ranking: Ranking
    inputs: Mapping[str, np.ndarray]  # exactly the arrays the model ran on
    experiment: str | None = None  # the experiment and arm the request was served by
    arm: str | None = None
    forced: bool = False  # the arm was forced (QA header): the report leaves it out
    shadow: np.ndarray | None = None  # the shadow model's final scores [N], candidate order


Entry = tuple[str, Any]  # (SERVED, Served) | (FEEDBACK, list[FeedbackEvent])
Command = tuple[str, str, dict[Any, Any]]  # (stream kind, stream key, XADD fields: bytes -> bytes)


def served_record(ref: Served) -> ServedRecord:
    """The log record of one response: returned items in served order, their per-task and
    final scores, and the model inputs as served (item rows of the returned items, in served
    order; user and context rows once)."""
    model, ranking = ref.model, ref.ranking
    order = ranking.order
    per_item = model.candidate_inputs
    inputs = {name: ref.inputs[name][order] if name in per_item else ref.inputs[name]
              for name in model.input_names}
    positions = order.tolist()
    ids = ref.req.candidates
    # itemgetter picks in C (a list comprehension is most of the record's cost at 500 items)
    item_ids: list[str] = (list(itemgetter(*positions)(ids)) if len(positions) > 1
                           else [ids[p] for p in positions])
    return ServedRecord(
        ts=ref.ts, request_id=ref.request_id, user_id=ref.req.user_id, model_name=model.name,
        model_version=model.version, scoring=ref.scoring.formula,
        weights=dict(ref.scoring.weights), context=dict(ref.req.context or {}),
        tasks=tuple(model.manifest.tasks), item_ids=item_ids,
        scores=ranking.scores[order], final=ranking.final[order], inputs=inputs,
        experiment=ref.experiment, arm=ref.arm, forced=ref.forced,
        shadow=None if ref.shadow is None else ref.shadow[order],
        propensity=ranking.propensity,
    )


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(b), b)


def pack_xadd(key: str, maxlen: int, fields: dict[bytes, bytes]) -> bytes:
    """The RESP encoding of `XADD key MAXLEN ~ maxlen * field value ...`.

    redis-py's pipeline packs and parses each command through its generic machinery, which
    for a 500-item record costs more than building the record (docs/benchmarks.md); the
    values are large bytes, so packing them here is one join.
    """
    parts = [b"*%d\r\n$4\r\nXADD\r\n" % (6 + 2 * len(fields)), _bulk(key.encode()),
             b"$6\r\nMAXLEN\r\n$1\r\n~\r\n", _bulk(str(maxlen).encode()), b"$1\r\n*\r\n"]
    for k, v in fields.items():
        parts += [b"$%d\r\n" % len(k), k, b"\r\n$%d\r\n" % len(v), v, b"\r\n"]
    return b"".join(parts)


async def xadd_packed(client: aredis.Redis, commands: Sequence[bytes]) -> None:
    """Send packed XADDs in one write on a pooled connection and read every reply.

    As `service.featurestore.reader.mget_packed`: an error reply raises `ResponseError`, and a
    connection left with unread replies (an error or a cancellation mid-batch) is closed
    before it goes back to the pool.
    """
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command(b"".join(commands), check_health=False)
        for _ in commands:
            await conn.read_response()
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


def make_log_client(settings: Settings) -> RedisClient | None:
    """The writer's own small Redis client (same server as the feature store), so its batches
    have their own timeout and never hold a connection the request path waits for."""
    if not settings.redis_url:
        return None
    return make_client(
        settings.redis_url, cluster=settings.redis_cluster, max_connections=2,
        connect_timeout_s=settings.redis_connect_timeout_s,
        socket_timeout_s=settings.log_write_timeout_s, password=settings.redis_password,
    )


def chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


class ServedLog:
    """The bounded queue between the request path and the writer task, and the online-rate
    bookkeeping (impressions by version, recently served request ids)."""

    def __init__(self, settings: Settings, client: RedisClient | None,
                 busy: Callable[[], bool] = lambda: False) -> None:
        self.rate = settings.log_sample_rate
        self.busy = busy  # whether requests are being ranked right now
        self.client = client
        self.batch_size = settings.log_batch_size
        self.maxlen = settings.log_stream_maxlen
        self.timeout_s = settings.log_write_timeout_s
        self.streams = {SERVED: served_stream(settings.redis_prefix),
                        FEEDBACK: feedback_stream(settings.redis_prefix)}
        self.queue: asyncio.Queue[Entry] = asyncio.Queue(settings.log_queue_size)
        self.versions: RecentVersions[int] = RecentVersions(settings.feedback_recent_requests)
        self.arms: RecentVersions[tuple[str, str]] = RecentVersions(
            settings.feedback_recent_requests)
        self.down = False  # the last write failed: a full queue is then Redis's fault
        self.closing = False
        self._task: asyncio.Task[None] | None = None
        self._idle: asyncio.Future[None] | None = None  # set by `wake`
        self._impressions: dict[int, Any] = {}  # label children, looked up once per version
        self._dropped: dict[tuple[str, str], Any] = {}
        self._pending: dict[str, int] = {}  # entries of the batch in hand not yet settled

    # ---- the request path: never awaits, never raises ------------------------------------

    def served(self, request_id: str, req: RankRequest, model: LoadedModel, scoring: Scoring,
               ranking: Ranking, inputs: Mapping[str, np.ndarray],
               arm: tuple[str, str, bool] | None = None, hold: bool = False) -> Served | None:
        """One /rank response: count its impressions, remember its version (and arm), offer it
        to the log if its request id is sampled. `arm` is (experiment, arm, forced). With
        `hold` a sampled record is returned instead of offered (the shadow adds its scores,
        then `offer_served`)."""
        version = model.version
        child = self._impressions.get(version)
        if child is None:
            child = self._impressions[version] = metrics.IMPRESSIONS.labels(str(version))
        k = len(ranking.order)
        child.inc(k)
        self.versions.add(request_id, version)
        if arm is not None:
            metrics.ARM_IMPRESSIONS.labels(arm[0], arm[1]).inc(k)
            if not arm[2]:
                self.arms.add(request_id, (arm[0], arm[1]))
        if self.rate and sampled(request_id, self.rate):
            exp, name, forced = arm if arm is not None else (None, None, False)
            ref = Served(time.time(), request_id, req, model, scoring, ranking, inputs, exp,
                         name, forced)
            if hold:
                return ref
            self._offer(SERVED, ref, 1)
        return None

    def offer_served(self, ref: Served) -> None:
        """Offer a record `served(..., hold=True)` returned."""
        self._offer(SERVED, ref, 1)

    def arm_of(self, request_id: str) -> tuple[str, str] | None:
        """The (experiment, arm) a recent request was served by (not forced ones), or None."""
        return self.arms.get(request_id)

    def feedback(self, events: list[FeedbackEvent]) -> bool:
        """Offer validated events to the feedback stream; False if they were dropped."""
        return self._offer(FEEDBACK, events, len(events))

    def version_of(self, request_id: str) -> str:
        """The served version of a recent request as a label value, or "unknown"."""
        v = self.versions.get(request_id)
        return UNKNOWN_VERSION if v is None else str(v)

    def _offer(self, stream: str, payload: Any, n: int) -> bool:
        if self.client is None:
            self.drop(stream, "no_redis", n)
            return False
        if self.closing:
            self.drop(stream, "shutdown", n)
            return False
        try:
            self.queue.put_nowait((stream, payload))
        except asyncio.QueueFull:
            self.drop(stream, "redis_unavailable" if self.down else "queue_full", n)
            metrics.LOG_QUEUE_DEPTH.set(self.queue.qsize())
            return False
        return True

    def drop(self, stream: str, reason: str, n: int) -> None:
        child = self._dropped.get((stream, reason))
        if child is None:
            child = self._dropped[stream, reason] = metrics.LOG_DROPPED.labels(stream, reason)
        child.inc(n)

    # ---- the writer task -----------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer task (none without Redis: every offer is then dropped, counted)."""
        if self.client is not None and self._task is None:
            self._task = asyncio.create_task(self.run(), name="served-log-writer")

    async def run(self) -> None:
        """Forever: take a batch from the queue, encode it, write it (bounded retries)."""
        q = self.queue
        while True:
            batch = [await q.get()]
            if not self.closing and q.qsize() < self.batch_size - 1:
                await asyncio.sleep(LINGER_S)
            await self.wait_idle()
            while len(batch) < self.batch_size and not q.empty():
                batch.append(q.get_nowait())
            metrics.LOG_QUEUE_DEPTH.set(q.qsize())
            self._pending = {}
            for stream, payload in batch:
                n = 1 if stream == SERVED else len(payload)
                self._pending[stream] = self._pending.get(stream, 0) + n
            try:
                await self.write(batch)
            except asyncio.CancelledError:  # shutdown cut the flush short: count what is left
                self._drop_pending("shutdown")
                raise
            except Exception:  # a bug must not stop the writer (then every entry would drop)
                log.exception("served log writer: batch failed")
                self._drop_pending("error")
            finally:
                for _ in batch:
                    q.task_done()

    async def wait_idle(self) -> None:
        """Until no request is being ranked (`wake`), for at most `DEFER_MAX_S`, and not at all
        while the queue is over half full or the service is shutting down."""
        if not self.busy() or self.closing or self.queue.qsize() >= self.queue.maxsize // 2:
            return
        self._idle = asyncio.get_running_loop().create_future()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DEFER_MAX_S):
                    await self._idle
        finally:
            self._idle = None

    def wake(self) -> None:
        """The pipeline has no request in flight: a waiting writer may work now."""
        idle = self._idle
        if idle is not None and not idle.done():
            idle.set_result(None)

    def _drop_pending(self, reason: str) -> None:
        for stream, n in self._pending.items():
            if n:
                self.drop(stream, reason, n)
        self._pending = {}

    def settle(self, stream: str, n: int, dropped: str | None) -> None:
        """n entries of the batch in hand are written (dropped=None) or dropped for a reason."""
        self._pending[stream] = self._pending.get(stream, 0) - n
        if dropped is None:
            metrics.LOG_WRITTEN.labels(stream).inc(n)
        else:
            self.drop(stream, dropped, n)

    async def write(self, batch: list[Entry]) -> None:
        """Encode the entries (yielding to the event loop between records) and XADD them,
        `log_batch_size` commands per round trip."""
        commands: list[Command] = []
        for stream, payload in batch:
            key = self.streams[stream]
            if stream == SERVED:
                try:
                    commands.append((stream, key, encode_served(served_record(payload))))
                except Exception:  # a bug here must not stop the writer; it is logged
                    log.exception("could not encode a served record")
                    self.settle(stream, 1, "error")
                await asyncio.sleep(0)  # let arrived requests in between records
                await self.wait_idle()
            else:
                commands += [(stream, key, encode_feedback(ev)) for ev in payload]
        for chunk in chunks(commands, self.batch_size):
            await self.send(chunk)

    async def send(self, chunk: Sequence[Command]) -> None:
        """One round trip of XADDs (one packed write; a pipeline on a cluster); retried
        `WRITE_ATTEMPTS` times, then dropped and counted."""
        assert self.client is not None
        counts: dict[str, int] = {}
        for stream, _, _ in chunk:
            counts[stream] = counts.get(stream, 0) + 1
        single = isinstance(self.client, aredis.Redis)
        packed = [pack_xadd(key, self.maxlen, fields) for _, key, fields in chunk] if single else []
        for attempt in range(WRITE_ATTEMPTS):
            try:
                async with asyncio.timeout(self.timeout_s):
                    if single:
                        await xadd_packed(self.client, packed)  # type: ignore[arg-type]
                    else:  # a cluster: the streams may live on different nodes
                        pipe = self.client.pipeline(transaction=False)
                        for _, key, fields in chunk:
                            pipe.xadd(key, fields, maxlen=self.maxlen, approximate=True)
                        await pipe.execute()
            except (RedisError, OSError, TimeoutError) as e:
                if not self.down:
                    log.warning("served log: Redis write failed (%s); dropping and counting "
                                "entries until it is back", type(e).__name__)
                self.down = True
                if attempt + 1 < WRITE_ATTEMPTS:
                    await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
                continue
            if self.down:
                log.warning("served log: Redis writes work again")
            self.down = False
            for stream, n in counts.items():
                self.settle(stream, n, None)
            return
        for stream, n in counts.items():
            self.settle(stream, n, "redis_unavailable")

    async def aclose(self, timeout_s: float) -> None:
        """Flush what is queued within `timeout_s`, then stop the task and close the client;
        whatever is left is dropped as "shutdown" (counted)."""
        self.closing = True
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self.queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self.queue.empty():
            stream, payload = self.queue.get_nowait()
            self.drop(stream, "shutdown", 1 if stream == SERVED else len(payload))
        metrics.LOG_QUEUE_DEPTH.set(0)
        if self.client is not None:
            with contextlib.suppress(RedisError, OSError):
                await close_client(self.client)
