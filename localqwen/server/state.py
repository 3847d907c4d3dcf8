"""What every route handler needs from the server: the model, its name, the scheduler, the API key check and the
bounded body reader. One `ServerState` lives on `app.state.server`; handlers reach it with `ServerState.of(request)`.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from localqwen.constrain import check_schema
from localqwen.errors import BadRequest
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
    # Running generations by the id their clients see (a chat completion's, a response's): for "answer now".
    generations: dict[str, Generation] = field(default_factory=dict)

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

    async def start(self, request: Request, start: Callable[[], Stream | RemoteStream], id: str | None = None,
                    ) -> Generation:
        """Start a generation (`start` calls the model and returns its stream) and wait until it has a slot. With an
        `id`, answer_now finds it by that id until it ends."""
        generation = await self.scheduler.start(request, start, self.observer)
        if id is not None:
            self.generations[id] = generation
            generation.on_end.append(lambda: self.generations.pop(id, None))
        return generation

    def answer_now(self, request: Request, id: str) -> dict[str, Any]:
        """End the thinking of the running generation `id` (the model answers at once); 404 when none runs by it."""
        self.authorize(request)
        generation = self.generations.get(id)
        if generation is None:
            raise APIError(404, f"no running generation {id!r}: it has finished, or there never was one",
                           code="not_found")
        generation.end_thinking()
        return {"id": id, "answer_now": True}

    def check_schema(self, schema: Any, where: str) -> None:
        """Refuse, naming the request field, an answer schema the local runtime could not enforce (Model.chat would
        refuse it too, naming only its own parts). An upstream engine judges the schemas it gets itself."""
        if isinstance(self.model, Model):
            try:
                check_schema(schema, where)
            except BadRequest as exc:
                raise APIError(400, exc.message, param=where.split(".")[0]) from None
