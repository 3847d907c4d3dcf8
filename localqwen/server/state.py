"""What every route handler needs from the server: the model, its name, the scheduler, the API key check and the
bounded body reader. One `ServerState` lives on `app.state.server`; handlers reach it with `ServerState.of(request)`.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel

from localqwen.events import Event
from localqwen.model import Model
from localqwen.remote import RemoteModel, RemoteStream
from localqwen.server.http import APIError, parse_body
from localqwen.server.runs import Generation, Scheduler
from localqwen.stream import Stream

M = TypeVar("M", bound=BaseModel)
REASONING_FORMATS = ("deepseek", "none")


@dataclass
class ServerState:
    model: Model | RemoteModel
    model_id: str
    scheduler: Scheduler
    api_key: str | None = None
    reasoning_format: str = "deepseek"  # "deepseek": thinking in reasoning_content; "none": <think> in content
    max_body_bytes: int = 4 << 20
    created: int = field(default_factory=lambda: int(time.time()))
    # Sees every generation's events on their way to the client (the metrics); runs in the generation's thread.
    observer: Callable[[Event], None] | None = None  # sees every generation's events (the metrics count them)

    @staticmethod
    def of(request: Request) -> ServerState:
        return request.app.state.server

    def authorize(self, request: Request) -> None:
        """The bearer key (or Anthropic's `x-api-key`), compared in constant time."""
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            given = request.headers.get("x-api-key", "")
        if not given.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read(self, request: Request, kind: type[M]) -> M:
        """The authorized request's body, at most max_body_bytes, validated into `kind`."""
        self.authorize(request)
        length = request.headers.get("content-length", "")
        too_big = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                           code="request_too_large", headers={"Connection": "close"})
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise too_big
        return parse_body(bytes(body), kind)

    async def start(self, request: Request, start: Callable[[], Stream | RemoteStream]) -> Generation:
        """Start a generation (`start` calls the model and returns its stream) and wait until it has a slot."""
        return await self.scheduler.start(request, start, self.observer)
