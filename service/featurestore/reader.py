"""The hot-path reader: a user and all N candidates in one round trip, decoded straight to arrays.

One MGET (on a cluster: one pipeline of per-slot MGETs per node, the nodes concurrently) brings
back the user's record, every candidate's record and the schema's load pointer. The records are
fixed-size packed binary (`GroupSchema.record_dtype()`), so decoding is one `b"".join` and one
`np.frombuffer` per group; missing, stale and malformed records are swapped for the group's
default record, vectorised; so is a record whose list ids fall outside their vocabulary (a
foreign or corrupt writer), since the graph would gather out of range. The entities' load
pointers ride along in the same MGET, so a request knows whether it read the current loads;
only the first request after a switch reads again, under the new load, within its deadline
(no background task, no stale read).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MaxConnectionsError,
    MovedError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from ranker.schema import FeatureSchema, GroupSchema
from service.featurestore import metrics
from service.featurestore.cluster import ReplicaRouter, exchange_packed, send_on_node
from service.featurestore.keys import (
    DEFAULT_PREFIX,
    ENTITY_CODES,
    pointer_key,
    record_key_prefix,
    replica_pointer_key,
    replica_record_prefix,
    seen_key,
)

T = TypeVar("T")
log = logging.getLogger("ranker.featurestore")
# Worth another attempt within the deadline: the connection broke or the cluster is resharding
# (RedisClusterException, not a RedisError: no node reachable for the slot map, a slot not
# covered during a failover).
_RETRYABLE = (ConnectionError, RedisTimeoutError, ClusterDownError, RedisClusterException)


class FeatureStoreUnavailable(Exception):
    """Redis is down, timed out or the cluster is down; the message says which.

    `timed_out` tells the two apart for callers (a timeout is reported as `redis_timeout`,
    anything else as `redis_unavailable`).
    """

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass
class FetchResult:
    """Model inputs of the user and item groups, and what had to be defaulted."""

    inputs: dict[str, np.ndarray]
    user_defaulted: bool
    items_defaulted: int
    item_defaulted_mask: np.ndarray
    stale: int
    # the members of the user's seen set as Redis gave them (bytes); None unless asked for
    seen: Collection[bytes] | None = None


def make_client(
    url: str,
    *,
    cluster: bool = False,
    max_connections: int = 32,
    connect_timeout_s: float = 0.05,
    socket_timeout_s: float = 0.1,
    password: str | None = None,
) -> aredis.Redis | RedisCluster:
    """A `redis.asyncio` client: hiredis parser, bounded pool, ms timeouts, no client retries.

    Retries are the FeatureStore's job (within each request's deadline), so the client's own
    retry is off. `max_connections` bounds the pool (per node on a cluster); a request waits at
    most `socket_timeout_s` for a free connection, then fails.

    A `redis+sentinel://host:port[,host:port...]/<service>[/<db>]` URL gives a client of the
    primary that Sentinel names: its pool asks the sentinels for the primary's address whenever
    it opens a connection, so after a failover the next connections go to the promoted replica
    (`password` is the data nodes'; the sentinels are asked without one). Its pool does not
    wait for a free connection: beyond `max_connections` a request fails at once.
    """
    extra: dict[str, Any] = {} if password is None else {"password": password}
    if url.startswith(SENTINEL_SCHEME):
        sentinels, service, db = parse_sentinel_url(url)
        timeouts: dict[str, Any] = {"socket_connect_timeout": connect_timeout_s,
                                    "socket_timeout": socket_timeout_s}
        manager = Sentinel(sentinels, sentinel_kwargs=dict(timeouts))
        return manager.master_for(service, db=db, max_connections=max_connections,
                                  retry=aredis.retry.Retry(NoBackoff(), 0), **timeouts, **extra)
    if cluster:
        return RedisCluster.from_url(
            url,
            max_connections=max_connections,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=aredis.retry.Retry(NoBackoff(), 0),
            **extra,
        )
    pool = aredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=socket_timeout_s,
        retry=aredis.retry.Retry(NoBackoff(), 0),
        **extra,
    )
    return aredis.Redis(connection_pool=pool)


async def close_client(client: aredis.Redis | RedisCluster) -> None:
    """Close a client from `make_client` and every connection of its pool, cluster included.

    A `Redis` built on an explicit pool does not own it, so its own `aclose()` leaves the
    pool's connections open; here the pool is disconnected too. A `RedisCluster` closes the
    connections of every node it knows.
    """
    if isinstance(client, RedisCluster):
        await client.aclose()
        return
    pool = client.connection_pool
    await client.aclose(close_connection_pool=True)
    if isinstance(pool, SentinelConnectionPool):  # and the connections to the sentinels
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


SENTINEL_SCHEME = "redis+sentinel://"


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """`redis+sentinel://h1:p1,h2:p2/<service>[/<db>]` -> (sentinels, service name, db)."""
    rest = url.removeprefix(SENTINEL_SCHEME)
    hosts, _, path = rest.partition("/")
    hosts = hosts.rpartition("@")[2]  # a password is passed separately (`password=`)
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        raise ValueError(f"a Sentinel URL is redis+sentinel://host:port[,...]/<service>: {url!r}")
    sentinels = []
    for hp in hosts.split(","):
        host, colon, port = hp.rpartition(":")
        sentinels.append((host, int(port)) if colon else (hp, 26379))
    return sentinels, parts[0], int(parts[1]) if len(parts) > 1 else 0


@dataclass(frozen=True)
class _LoadView:
    """The loads a reader reads: the pointers' raw values and the record key prefix of each
    entity (None: nothing loaded for it, so its keys are not even asked for)."""

    pointers: list[bytes | None]
    user_prefix: str | None
    item_prefix: str | None


@dataclass(frozen=True)
class _GroupCodec:
    """Precomputed decoding state of one entity group."""

    group: GroupSchema
    dtype: np.dtype
    default_bytes: bytes
    default_cat: np.ndarray
    default_dense: np.ndarray
    list_bounds: np.ndarray  # [list_width]: an index at or above its column's bound is corrupt

    @classmethod
    def of(cls, group: GroupSchema) -> _GroupCodec:
        dtype = group.record_dtype()
        cat, dense = group.default_row()
        rec = np.zeros(1, dtype)
        rec["written_at"] = np.inf  # never stale: the default is used only where flagged
        rec["cat"] = cat
        rec["dense"] = dense
        if group.lists:
            rec["list"] = group.default_lists()  # a missing user's history: all padding
        return cls(group, dtype, rec.tobytes(), cat.astype(np.int64), dense, group.list_bounds())

    def decode(
        self, values: Sequence[bytes | None], now: float, max_age_s: float | None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
        """Raw values -> (the group's model inputs: cat int64 [n,k], dense f32 [n,d] and, with
        lists, list int64 [n,w]; defaulted bool [n]; stale count)."""
        n, size, default = len(values), self.dtype.itemsize, self.default_bytes
        missing = [v is None for v in values]
        parts: list[bytes] = [default if m else v for v, m in zip(values, missing, strict=True)]  # type: ignore[misc]
        joined = b"".join(parts)
        corrupt = 0
        # Rare: a value of the wrong size (corrupt, foreign writer): find and default it. Only the
        # total length is checked on the hot path; two bad values whose sizes cancel out exactly
        # would slip through, an accepted risk for skipping a len() per value.
        if len(joined) != n * size:
            bad = [len(p) != size for p in parts]
            corrupt = sum(bad)
            missing = [m or b for m, b in zip(missing, bad, strict=True)]
            joined = b"".join([default if b else p for p, b in zip(parts, bad, strict=True)])
        rec = np.frombuffer(joined, self.dtype, count=n)
        defaulted = np.fromiter(missing, dtype=bool, count=n)
        replace = None  # rows whose record is used no further: stale, or lists out of range
        stale = 0
        if max_age_s is not None and n:
            replace = (now - rec["written_at"]) > max_age_s
            stale = int(replace.sum())
            defaulted |= replace
        lists = None
        if self.group.lists:
            lists = rec["list"].astype(np.int64)  # (n, w) contiguous
            # an index outside its vocabulary would make the graph's gather fail (or, worse,
            # read another row): such a record is corrupt and defaulted, never ranked with
            if n and (lists.min() < 0 or (lists >= self.list_bounds).any()):
                bad_rows = ((lists < 0) | (lists >= self.list_bounds)).any(axis=1) & ~defaulted
                corrupt += int(bad_rows.sum())
                defaulted |= bad_rows
                replace = bad_rows if replace is None else replace | bad_rows
        cat = rec["cat"].astype(np.int64)  # a contiguous copy, as onnxruntime wants
        dense = np.array(rec["dense"], dtype=np.float32, order="C")
        if replace is not None and replace.any():
            cat[replace] = self.default_cat
            dense[replace] = self.default_dense
            if lists is not None:
                lists[replace] = self.group.default_lists()
        entity = self.group.entity
        absent = int(defaulted.sum()) - stale - corrupt
        for reason, count in (("missing", absent), ("stale", stale), ("corrupt", corrupt)):
            if count:
                metrics.DEFAULTED.labels(entity, reason).inc(count)
        return self.group.inputs(cat, dense, lists), defaulted, stale


class FeatureStore:
    """Reads user and candidate features of one schema from Redis (single node or cluster)."""

    def __init__(
        self,
        client: aredis.Redis | RedisCluster,
        schema: FeatureSchema,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_age_s: float | None = None,
        max_retries: int = 1,
        cluster_layout: str = "replicated",
        copy_check_interval_s: float = 1.0,
    ) -> None:
        """`cluster_layout` (a cluster only): "replicated" reads each request from one master,
        the one owning the user's key, and its copy of the items (falling back to the sharded
        layout where a copy is missing); "sharded" always reads the sharded layout with
        `mget_nonatomic` (per-slot MGETs on every node). `copy_check_interval_s`: how often
        (per master) a request also reads the global pointers to check the master's copies."""
        if cluster_layout not in ("replicated", "sharded"):
            raise ValueError(f"cluster_layout: replicated or sharded, not {cluster_layout!r}")
        self.client = client
        self.schema = schema
        self.prefix = prefix
        self.max_age_s = max_age_s
        self.max_retries = max_retries
        self.cluster = isinstance(client, RedisCluster)
        self._version = schema.version  # a hash of the schema: compute it once, not per request
        self._user = _maybe_codec(schema.group("user"))
        self._item = _maybe_codec(schema.group("item"))
        # one pointer per entity the schema has, in this order at the head of every MGET
        self._entities = [e for e in ENTITY_CODES if schema.group(e) is not None]
        self._pointers = [pointer_key(prefix, self._version, e) for e in self._entities]
        self._view = _LoadView([None] * len(self._entities), None, None)
        self._router = (ReplicaRouter(client) if isinstance(client, RedisCluster)
                        and cluster_layout == "replicated" else None)
        self._item_index = self._entities.index("item") if "item" in self._entities else None
        # (node, tag, copy pointers with a None) found equal to the global pointers: nothing
        # loaded for that entity, so the copy is not missing and needs no second read
        self._verified: set[tuple[str, str, tuple[bytes | None, ...]]] = set()
        # (node, tag, copy pointers) found to differ from the global pointers: read sharded
        self._stale: set[tuple[str, str, tuple[bytes | None, ...]]] = set()
        self._copies_checked: dict[str, float] = {}  # node -> event-loop time of its last check
        self.copy_check_interval_s = copy_check_interval_s

    @property
    def load_ids(self) -> dict[str, str | None]:
        """The load this reader currently reads, per entity (None until one was found)."""
        return {e: None if p is None else p.decode()
                for e, p in zip(self._entities, self._view.pointers, strict=True)}

    async def fetch(
        self, user_id: str, item_ids: Sequence[str], *, timeout_s: float | None = None,
        seen: bool = False,
    ) -> FetchResult:
        """Features of one user and N candidates in one round trip; missing/stale -> defaults.

        The MGET carries the pointers; if they name other loads than the keys were built for
        (a load switched since this reader's last request, or this is its first), the keys'
        load may have expired (an idle reader), so the request reads again under the loads the
        pointers name. That second round trip happens once per switch, within the deadline.

        With `seen`, an SMEMBERS of the user's seen set (`seen_key`) goes in the same write as
        the MGET (one round trip; on a cluster concurrently with it), and `seen` holds its
        members (the re-rank filter, `service.rerank.filter_candidates`, matches them against
        the candidates in the same pass as the request's excluded ids). SMEMBERS, not
        SMISMEMBER of the N candidates: packing N more arguments costs about as much as the
        MGET's own packing (docs/benchmarks.md); the reply is the whole set, so its writer
        keeps it bounded.
        """
        start = time.perf_counter()
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        view = self._view
        raw = await self._call(lambda: self._mget(view, user_id, item_ids, seen),
                               deadline, timeout_s)
        k = len(self._pointers)
        if raw[:k] != view.pointers:
            view = self._adopt(raw[:k])
            raw = await self._call(lambda: self._mget(view, user_id, item_ids, seen),
                                   deadline, timeout_s)
            if raw[:k] != view.pointers:
                # Switched again in between: these values are of the loads that were live a
                # moment ago (kept for the grace period); the next request reads the newer ones.
                self._adopt(raw[:k])
        members = None
        if seen:
            members, raw = raw[-1], raw[:-1]
        values = raw[k:]
        user_value = None
        if view.user_prefix is not None:
            user_value, values = values[0], values[1:]
        n = len(item_ids)
        item_values = values if view.item_prefix is not None else [None] * n
        result = self._decode(user_value, item_values)
        result.seen = members
        metrics.FETCH_SECONDS.observe(time.perf_counter() - start)
        return result

    def _adopt(self, pointers: list[bytes | None]) -> _LoadView:
        """Read under the loads these pointer values name, from now on."""
        prefixes: dict[str, str | None] = {"user": None, "item": None}
        for entity, raw in zip(self._entities, pointers, strict=True):
            if raw is not None:
                prefixes[entity] = record_key_prefix(self.prefix, self._version, raw.decode(),
                                                     entity)
        self._view = _LoadView(list(pointers), prefixes["user"], prefixes["item"])
        return self._view

    async def _mget(self, view: _LoadView, user_id: str, item_ids: Sequence[str],
                    seen: bool = False) -> list[Any]:
        """MGET of the pointers, the user's key and the items' keys (those of loaded entities);
        with `seen`, the SMEMBERS reply of the user's seen set is appended as the last value."""
        head = list(self._pointers)
        if view.user_prefix is not None:
            head.append(view.user_prefix + str(user_id))
        prefix, ids = view.item_prefix or "", item_ids if view.item_prefix is not None else ()
        if self._router is not None:
            return await self._mget_replicated(view, user_id, ids, seen)
        if self.cluster:  # the seen set is in another slot: sent concurrently (one round trip)
            return await self._mget_sharded(view, user_id, item_ids, seen)
        command = pack_mget(head, prefix, ids)
        if not seen:
            return await mget_packed(self.client, command)  # type: ignore[arg-type]
        command += pack_mget([seen_key(self.prefix, user_id)], name=b"SMEMBERS")
        values, member = await send_packed(self.client, command, 2)  # type: ignore[arg-type]
        return [*values, member]

    async def _mget_sharded(self, view: _LoadView, user_id: str, item_ids: Sequence[str],
                            seen: bool) -> list[Any]:
        """The sharded layout on a cluster: `mget_nonatomic` (per-slot MGETs, per node in one
        pipeline, the nodes concurrently) of the global pointers and the records."""
        head = list(self._pointers)
        if view.user_prefix is not None:
            head.append(view.user_prefix + str(user_id))
        prefix, ids = view.item_prefix or "", item_ids if view.item_prefix is not None else ()
        keys = [*head, *[prefix + str(i) for i in ids]]
        client: RedisCluster = self.client  # type: ignore[assignment]
        if seen:
            values, member = await asyncio.gather(
                client.mget_nonatomic(keys), client.smembers(seen_key(self.prefix, user_id)))
            return [*values, member]
        return list(await client.mget_nonatomic(keys))

    async def _mget_replicated(self, view: _LoadView, user_id: str, ids: Sequence[str],
                               seen: bool) -> list[Any]:
        """The replicated layout: ONE master, the owner of the user's key, answers the packed
        `MGET <its pointer copies> <its item copies>` and `GET <user>` in one round trip; the
        reply has the shape of the single-node MGET's. Where that master has no copy (a missing
        pointer copy whose global pointer exists, a master with no tag, a slot moving), the
        request reads the sharded layout instead, counted in `cluster_fallbacks_total`."""
        router = self._router
        assert router is not None
        await router.ready()
        user_key = None if view.user_prefix is None else view.user_prefix + str(user_id)
        try:
            node, tag = router.route((user_key or str(user_id)).encode())
        except RedisClusterException:  # a slot without a master (mid-failover)
            router.refresh("connection")
            raise
        if tag is None:
            router.refresh("no_tag")
            metrics.CLUSTER_FALLBACKS.labels("no_tag").inc()
            return await self._mget_sharded(view, user_id, ids, seen)
        k = len(self._pointers)
        head = [replica_pointer_key(self.prefix, self._version, tag, e) for e in self._entities]
        item_prefix = ""
        if ids:
            load = view.pointers[self._item_index]  # type: ignore[index]
            item_prefix = replica_record_prefix(self.prefix, self._version, load.decode(), tag)  # type: ignore[union-attr]
        command = pack_mget(head, item_prefix, ids)
        replies = 1
        if user_key is not None:
            command += pack_mget([user_key], name=b"GET")
            replies = 2
        # Once per `copy_check_interval_s` per master, the global pointers ride along (another
        # node, concurrently): copies that name other loads than they do (a load by a writer
        # without copies, a manual roll-back of the global pointers, a promoted replica that lost
        # the last switch) are read through the sharded layout from then on, counted.
        loop_now = asyncio.get_running_loop().time()
        check = loop_now - self._copies_checked.get(node.name, -math.inf) \
            >= self.copy_check_interval_s
        if check:
            self._copies_checked[node.name] = loop_now
        calls: list[Awaitable[Any]] = [send_on_node(node, command, replies)]
        if seen:
            calls.append(self.client.smembers(seen_key(self.prefix, user_id)))
        if check:
            calls.append(self._global_pointers())
        try:
            got = await asyncio.gather(*calls)
            out, member = got[0], got[1] if seen else None
        except MovedError:  # the slot map changed: refresh it; this request reads sharded
            router.refresh("moved")
            metrics.CLUSTER_FALLBACKS.labels("moved").inc()
            return await self._mget_sharded(view, user_id, ids, seen)
        except (AskError, TryAgainError):  # a slot being migrated
            metrics.CLUSTER_FALLBACKS.labels("migrating").inc()
            return await self._mget_sharded(view, user_id, ids, seen)
        except MaxConnectionsError:
            raise
        except (ConnectionError, RedisTimeoutError, ClusterDownError,
                RedisClusterException) as exc:
            # a dead master or a failover: a new slot map names the promoted replica
            router.refresh("cluster_down" if isinstance(exc, ClusterDownError)
                           else "timeout" if isinstance(exc, RedisTimeoutError) else "connection")
            raise
        values = list(out[0])
        pointers = values[:k]
        key = (node.name, tag, tuple(pointers))
        if check and got[-1] is not None:
            if list(got[-1]) != pointers and None in pointers:
                self._verified.discard(key)  # "nothing loaded" no longer: verified again below
            elif list(got[-1]) != pointers:
                if key not in self._stale:
                    log.warning("cluster: master %s's copies of the pointers %s differ from the "
                                "pointers %s; reading the sharded layout there", node.name,
                                pointers, list(got[-1]))
                if len(self._stale) > 256:
                    self._stale.clear()
                self._stale.add(key)
            else:
                self._stale.discard(key)
        if key in self._stale:
            metrics.CLUSTER_FALLBACKS.labels("copy_stale").inc()
            return await self._mget_sharded(view, user_id, ids, seen)
        if None in pointers and key not in self._verified:
            sharded = await self._mget_sharded(view, user_id, ids, seen)
            if sharded[:k] == pointers:  # nothing loaded for that entity: no copy to miss
                if len(self._verified) > 256:
                    self._verified.clear()
                self._verified.add(key)
            else:
                metrics.CLUSTER_FALLBACKS.labels("copy_missing").inc()
                log.warning("cluster: master %s has no copy of the pointers %s; read the "
                            "sharded layout (re-run the load to write the copies)",
                            node.name, sharded[:k])
            return sharded
        if user_key is not None:
            values.insert(k, out[1])
        if seen:
            values.append(member)
        return values

    async def _global_pointers(self) -> list[Any] | None:
        """The global pointers (one slot: one MGET), or None if they could not be read (the
        check is skipped; the request does not fail for it)."""
        try:
            return list(await self.client.mget_nonatomic(self._pointers))  # type: ignore[union-attr]
        except RedisError:
            return None

    def _decode(self, user_value: bytes | None, item_values: Sequence[bytes | None]) -> FetchResult:
        now = time.time()
        inputs: dict[str, np.ndarray] = {}
        user_defaulted, stale = False, 0  # a schema without user features defaults nothing
        if self._user is not None:
            user_inputs, defaulted, user_stale = self._user.decode([user_value], now,
                                                                   self.max_age_s)
            inputs.update(user_inputs)
            user_defaulted, stale = bool(defaulted[0]), user_stale
        mask = np.ones(len(item_values), dtype=bool)
        if self._item is not None:
            item_inputs, mask, item_stale = self._item.decode(item_values, now, self.max_age_s)
            inputs.update(item_inputs)
            stale += item_stale
        return FetchResult(inputs, user_defaulted, int(mask.sum()), mask, stale)

    async def _call(
        self, op: Callable[[], Awaitable[T]], deadline: float | None, timeout_s: float | None
    ) -> T:
        """Run one Redis operation; retry broken connections only while the deadline allows."""
        attempt = 0
        while True:
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if remaining is not None and remaining <= 0:
                metrics.ERRORS.labels("timeout").inc()
                raise FeatureStoreUnavailable(
                    f"Redis: deadline of {_ms(timeout_s)} passed after {attempt} attempt(s)",
                    timed_out=True,
                )
            try:
                async with asyncio.timeout(remaining):
                    return await op()
            except TimeoutError as exc:  # the request's deadline, not a socket timeout
                metrics.ERRORS.labels("timeout").inc()
                raise FeatureStoreUnavailable(
                    f"Redis did not answer within the request deadline of {_ms(timeout_s)}",
                    timed_out=True,
                ) from exc
            except _RETRYABLE as exc:
                attempt += 1
                if attempt > self.max_retries:
                    kind = "timeout" if isinstance(exc, RedisTimeoutError) else "connection"
                    metrics.ERRORS.labels(kind).inc()
                    what = "cluster down" if isinstance(exc, ClusterDownError) else kind
                    raise FeatureStoreUnavailable(
                        f"Redis {what} after {attempt} attempt(s): {exc}",
                        timed_out=kind == "timeout",
                    ) from exc
                metrics.RETRIES.inc()
            except RedisError as exc:
                metrics.ERRORS.labels("error").inc()
                raise FeatureStoreUnavailable(f"Redis error: {exc}") from exc

    async def ping(self, timeout_s: float = 0.25) -> bool:
        """True if Redis answers PING within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                return bool(await self.client.ping())
        except (TimeoutError, RedisError, RedisClusterException, OSError):
            return False

    async def stop(self) -> None:
        """Cancel this view's own background work (a cluster topology refresh under way); the
        client, shared with the other views, stays open."""
        if self._router is not None:
            await self._router.aclose()

    async def aclose(self) -> None:
        """Stop, then close the client and its connection pool (see `close_client`)."""
        await self.stop()
        await close_client(self.client)


def pack_mget(head: Sequence[str], prefix: str = "", ids: Sequence[str] = (),
              name: bytes = b"MGET") -> bytes:
    """The RESP encoding of `MGET head... prefix+id...`, built without a string per key.

    redis-py packs each argument through its generic encoder, which for the 502 keys of a
    500-candidate request is most of the client's CPU cost of the round trip. Here the ids are
    encoded in one call and joined with a per-length header (`$<len>` and the shared prefix),
    so the Python work per id is one dict lookup. `name` packs another command of the same
    shape (SMEMBERS key).
    """
    raw = "\x00".join(ids).encode().split(b"\x00") if ids else []
    if len(raw) != len(ids):  # an id containing NUL: encode one by one
        raw = [i.encode() for i in ids]
    pre = prefix.encode()
    lengths = [len(r) for r in raw]
    header = {n: b"\r\n$%d\r\n%b" % (len(pre) + n, pre) for n in set(lengths)}
    parts: list[bytes] = [b""] * (2 * len(raw))
    parts[0::2] = [header[n] for n in lengths]
    parts[1::2] = raw
    head_raw = [k.encode() for k in head]
    return b"".join([b"*%d\r\n$%d\r\n%b" % (1 + len(head_raw) + len(raw), len(name), name),
                     *[b"\r\n$%d\r\n%b" % (len(k), k) for k in head_raw],
                     *parts, b"\r\n"])


async def mget_packed(client: aredis.Redis, command: bytes) -> list[Any]:
    """Send one packed MGET on a pooled connection of a single-node client; its reply.

    Uses the connection's public send/read API (an error reply is raised as `ResponseError`).
    An error or a cancellation mid-command can leave a half-read reply, so the connection is
    closed before it goes back to the pool.
    """
    (reply,) = await send_packed(client, command, 1)
    return list(reply)


async def send_packed(client: aredis.Redis, command: bytes, replies: int) -> list[Any]:
    """Send packed commands in one write on a pooled connection; their `replies` replies.

    As `mget_packed`: one network round trip; on an error reply (raised as `ResponseError`)
    or a cancellation the connection is closed, so no reply is left half-read on it.
    """
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        return await exchange_packed(conn, command, replies)
    finally:
        await pool.release(conn)


def _maybe_codec(group: GroupSchema | None) -> _GroupCodec | None:
    return None if group is None else _GroupCodec.of(group)


def _ms(timeout_s: float | None) -> str:
    return "none" if timeout_s is None else f"{timeout_s * 1000:.1f} ms"
