"""A whole JSON error response sent from inside a pure ASGI middleware."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.types import Scope, Send

from service.middleware import send_json


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
    await send_json(send, status, body, headers)
