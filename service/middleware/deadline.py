"""The whole-request backstop deadline of the ranking route(s), as pure ASGI middleware.

A request whose deadline passes before its answer starts is cancelled and answered 503
`deadline_exceeded` (a late answer is useless to a page that has already rendered without it).
It covers reading the body too; the ranking pipeline's own, shorter deadline (fetch plus
inference, `request_timeout_s`) is on the same clock, the event loop's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response, request_id_of

if TYPE_CHECKING:
    from service.settings import Settings

RejectHook = Callable[[str], None]  # called with the reason: "deadline"

DEFAULT_PATHS = ("/rank",)


def hard_timeout_s(settings: Settings) -> float:
    """The whole-request backstop: explicit, or twice the pipeline's own deadline."""
    explicit = settings.request_hard_timeout_s
    return float(explicit) if explicit else 2.0 * settings.request_timeout_s


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

    The deadline (event-loop clock) is stored in `scope["state"]["deadline"]`, where
    `remaining_s(scope)` reads it. Once the response has started it is let finish: a half-sent
    answer cannot be replaced by an error.
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
        self.retry_after = str(max(0, int(retry_after_s)))
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
            refusal = error_response(
                503, "deadline_exceeded", f"no answer within the request deadline of "
                f"{self.timeout_s:g}s (request_timeout_s)", request_id=request_id_of(scope),
                headers={"retry-after": self.retry_after})
            await refusal(scope, receive, send)
