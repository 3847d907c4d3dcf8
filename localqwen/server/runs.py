"""Generations on the event loop: the model's streams (continuous batching runs them together in its own thread)
consumed with `async for`; the scheduler bounds how many wait; a streamed response stops its generation however
it ends (finished, client gone, error)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from localqwen.errors import LocalqwenError
from localqwen.events import Event
from localqwen.model import Model
from localqwen.remote import RemoteModel, RemoteStream
from localqwen.server.http import RETRY_AFTER_S, APIError, api_error
from localqwen.stream import Stream

T = TypeVar("T")


class Generation:
    """One generation of the model, taken on the event loop; `on_event` sees each event as it passes."""

    def __init__(self, stream: Stream | RemoteStream, on_event: Callable[[Event], None] | None = None) -> None:
        self.stream, self._on_event = stream, on_event
        self.on_end: list[Callable[[], None]] = []  # run once, when its last event has been read or it is stopped

    async def open(self) -> None:
        """Wait until the model has taken the generation into a slot; raise what kept it from starting."""
        try:
            await self.stream.wait_started()
        except LocalqwenError as exc:
            raise api_error(exc) from None

    async def next(self) -> Event | None:
        """The next event, or None after the last."""
        try:
            event = await self.stream.__anext__()
        except StopAsyncIteration:
            self._ended()
            return None
        except LocalqwenError as exc:
            raise api_error(exc) from None
        if self._on_event is not None:
            self._on_event(event)
        return event

    def stop(self) -> None:
        """Cancel the generation; it ends at its next token with a done event (finish reason "cancelled")."""
        self.stream.cancel()
        self._ended()

    def end_thinking(self) -> None:
        """Ask the model to wrap up its thinking and answer now (nothing happens once it answers)."""
        try:
            self.stream.end_thinking()
        except LocalqwenError as exc:  # a remote endpoint that cannot do it
            raise api_error(exc) from None

    def _ended(self) -> None:
        callbacks, self.on_end = self.on_end, []
        for callback in callbacks:
            callback()


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` unless the client disconnects first (then cancel it and raise ClientGone).
    Only for requests whose body has been read: then the next ASGI message is the disconnect."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(awaitable), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        raise ClientGone
    return task.result()


class Scheduler:
    """Up to the model's `parallel` generations run together; at most `max_queue` more wait for a slot."""

    def __init__(self, model: Model | RemoteModel, max_queue: int) -> None:
        self.model, self.max_queue = model, max_queue
        self._unplaced = 0  # requests being started: tokenized, queued in the model, not yet in a slot

    @property
    def running(self) -> int:
        """Generations running now."""
        return self.model.running

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return max(0, self._unplaced - (self.model.parallel - self.model.running))

    async def start(self, request: Request, start: Callable[[], Stream | RemoteStream],
                    on_event: Callable[[Event], None] | None = None) -> Generation:
        """Start a generation (`start` calls the model) and wait until it has a slot; 503 when too many wait."""
        if self.waiting >= self.max_queue:
            raise APIError(503, f"the server is busy ({self.waiting} requests waiting); retry later",
                           type="server_busy", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        self._unplaced += 1
        try:
            try:  # rendering and tokenizing a long prompt takes a while: not on the event loop
                generation = Generation(await asyncio.to_thread(start), on_event)
            except LocalqwenError as exc:
                raise api_error(exc) from None
            try:
                await until_disconnected(request, generation.open())
            except BaseException:
                generation.stop()
                raise
        finally:
            self._unplaced -= 1
        return generation


class EventStream(StreamingResponse):
    """A streamed reply (server-sent events, or NDJSON for Ollama) whose generation stops however the response ends
    (done, disconnect, error)."""

    def __init__(self, body: AsyncIterator[bytes], generation: Generation, media_type: str = "text/event-stream"
                 ) -> None:
        super().__init__(body, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.stop()


async def events_of(generation: Generation) -> AsyncIterator[Event]:
    while (event := await generation.next()) is not None:
        yield event


async def collect(request: Request, generation: Generation) -> list[Event]:
    """Every event of a generation, for a reply sent whole; the generation stops if the client goes first."""
    events: list[Event] = []

    async def gather() -> None:
        async for event in events_of(generation):
            events.append(event)

    try:
        await until_disconnected(request, gather())
    finally:
        generation.stop()
    return events
