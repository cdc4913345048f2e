"""OpenAI-compatible HTTP server over the qoq engine (docs/serving.md)."""

from qoq.server.app import build_app
from qoq.server.async_engine import AsyncEngine

__all__ = ["AsyncEngine", "build_app"]
