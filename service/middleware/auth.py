"""The service's one key check: API keys for the ranking routes, the admin key for `/admin/*`.

An API key comes in `X-API-Key`; the admin key in `X-Admin-Key`, `Authorization: Bearer` or
`X-API-Key`, and an API key never opens an admin route. Safe by default: with API keys
configured and no admin key, `/admin/*` is refused (403 `admin_disabled`) rather than open to
anyone who can reach the API. Keys are compared with
`hmac.compare_digest` against every configured key (no early exit), so the time taken says
nothing about how much of a key was right. Keys are never logged or echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Sequence

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_response, request_id_of

API_KEY_HEADER = b"x-api-key"
ADMIN_KEY_HEADER = b"x-admin-key"
AUTHORIZATION = b"authorization"
DenyHook = Callable[[str], None]  # called with the scope that refused: "api" | "admin"

Keys = str | Sequence[str | SecretStr] | None


def _noop(_scope: str) -> None:
    return None


def parse_keys(raw: Keys) -> tuple[bytes, ...]:
    """Keys from a list or a comma-separated string; blanks dropped (an empty key is no key)."""
    if raw is None:
        return ()
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    plain = [k.get_secret_value() if isinstance(k, SecretStr) else k for k in items]
    return tuple(k.strip().encode() for k in plain if k and k.strip())


def key_matches(given: bytes | None, keys: Iterable[bytes]) -> bool:
    """True if `given` equals one of `keys`; every key is compared, in constant time each."""
    if given is None:
        return False
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    return ok


def header_of(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case bytes), or None."""
    for k, v in scope.get("headers", ()):
        if k == name:
            return bytes(v)
    return None


def admin_key_of(scope: Scope) -> bytes | None:
    """The admin key a request presents: X-Admin-Key, else a Bearer token, else X-API-Key."""
    given = header_of(scope, ADMIN_KEY_HEADER)
    if given is None:
        auth = header_of(scope, AUTHORIZATION)
        if auth is not None and auth.startswith(b"Bearer "):
            given = auth.removeprefix(b"Bearer ").strip()
    return given if given is not None else header_of(scope, API_KEY_HEADER)


def _under(path: str, prefixes: frozenset[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


class ApiKeyMiddleware:
    """401 unless the request carries a valid key for its route; routes with no keys are open.

    `api_paths` (default `/rank`) accept any of `api_keys`; `admin_paths` (default `/admin`)
    accept only `admin_key`, never an API key. With no keys configured at all a route stays
    open (a local run); with API keys but no admin key the admin routes are refused (403).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: Keys = None,
        admin_key: str | None = None,
        api_paths: Iterable[str] = ("/rank",),
        admin_paths: Iterable[str] = ("/admin",),
        on_deny: DenyHook = _noop,
    ) -> None:
        self.app = app
        self.api_keys = parse_keys(api_keys)
        self.admin_keys = parse_keys([admin_key] if admin_key else None)
        self.api_paths = frozenset(api_paths)
        self.admin_paths = frozenset(admin_paths)
        self.on_deny = on_deny

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":  # CORS preflight
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.api_keys and not self.admin_keys and _under(path, self.admin_paths):
            self.on_deny("admin")
            refusal = error_response(
                403, "admin_disabled", "admin routes are off: API keys are configured but no "
                "admin key (set RANKER_ADMIN_API_KEY)", request_id=request_id_of(scope))
            await refusal(scope, receive, send)
            return
        if self.admin_keys and _under(path, self.admin_paths):
            keys, which, header = self.admin_keys, "admin", "X-Admin-Key"
            given = admin_key_of(scope)
        elif self.api_keys and _under(path, self.api_paths):
            keys, which, header = self.api_keys, "api", "X-API-Key"
            given = header_of(scope, API_KEY_HEADER)
        else:
            await self.app(scope, receive, send)
            return
        if key_matches(given, keys):
            await self.app(scope, receive, send)
            return
        self.on_deny(which)
        refusal = error_response(
            401, "unauthorized", f"missing or invalid {header} header ({which} key required)",
            request_id=request_id_of(scope),
            headers={"www-authenticate": f'ApiKey header="{header}"'})
        await refusal(scope, receive, send)
