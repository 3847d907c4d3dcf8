"""The consumer's side of one generation: a `Stream` of events, iterated in a thread (`for`) or on an event loop
(`async for`), fed by the engine thread through a `Channel`.

The channel is also the backpressure: the engine runs a sequence only while its consumer has taken all but a few of
the tokens already produced (MAX_AHEAD), so generation advances with the reader, as a generator's would, and a
reader that stops reading holds its sequence (not the others) until it reads on, cancels or closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from localqwen.events import Event

MAX_AHEAD = 2  # tokens the engine may produce beyond what the consumer has taken
END = object()  # the last item of a channel


class Channel:
    """Items (each the events of one token, or END, or an exception) from the engine thread to one consumer."""

    def __init__(self, on_taken: Callable[[], None]) -> None:
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._on_taken = on_taken  # wakes the engine: a sequence held back for its reader may run again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waker: asyncio.Event | None = None
        self.backlog = 0  # items put and not yet taken

    def put(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            self.backlog += 1
            self._ready.notify()
            loop, waker = self._loop, self._waker
        if loop is not None and waker is not None:
            with contextlib.suppress(RuntimeError):  # the reader's event loop is closed: nobody waits any more
                loop.call_soon_threadsafe(waker.set)

    def get(self) -> Any:
        with self._lock:
            while not self._items:
                self._ready.wait()
            item = self._take()
        self._on_taken()
        return item

    async def aget(self) -> Any:
        with self._lock:
            if self._waker is None:
                self._loop, self._waker = asyncio.get_running_loop(), asyncio.Event()
        while True:
            with self._lock:
                if self._items:
                    item = self._take()
                    break
                self._waker.clear()
            await self._waker.wait()
        self._on_taken()
        return item

    def _take(self) -> Any:
        self.backlog -= 1
        return self._items.popleft()


class Handle(Protocol):
    """What the engine gives back for a submitted generation: its channel and the ways to steer it."""

    channel: Channel

    def cancel(self) -> None: ...

    def end_thinking(self) -> None: ...


class Stream:
    """The events of one generation, in order, ending with a `done` event: `for event in stream` (or
    `async for` on an event loop). The generation starts when the first event is asked for. `cancel()` (from any
    thread) ends it at the next token with finish reason "cancelled"; `close()` (or `aclose()`) cancels and
    drops what is left. `end_thinking()` asks the model to wrap up its thinking and answer now. A task that is
    cancelled while it waits for an event cancels the generation."""

    def __init__(self, submit: Callable[[], Handle], answer_format: Any = None) -> None:
        self._submit = submit
        self.answer_format = answer_format  # what Reply.collect parses the answer with (constrain.AnswerFormat)
        self._handle: Handle | None = None
        self._pending: deque[Event] = deque()
        self.finished = False

    # --- control ---------------------------------------------------------------------------------------------

    def cancel(self) -> None:
        if self._handle is not None and not self.finished:
            self._handle.cancel()

    def end_thinking(self) -> None:
        if self._handle is not None and not self.finished:
            self._handle.end_thinking()

    def close(self) -> None:
        """Cancel, and wait until the engine has let go of the generation (its slot is free when this returns)."""
        if self._handle is not None and not self.finished:
            self._handle.cancel()
            while self._handle.channel.get() is not END:
                pass
        self.finished = True
        self._pending.clear()

    async def aclose(self) -> None:
        if self._handle is not None and not self.finished:
            self._handle.cancel()
            while await self._handle.channel.aget() is not END:
                pass
        self.finished = True
        self._pending.clear()

    def __del__(self) -> None:
        if self._handle is not None and not self.finished:
            self._handle.cancel()  # an abandoned stream must not hold its sequence

    # --- iteration -------------------------------------------------------------------------------------------

    async def wait_started(self) -> None:
        """Wait until the engine has placed the generation in a slot (or ended it); raise what kept it from
        starting (ModelBusy when its wait for a slot ran out)."""
        if self._handle is None or not (self._pending or self.finished):
            self._receive(await self._open().aget())

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Event:
        while not self._pending:
            if self.finished:
                raise StopIteration
            self._receive(self._open().get())
        return self._pending.popleft()

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Event:
        while not self._pending:
            if self.finished:
                raise StopAsyncIteration
            try:
                item = await self._open().aget()
            except asyncio.CancelledError:  # the task waiting for this stream was cancelled: so is the generation
                self.cancel()
                self.finished = True
                raise
            self._receive(item)
        return self._pending.popleft()

    def _open(self) -> Channel:
        if self._handle is None:
            self._handle = self._submit()
        return self._handle.channel

    def _receive(self, item: Any) -> None:
        if item is END:
            self.finished = True
        elif isinstance(item, BaseException):
            self.finished = True
            raise item
        else:
            self._pending.extend(item)
