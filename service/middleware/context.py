"""Request context: the request id, request counts and latency by route, the in-flight limit."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import error_response

REQUEST_ID_HEADER = b"x-request-id"
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,64}$")


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
            await self.app(scope, receive, send_wrapper)
        finally:
            self.inflight -= 1
            metrics.INFLIGHT.dec()
            if route == "other":
                route = matched_template(scope)
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.REQUEST_DURATION.labels(route).observe(time.perf_counter() - t0)
