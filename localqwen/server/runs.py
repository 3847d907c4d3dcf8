"""Generations across the thread boundary: each runs in a worker thread and its events reach the event loop through
an asyncio queue; the scheduler decides when one may start; a streamed response stops its generation however it
ends (finished, client gone, error)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from localqwen.events import Event
from localqwen.model import Model
from localqwen.server.http import RETRY_AFTER_S, APIError, api_error

T = TypeVar("T")

_STARTED, _END = object(), object()


class Generation:
    """One model run in a worker thread; its events reach the event loop through an asyncio queue."""

    def __init__(self, model: Model, start: Callable[[], Iterator[Event]]) -> None:
        self.model, self._start = model, start
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stop = threading.Event()
        self._ended = False  # the loop side has seen _END: the generation is over
        self.future: asyncio.Future[None] | None = None  # the worker; the model is ours until it is done

    def run(self) -> None:
        """The worker thread: start the generation, forward its events, always end with _END."""
        def put(item: Any) -> None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

        try:
            events = self._start()
            put(_STARTED)
            try:
                for event in events:
                    put(event)
                    if self._stop.is_set():
                        self.model.cancel()  # again: a cancel before the model lock was taken is cleared by it
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            put(exc)
        finally:
            put(_END)

    def stop(self) -> None:
        """Cancel the generation (from the event loop); it ends at its next token with a done event."""
        self._stop.set()
        if not self._ended and self.future is not None and not self.future.done():
            self.model.cancel()  # the model runs nothing but this generation until the future is done

    async def open(self) -> None:
        """Wait until the generation has started; raise what kept it from starting."""
        item = await self._queue.get()
        if item is not _STARTED:
            raise api_error(item) if isinstance(item, BaseException) else APIError(500, "generation did not start")

    async def next(self) -> Event | None:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._ended = item is _END
        return None if self._ended else item


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
    """One generation at a time; at most `max_queue` requests wait for it."""

    def __init__(self, model: Model, max_queue: int) -> None:
        self.model, self.max_queue = model, max_queue
        self.slot = asyncio.Lock()
        self.waiting = 0

    @property
    def running(self) -> int:
        """Generations running now."""
        return int(self.slot.locked())

    async def start(self, request: Request, start: Callable[[], Iterator[Event]]) -> Generation:
        if self.slot.locked() and self.waiting >= self.max_queue:
            raise APIError(503, f"the server is busy ({self.waiting} requests waiting); retry later",
                           type="server_busy", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.waiting += 1
        try:
            await until_disconnected(request, self.slot.acquire())
        finally:
            self.waiting -= 1
        generation = Generation(self.model, start)
        try:
            generation.future = asyncio.get_running_loop().run_in_executor(None, generation.run)
        except BaseException:
            self.slot.release()
            raise
        generation.future.add_done_callback(lambda _: self.slot.release())
        try:
            await until_disconnected(request, generation.open())
        except BaseException:
            generation.stop()
            raise
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
