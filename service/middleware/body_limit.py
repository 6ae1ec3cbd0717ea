"""413 for request bodies over `max_body_bytes`, enforced while the body is read."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import error_response, request_id_of

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
    never reaches parsing, validation, Redis or the model; chunked bodies are counted too.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.REJECTED.labels("too_large").inc()
        limit = f"at most {self.max_bytes} bytes"
        refusal = error_response(
            413, "payload_too_large", f"body: {limit} (max_body_bytes)",
            detail=[{"field": "body", "message": limit}],
            request_id=request_id_of(scope), headers={"connection": "close"})
        await refusal(scope, receive, send)

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
                    await self._reject(scope, receive, send)
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
                await self._reject(scope, receive, send)
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
