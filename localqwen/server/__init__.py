"""localqwen's HTTP server: the OpenAI-compatible API (and the other dialects) over one loaded Model."""

from localqwen.server.app import create_app, serve

__all__ = ["create_app", "serve"]
