"""Request context: the request id, request counts and latency by route, the in-flight limit,
and the one answer to an error nothing below handled.

This layer sits inside CORS and outside everything else, so what it sends carries the request id
and the CORS headers: a 500 from here is a JSON `error_response` a browser can read, not
Starlette's bare text (ServerErrorMiddleware, outside every user middleware, sees neither).
A client that went away before it was answered (mid-body, say) is counted as status 499, the
"client closed request" of nginx: nobody answered it, and it is not a server error (the
error-ratio alert counts 5xx only).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import error_response

REQUEST_ID_HEADER = b"x-request-id"
CLIENT_CLOSED = 499  # counted when the client disconnected before any answer started
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,64}$")

log = logging.getLogger("ranker.errors")


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
    """Assigns the request id, counts and times requests by route template, guards inflight,
    and answers an unhandled error with a 500 `error_response` (logged with its traceback)."""

    def __init__(self, app: ASGIApp, routes: Iterable[str], max_inflight: int = 0,
                 retry_after_s: int = 1) -> None:
        self.app = app
        self.routes = frozenset(routes)
        self.max_inflight = max_inflight
        self.retry_after = str(retry_after_s)
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
        status: int | None = None  # None until an answer starts
        disconnected = False
        t0 = time.perf_counter()

        async def receive_wrapper() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        if route == "/rank" and self.max_inflight and self.inflight >= self.max_inflight:
            metrics.REJECTED.labels("overload").inc()
            refusal = error_response(
                503, "overloaded", f"more than {self.max_inflight} requests in flight "
                "(max_inflight); retry later", request_id=rid,
                headers={"retry-after": self.retry_after})
            await refusal(scope, receive, send_wrapper)
            metrics.REQUESTS.labels(route, "503").inc()
            return
        self.inflight += 1
        metrics.INFLIGHT.inc()
        try:
            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except Exception:
                if status is not None:
                    raise  # an answer has started: nothing to replace it with; the server cuts it
                if not disconnected:  # a client that left (ClientDisconnect) needs no log
                    log.exception("unhandled error (request_id=%s, path=%s)", rid, path)
                    await self._internal_error(scope, receive, send_wrapper, rid)
            else:
                if status is None and not disconnected:
                    log.error("no answer from the app (request_id=%s, path=%s)", rid, path)
                    await self._internal_error(scope, receive, send_wrapper, rid)
        finally:
            self.inflight -= 1
            metrics.INFLIGHT.dec()
            if route == "other":
                route = matched_template(scope)
            code = status if status is not None else CLIENT_CLOSED if disconnected else 500
            metrics.REQUESTS.labels(route, str(code)).inc()
            metrics.REQUEST_DURATION.labels(route).observe(time.perf_counter() - t0)

    @staticmethod
    async def _internal_error(scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        answer = error_response(500, "internal_error", "internal error", request_id=rid)
        await answer(scope, receive, send)
