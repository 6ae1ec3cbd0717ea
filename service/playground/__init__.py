"""The ranking playground page (static HTML/CSS/JS) and its small JSON helpers."""

from service.playground.router import router as playground_router

__all__ = ["playground_router"]
