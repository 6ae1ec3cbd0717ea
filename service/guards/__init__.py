"""Guards for the ranking service: in-flight limit, request deadline, API-key auth (pure ASGI)."""
