"""The service's pure ASGI middleware, one module per concern; `service.app.create_app` lists
the stack in order.

- `context`: request id, request metrics, in-flight limit
- `body_limit`: 413 for bodies over `max_body_bytes`
- `deadline`: the whole-request backstop deadline
- `auth`: API keys for `/rank`, the admin key for `/admin/*`
- `ports`: `/metrics` and `/admin/*` only on the operator port
- `cors`: Starlette's CORSMiddleware, configured and checked from settings

Pure ASGI (not BaseHTTPMiddleware), so they add no task or stream wrapping to the hot path.
Every refusal is written by `service.errors.error_response`, like the routes' errors.
"""
