"""The HTTP floor: a FastAPI POST endpoint that receives the same body as /rank and does nothing.

Served by uvicorn exactly like the service (same server, same loop, same protocol), so its
latency is what the web stack alone costs per request: `uvicorn bench.noop_app:app`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response

app = FastAPI(title="noop")


@app.post("/rank")
async def rank(request: Request) -> Response:
    """Read the body (a server has to receive it) and answer a constant."""
    await request.body()
    return Response(content=b"{}", media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(content=b"ok")
