"""A whole JSON error response sent from inside a pure ASGI middleware."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from starlette.types import Scope, Send


def request_id_of(scope: Scope) -> str | None:
    """The request id an outer middleware put in scope["state"], if any."""
    state = scope.get("state")
    rid = state.get("request_id") if isinstance(state, dict) else None
    return rid if isinstance(rid, str) else None


async def send_error(
    send: Send,
    scope: Scope,
    status: int,
    error: str,
    message: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send `{"error", "message", "request_id"}` with `status`; same shape as service/errors.py."""
    body: dict[str, Any] = {"error": error, "message": message}
    rid = request_id_of(scope)
    if rid is not None:
        body["request_id"] = rid
    payload = orjson.dumps(body)
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *headers,
        ],
    })
    await send({"type": "http.response.body", "body": payload})
