"""Serve `/metrics` and `/admin/*` only on a separate (unpublished) port when one is configured.

One app listens on both sockets; the port a request arrived on (`scope["server"]`) decides
what it may reach: the public port never serves the operator routes, the operator port serves
only them (plus the health probes). Unreachable routes answer 404, as if they did not exist.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_response, request_id_of

OPS_PATHS = ("/metrics", "/admin")
PROBES = ("/healthz", "/readyz")


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


class OpsPortMiddleware:
    """Route-by-port: operator routes only on `ops_port`, everything else only off it."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        ops_port: int,
        ops_paths: Iterable[str] = OPS_PATHS,
        probes: Iterable[str] = PROBES,
    ) -> None:
        self.app = app
        self.ops_port = ops_port
        self.ops_paths = tuple(ops_paths)
        self.probes = tuple(probes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = scope.get("server") or (None, None)
        on_ops = server[1] == self.ops_port
        path = scope.get("path", "")
        allowed = _under(path, self.ops_paths) or _under(path, self.probes) if on_ops else (
            not _under(path, self.ops_paths))
        if allowed:
            await self.app(scope, receive, send)
            return
        refusal = error_response(404, "not_found", "Not Found", request_id=request_id_of(scope))
        await refusal(scope, receive, send)
