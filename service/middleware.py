"""Pure ASGI middleware: request id + request metrics + overload guard, and the body-size limit.

Pure ASGI (not BaseHTTPMiddleware) so they add no task or stream wrapping to the hot path, and
so the body limit is enforced while the body is read, for chunked bodies too.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics

REQUEST_ID_HEADER = b"x-request-id"
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,64}$")


async def send_json(send: Send, status: int, body: dict, headers: Iterable[tuple[bytes, bytes]]
                    = ()) -> None:
    """Send a whole JSON response from inside middleware."""
    payload = orjson.dumps(body)
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": payload})


def request_id_from(scope: Scope) -> str:
    """The client's X-Request-ID if it is short and plain, else a fresh one."""
    for k, v in scope.get("headers", ()):
        if k == REQUEST_ID_HEADER and _SANE_ID.match(v):
            return str(v.decode())
    return uuid.uuid4().hex


def matched_template(scope: Scope) -> str:
    """The template of the route the router matched (e.g. "/playground/{name}"), else "other"."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path.startswith("/") else "other"


class RequestContextMiddleware:
    """Assigns the request id, counts and times requests by route template, guards inflight."""

    def __init__(self, app: ASGIApp, routes: Iterable[str], max_inflight: int = 0,
                 retry_after_s: int = 1) -> None:
        self.app = app
        self.routes = frozenset(routes)
        self.max_inflight = max_inflight
        self.retry_after = str(retry_after_s).encode()
        self.inflight = 0  # this worker's count; the gauge aggregates workers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self.routes else "other"  # never a raw unknown path as label
        rid = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (REQUEST_ID_HEADER, rid.encode())
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        if route == "/rank" and self.max_inflight and self.inflight >= self.max_inflight:
            metrics.REJECTED.labels("overload").inc()
            status = 503
            await send_json(send, 503, {"error": "overloaded", "request_id": rid,
                                        "message": f"more than {self.max_inflight} requests "
                                                   "in flight (max_inflight); retry later"},
                            [(b"retry-after", self.retry_after), rid_header])
            metrics.REQUESTS.labels(route, "503").inc()
            return
        self.inflight += 1
        metrics.INFLIGHT.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.inflight -= 1
            metrics.INFLIGHT.dec()
            if route == "other":
                route = matched_template(scope)
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.REQUEST_DURATION.labels(route).observe(time.perf_counter() - t0)


DRAIN_MAX_BYTES = 4 * 1024 * 1024


async def drain(receive: Receive, message: Message) -> None:
    """Read and drop the rest of a rejected body, at most DRAIN_MAX_BYTES (reliability guard).

    Closing a socket with unread data makes the kernel send a reset, which the client sees
    instead of the 413 that is already on its way.
    """
    dropped = 0
    while message.get("more_body", False) and dropped < DRAIN_MAX_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: by Content-Length up front, else while counting chunks.

    The body is read here (bounded by the limit) and replayed to the app, so an oversized body
    never reaches parsing, validation, Redis or the model.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, scope: Scope, send: Send) -> None:
        metrics.REJECTED.labels("too_large").inc()
        rid = scope.get("state", {}).get("request_id")
        await send_json(send, 413, {
            "error": "payload_too_large",
            "detail": [{"field": "body", "message": f"at most {self.max_bytes} bytes"}],
            "request_id": rid,
        }, [(b"connection", b"close")])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await self._reject(scope, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await drain(receive, message)  # else the client gets a reset, not the 413
                await self._reject(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for disconnect as usual

        await self.app(scope, replay, send)
