"""The cluster read path: which master a request goes to, and following the topology.

The writer copies the item records (and both pointers) to every master under that master's
replica tag (`keys.replica_tags`). A request then goes to ONE node, the master owning its user's
key, as the same packed MGET (+ GET of the user) the single-node path sends, on one of that
node's pooled connections: one round trip, one reply to parse, whatever N is.

`ReplicaRouter` keeps the tag of each master in one place, recomputed from the client's slot
map (CLUSTER SLOTS) whenever that map is replaced. A refresh of the map is asked for by the
reader on MOVED, a broken connection, a timeout or CLUSTERDOWN (a failover): one refresh at a
time, at most one per `min_refresh_interval_s`, in a task of its own (a request cut off by its
deadline does not cancel it); the next request waits for a refresh under way, within its own
deadline. Each refresh is counted (`ranker_featurestore_topology_refreshes_total{reason}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import SlotNotCoveredError

from service.featurestore import metrics
from service.featurestore.keys import key_slot, replica_tags

log = logging.getLogger("ranker.featurestore")


class ReplicaRouter:
    """Slot map -> (master, its replica tag) for a key; single-flight topology refreshes."""

    def __init__(self, client: RedisCluster, *, min_refresh_interval_s: float = 0.1) -> None:
        self.client = client
        self.min_refresh_interval_s = min_refresh_interval_s
        self._slots_seen: object = None
        self._tags: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._last = -math.inf

    async def ready(self) -> None:
        """Wait for a refresh under way (shielded: cancelling the caller does not cancel it);
        initialise the client on first use (a no-op afterwards)."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.shield(task)
        await self.client.initialize()

    def route(self, key: bytes) -> tuple[ClusterNode, str | None]:
        """The master owning `key`'s slot and that master's replica tag (None: it has none)."""
        slots = self.client.nodes_manager.slots_cache
        if slots is not self._slots_seen:  # a new map (initialize() builds a new dict)
            self._tags = self.tags_of(slots)
            self._slots_seen = slots
        try:
            node = slots[key_slot(key)][0]
        except (KeyError, IndexError) as exc:
            raise SlotNotCoveredError(f"slot of {key!r} not covered") from exc
        return node, self._tags.get(node.name)

    def tags_of(self, slots: dict[int, list[ClusterNode]]) -> dict[str, str]:
        masters = {nodes[0].name for nodes in slots.values() if nodes}

        def owner(slot: int) -> str | None:
            nodes = slots.get(slot)
            return nodes[0].name if nodes else None

        return replica_tags(owner, masters)

    def refresh(self, reason: str) -> None:
        """Ask for a new slot map (CLUSTER SLOTS); at most one at a time and one per interval."""
        if self._task is not None and not self._task.done():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._last < self.min_refresh_interval_s:
            return
        self._last = now
        metrics.TOPOLOGY_REFRESHES.labels(reason).inc()
        self._task = loop.create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            await self.client.nodes_manager.initialize()
        except Exception as exc:  # no node reachable: the next error asks again
            metrics.TOPOLOGY_REFRESHES.labels("failed").inc()
            log.warning("cluster topology refresh failed: %s", exc)

    async def aclose(self) -> None:
        """Cancel a refresh under way (the client is closed by its owner)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


async def send_on_node(node: ClusterNode, command: bytes, replies: int) -> list[Any]:
    """Send packed commands in one write on one of `node`'s pooled connections; their replies.

    As `reader.send_packed` on a single node: an error reply (MOVED, CLUSTERDOWN, ...) is raised,
    and on any error or cancellation the connection is closed before it goes back, so no reply
    is left half-read on it. The node's pool is bounded (`max_connections`): when every
    connection is busy this raises `MaxConnectionsError` at once.
    """
    conn = node.acquire_connection()
    try:
        return await exchange_packed(conn, command, replies)
    finally:
        node.release(conn)


async def exchange_packed(conn: Any, command: bytes, replies: int) -> list[Any]:
    """Packed commands written on `conn` in one write, then their `replies` replies; on any
    error or cancellation the connection is closed (before the caller gives it back), so no
    reply is left half-read on it."""
    try:
        await conn.send_packed_command(command, check_health=False)
        return [await conn.read_response() for _ in range(replies)]
    except BaseException:
        await conn.disconnect()
        raise
