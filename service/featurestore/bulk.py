"""The loader's write loop: packed records in batches, each batch with its progress marker.

A batch is one command built as bytes (no per-key call into redis-py's encoder): on a single
node an `MSET` of the batch's records and of the load's progress key (rows of the source
done), or, with a TTL, `SET ... EX` per record and the progress key inside one `MULTI/EXEC`.
Either way Redis applies a batch and its progress marker together or not at all, so a load
killed at any moment resumes exactly after its last applied batch: nothing lost, nothing
written twice. Up to `window` batches are in flight on one connection (the next batch is
packed while Redis applies the previous one).

On a cluster the batch's keys span slots: its records are grouped by the master that owns
each key's slot, and each master gets its group as packed `SET`s on its own connection (all
groups are sent before any reply is read, so the masters apply them at once). A `MOVED` or
`ASK` reply (slots migrating) or a lost connection refreshes the slot map and rewrites the
batch through the cluster client's pipeline, which follows redirections and retries. The
progress key is set after the batch's replies: a kill between the two rewrites that one batch
on resume (the same values: idempotent, but not exactly once).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

SyncClient = redis.Redis | RedisCluster


Ids: TypeAlias = Sequence[str] | pa.Array


def pack_records(key_prefix: str, ids: Ids, blob: bytes, size: int, ttl_s: int | None,
                 progress: tuple[str, int] | None = None, *, sets: bool = False
                 ) -> tuple[bytes, int]:
    """The RESP bytes of one batch and how many replies it gets.

    `blob` is the batch's records back to back (`size` bytes each), `ids` the entities' ids in
    the same order (a pyarrow string array is packed without a Python object per id);
    `progress` = (key, value) rides in the same atomic command. `sets`: one `SET` per record
    even without a TTL (keys of several slots, on a cluster master), never with `progress`."""
    if sets:
        assert progress is None, "per-record SETs carry no progress marker"
        arr = ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())
        return _pack_arrow(key_prefix, arr, blob, size, ttl_s, None, sets=True)
    if isinstance(ids, pa.Array):
        return _pack_arrow(key_prefix, ids, blob, size, ttl_s, progress)
    raw = "\x00".join(ids).encode().split(b"\x00") if ids else []
    if len(raw) != len(ids):  # an id containing NUL: encode one by one
        raw = [i.encode() for i in ids]
    n = len(raw)
    pre = key_prefix.encode()
    lengths = [len(r) for r in raw]
    values = [blob[i * size : (i + 1) * size] for i in range(n)]
    val_head = b"\r\n$%d\r\n" % size
    if ttl_s is None:
        key_head = {k: b"\r\n$%d\r\n%b" % (len(pre) + k, pre) for k in set(lengths)}
        parts: list[bytes] = [b""] * (4 * n)
        parts[0::4] = [key_head[k] for k in lengths]
        parts[1::4] = raw
        parts[2::4] = [val_head] * n
        parts[3::4] = values
        tail = b""
        if progress is not None:
            pk, pv = progress[0].encode(), str(progress[1]).encode()
            tail = b"\r\n$%d\r\n%b\r\n$%d\r\n%b" % (len(pk), pk, len(pv), pv)
        args = 1 + 2 * n + (2 if progress is not None else 0)
        return b"".join([b"*%d\r\n$4\r\nMSET" % args, *parts, tail, b"\r\n"]), 1
    ex = str(int(ttl_s)).encode()
    ex_tail = b"\r\n$2\r\nEX\r\n$%d\r\n%b\r\n" % (len(ex), ex)
    key_head = {k: b"*5\r\n$3\r\nSET\r\n$%d\r\n%b" % (len(pre) + k, pre) for k in set(lengths)}
    parts = [b""] * (5 * n)
    parts[0::5] = [key_head[k] for k in lengths]
    parts[1::5] = raw
    parts[2::5] = [val_head] * n
    parts[3::5] = values
    parts[4::5] = [ex_tail] * n
    head, tail = b"", b""
    replies = n
    if progress is not None:  # the batch and its marker in one transaction
        pk, pv = progress[0].encode(), str(progress[1]).encode()
        head = b"*1\r\n$5\r\nMULTI\r\n"
        tail = (b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(pk), pk, len(pv), pv)
                + b"*1\r\n$4\r\nEXEC\r\n")
        replies = n + 3  # OK, n + 1 QUEUED, the EXEC array
    return b"".join([head, *parts, tail]), replies


def _progress_resp(progress: tuple[str, int]) -> tuple[bytes, bytes]:
    pk, pv = progress[0].encode(), str(progress[1]).encode()
    return pk, pv


def _pack_arrow(key_prefix: str, ids: pa.Array, blob: bytes, size: int, ttl_s: int | None,
                progress: tuple[str, int] | None, sets: bool = False) -> tuple[bytes, int]:
    """`pack_records` with numpy: the records are grouped by id length (an MSET's pairs, and
    a transaction's SETs, may come in any order: the ids are distinct) and each group's
    commands are one (rows, width) byte matrix filled column block by column block."""
    if not pa.types.is_string(ids.type):
        ids = ids.cast(pa.string())
    n = len(ids)
    offsets = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset : ids.offset + n + 1]
    data = ids.buffers()[2]
    chars = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    values = np.frombuffer(blob, np.uint8, n * size).reshape(n, size)
    pre = key_prefix.encode()
    mid = np.frombuffer(b"\r\n$%d\r\n" % size, np.uint8)
    mset = ttl_s is None and not sets
    if mset:
        tail = np.zeros(0, np.uint8)
        head_of = lambda k: b"\r\n$%d\r\n%b" % (len(pre) + k, pre)  # noqa: E731
    elif ttl_s is None:  # SET key value
        tail = np.frombuffer(b"\r\n", np.uint8)
        head_of = lambda k: b"*3\r\n$3\r\nSET\r\n$%d\r\n%b" % (len(pre) + k, pre)  # noqa: E731
    else:
        ex = str(int(ttl_s)).encode()
        tail = np.frombuffer(b"\r\n$2\r\nEX\r\n$%d\r\n%b\r\n" % (len(ex), ex), np.uint8)
        head_of = lambda k: b"*5\r\n$3\r\nSET\r\n$%d\r\n%b" % (len(pre) + k, pre)  # noqa: E731
    blocks: list[bytes] = []
    for k in np.flatnonzero(np.bincount(lengths)).tolist():  # (np.unique: 3x slower here)
        rows = np.nonzero(lengths == k)[0]  # (m,)
        head = np.frombuffer(head_of(k), np.uint8)
        widths = [len(head), k, len(mid), size, len(tail)]
        out = np.empty((len(rows), sum(widths)), np.uint8)
        a = len(head)
        out[:, :a] = head
        out[:, a : a + k] = chars[offsets[rows][:, None] + np.arange(k)]  # (m, k) the ids
        out[:, a + k : a + k + len(mid)] = mid
        b = a + k + len(mid)
        out[:, b : b + size] = values[rows]
        out[:, b + size :] = tail
        blocks.append(out.tobytes())
    body = b"".join(blocks)
    if mset:
        tail_b = b""
        if progress is not None:
            pk, pv = _progress_resp(progress)
            tail_b = b"\r\n$%d\r\n%b\r\n$%d\r\n%b" % (len(pk), pk, len(pv), pv)
        args = 1 + 2 * n + (2 if progress is not None else 0)
        return b"".join([b"*%d\r\n$4\r\nMSET" % args, body, tail_b, b"\r\n"]), 1
    if progress is None:
        return body, n
    pk, pv = _progress_resp(progress)
    return (b"*1\r\n$5\r\nMULTI\r\n" + body
            + b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(pk), pk, len(pv), pv)
            + b"*1\r\n$4\r\nEXEC\r\n"), n + 3


class BatchWriter:
    """Sends packed batches on one connection, `window` of them in flight; `close()` waits for
    every reply (an error reply is raised there or at the next `write`)."""

    def __init__(self, client: SyncClient, ttl_s: int | None, window: int = 2) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.window = max(1, window)
        self.cluster = isinstance(client, RedisCluster)
        self._pending: deque[int] = deque()  # replies owed per batch in flight
        self._conn: Any = None
        self._pool: Any = None
        if isinstance(client, redis.Redis):
            self._pool = client.connection_pool
            self._conn = self._pool.get_connection()

    def write(self, key_prefix: str, ids: Ids, blob: bytes, size: int,
              progress: tuple[str, int] | None = None) -> None:
        if self.cluster:
            names: list[str] = ids.to_pylist() if isinstance(ids, pa.Array) else list(ids)
            keys = [(key_prefix + entity_id).encode() for entity_id in names]
            try:
                self._write_by_node(keys, names, key_prefix, blob, size)
            except (redis.ResponseError, redis.ConnectionError, redis.TimeoutError):
                # slots moving or a master lost: the pipeline follows MOVED/ASK and retries
                assert isinstance(self.client, RedisCluster)
                self.client.nodes_manager.initialize()
                self._write_pipelined(keys, blob, size)
            if progress is not None:
                self.client.set(progress[0], progress[1])
            return
        command, replies = pack_records(key_prefix, ids, blob, size, self.ttl_s, progress)
        try:
            self._conn.send_packed_command([command], check_health=False)
            self._pending.append(replies)
            while len(self._pending) > self.window:
                self._read_one()
        except BaseException:
            self._drop()
            raise

    def _write_by_node(self, keys: list[bytes], ids: list[str], key_prefix: str, blob: bytes,
                       size: int) -> None:
        """Each master's records as packed SETs (`pack_records(sets=True)`) on its connection:
        every group sent, then every reply read (an error reply raises after all replies are
        read, so no connection is left with unread replies; a lost connection is closed)."""
        assert isinstance(self.client, RedisCluster)
        nodes = self.client.nodes_manager
        rows: dict[str, tuple[Any, list[int]]] = {}
        for row, key in enumerate(keys):
            node = nodes.get_node_from_slot(key_slot(key))
            group = rows.get(node.name)
            if group is None:
                group = rows[node.name] = (node, [])
            group[1].append(row)
        records = np.frombuffer(blob, np.uint8, len(keys) * size).reshape(len(keys), size)
        commands = [(node, pack_records(key_prefix, [ids[r] for r in at],
                                        records[at].tobytes(), size, self.ttl_s, sets=True))
                    for node, at in rows.values()]
        sent: list[tuple[Any, Any, int]] = []
        try:
            for node, (command, replies) in commands:
                pool = self.client.get_redis_connection(node).connection_pool
                conn = pool.get_connection()
                sent.append((pool, conn, replies))
                conn.send_packed_command([command], check_health=False)
            error: redis.ResponseError | None = None
            for _, conn, replies in sent:
                for _ in range(replies):
                    try:
                        conn.read_response()
                    except redis.ResponseError as e:  # MOVED / ASK: read on, then raise
                        error = error or e
            if error is not None:
                raise error
        except (redis.ConnectionError, redis.TimeoutError):
            for _, conn, _ in sent:
                conn.disconnect()  # replies may be half read
            raise
        finally:
            for pool, conn, _ in sent:
                pool.release(conn)

    def _write_pipelined(self, keys: list[bytes], blob: bytes, size: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for row, key in enumerate(keys):
            pipe.set(key, blob[row * size : (row + 1) * size], ex=self.ttl_s)
        pipe.execute()

    def _read_one(self) -> None:
        for _ in range(self._pending.popleft()):
            self._conn.read_response()  # an error reply raises ResponseError

    def close(self) -> None:
        """Wait for every batch in flight; give the connection back."""
        if self._conn is None:
            return
        try:
            while self._pending:
                self._read_one()
        except BaseException:
            self._drop()
            raise
        self._pool.release(self._conn)
        self._conn = None

    def _drop(self) -> None:
        """After an error a reply may be half read: the connection is closed, not reused."""
        if self._conn is not None:
            self._conn.disconnect()
            self._pool.release(self._conn)
            self._conn = None
            self._pending.clear()
