"""CORS for browser clients of `/rank`: Starlette's CORSMiddleware configured from settings.

Origins are an explicit allow-list, empty by default (no cross-origin access). A wildcard origin
is never combined with credentials: browsers refuse that pairing anyway, and the only way to
"make it work" would be to reflect any Origin with credentials, which hands every site on the
internet the user's session. Such a configuration is refused at startup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

ALLOW_METHODS = ("GET", "POST", "OPTIONS")
# Content-Type makes a JSON POST "non-simple" (so it is preflighted); X-Request-ID lets a client
# correlate its logs with ours; X-API-Key is the header auth uses when it is enabled.
ALLOW_HEADERS = ("Content-Type", "X-Request-ID", "X-API-Key")
EXPOSE_HEADERS = ("X-Request-ID", "Retry-After")
PREFLIGHT_MAX_AGE_S = 600


class CorsConfigError(ValueError):
    """A CORS configuration the service refuses to start with; the message says why."""


def check_cors_config(origins: Sequence[str], allow_credentials: bool) -> list[str]:
    """The validated origin list, or CorsConfigError for `*` with credentials or a bad origin."""
    cleaned: list[str] = []
    for origin in origins:
        o = origin.strip()
        if o == "*":
            cleaned.append(o)
            continue
        # An Origin header is scheme://host[:port], never a path or a trailing slash: an entry
        # with one would silently never match, so say so instead.
        if "://" not in o or o.endswith("/") or "/" in o.split("://", 1)[1]:
            raise CorsConfigError(
                f"cors_origins: {origin!r} is not an origin (want scheme://host[:port], no path)"
            )
        cleaned.append(o)
    if "*" in cleaned and allow_credentials:
        raise CorsConfigError(
            "cors_origins contains '*' and cors_allow_credentials is true: a wildcard origin is "
            "never combined with credentials; list the allowed origins explicitly"
        )
    return cleaned


def cors_middleware(settings: Any) -> Middleware | None:
    """CORSMiddleware from settings.cors_origins/cors_allow_credentials; None if no origins."""
    origins = list(getattr(settings, "cors_origins", []) or [])
    credentials = bool(getattr(settings, "cors_allow_credentials", False))
    allowed = check_cors_config(origins, credentials)
    if not allowed:
        return None  # same-origin only: no middleware, no CORS headers, nothing to get wrong
    return Middleware(
        CORSMiddleware,
        allow_origins=allowed,
        allow_credentials=credentials,
        allow_methods=list(ALLOW_METHODS),
        allow_headers=list(ALLOW_HEADERS),
        expose_headers=list(EXPOSE_HEADERS),
        max_age=PREFLIGHT_MAX_AGE_S,
    )
