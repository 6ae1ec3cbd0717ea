"""Per-request deadline for the ranking route(s), as pure ASGI middleware.

A request whose deadline passes before its answer starts is cancelled and answered 503
`deadline_exceeded` (a late answer is useless to a page that has already rendered without it).
The in-flight limit lives in `service.middleware.RequestContextMiddleware`, which also keeps
the in-flight gauge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.guards.responses import send_error

RejectHook = Callable[[str], None]  # called with the reason: "deadline"

DEFAULT_PATHS = ("/rank",)


def _noop(_reason: str) -> None:
    return None


def _matches(scope: Scope, paths: frozenset[str]) -> bool:
    return scope["type"] == "http" and scope.get("path", "") in paths


def deadline_of(scope: Scope) -> float | None:
    """The request's deadline on the event loop's clock (`loop.time()`), if one was set."""
    state = scope.get("state")
    value = state.get("deadline") if isinstance(state, dict) else None
    return float(value) if value is not None else None


def remaining_s(scope: Scope) -> float | None:
    """Seconds left before the request's deadline (may be negative), or None without one."""
    deadline = deadline_of(scope)
    if deadline is None:
        return None
    return deadline - asyncio.get_running_loop().time()


class DeadlineMiddleware:
    """Cancel a request on `paths` whose answer has not started `timeout_s` after arrival.

    The deadline (event-loop clock) is stored in `scope["state"]["deadline"]` so the route can
    size its own Redis and inference timeouts with `remaining_s(scope)`. Once the response has
    started it is let finish: a half-sent answer cannot be replaced by an error.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        timeout_s: float,
        retry_after_s: int = 1,
        paths: Iterable[str] = DEFAULT_PATHS,
        on_reject: RejectHook = _noop,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.app = app
        self.timeout_s = timeout_s
        self.retry_after = str(max(0, int(retry_after_s))).encode()
        self.paths = frozenset(paths)
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _matches(scope, self.paths):
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        scope.setdefault("state", {})["deadline"] = deadline
        started = False
        guard = asyncio.timeout_at(deadline)

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                if guard.expired():  # the cancellation is on its way: do not start an answer
                    raise asyncio.CancelledError
                started = True
                guard.reschedule(None)  # the answer is ready: let it be sent whole
            await send(message)

        try:
            async with guard:
                await self.app(scope, receive, send_wrapper)
        except TimeoutError:
            if not guard.expired():
                raise  # a TimeoutError of the app's own, not our deadline
            if started:
                return  # cannot happen unless the app swallowed the cancellation
            self.on_reject("deadline")
            await send_error(
                send, scope, 503, "deadline_exceeded",
                f"no answer within the request deadline of {self.timeout_s:g}s "
                "(request_timeout_s)",
                [(b"retry-after", self.retry_after)],
            )
