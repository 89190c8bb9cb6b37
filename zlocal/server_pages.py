"""Routes that serve static pages: the built-in chat page at ``/`` and offline API docs."""

from __future__ import annotations

from fastapi import FastAPI


def add_page_routes(app: FastAPI) -> None:
    """Register the page routes on ``app`` (called by ``create_app`` before the OpenAPI setup)."""
