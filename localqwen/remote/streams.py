"""One remote reply's HTTP stream (server-sent events), read into events: sync and asyncio, each with cancel()."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from localqwen.errors import LocalqwenError, RemoteError
from localqwen.events import Event
from localqwen.generation import Turn, timings
from localqwen.remote.chunks import ChunkReader
from localqwen.remote.wire import error_message, status_error, transport_error

if TYPE_CHECKING:
    from localqwen.remote.backend import RemoteModel


class _StreamBase:
    """What the sync and async streams share: the request, the reader, and the `done` event."""

    def __init__(self, model: RemoteModel, path: str, body: dict[str, Any], turn: Turn) -> None:
        self.model, self.path, self.body = model, path, body
        self.where = model.url + path
        self.reader = ChunkReader(turn, chat=path.endswith("chat/completions"))
        self._cancel = threading.Event()
        self.started = time.perf_counter()

    def cancel(self) -> None:
        """Stop this stream at its next chunk (from any thread); it ends with finish reason "cancelled"."""
        self._cancel.set()

    def _chunks(self, line: str) -> dict[str, Any] | None:
        """The JSON of one server-sent `data:` line; None for other lines and the final [DONE]."""
        if not line.startswith("data:"):
            return None
        payload = line[5:].strip()
        if payload == "[DONE]":
            return None
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise RemoteError(f"sent a stream line that is not JSON: {payload[:80]!r}", self.where) from None
        if isinstance(chunk, dict) and "error" in chunk:  # an error after the response began
            raise RemoteError(f"failed mid-reply: {error_message(chunk)}", self.where)
        return chunk if isinstance(chunk, dict) else None

    def _done(self, reason: str) -> list[Event]:
        events = self.reader.finish(reason)
        stats = self.reader.turn.stats
        stats.timings = timings(0.0, self.started, self.reader.first_token_at, time.perf_counter(),
                                stats.prompt_tokens - stats.cached_prompt_tokens, stats.completion_tokens)
        return [*events, Event("done", stats=stats)]

    def _prompt_tokens(self, messages: list[Any] | None, tools: list[Any] | None) -> None:
        """A stream closed early (a stop string) has no usage from the engine: count the prompt with its tokenizer."""
        stats = self.reader.turn.stats
        if messages is None or stats.prompt_tokens or not self.model.can_tokenize:
            return
        with contextlib.suppress(LocalqwenError):  # else the counts stay what the stream showed
            stats.prompt_tokens = len(self.model.tokenize_chat(messages, tools))


class RemoteStream(_StreamBase):
    """The events of one remote generation: an iterator with `cancel()` and `close()` (which closes the HTTP
    stream: the engine stops generating)."""

    def __init__(self, model: RemoteModel, path: str, body: dict[str, Any], turn: Turn,
                 messages: list[Any] | None = None, tools: list[Any] | None = None) -> None:
        super().__init__(model, path, body, turn)
        self.messages, self.tools = messages, tools
        try:
            request = model._http.build_request("POST", path, json=body)
            self.response = model._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.where) from None
        if self.response.status_code >= 400:
            self.response.read()
            self.response.close()
            raise status_error(self.response, self.where)
        model._track(self, True)
        self._events = self._run()

    def __iter__(self) -> RemoteStream:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        self._events.close()

    def _run(self) -> Iterator[Event]:
        reason = "stop"
        try:
            for line in self.response.iter_lines():
                if self._cancel.is_set():
                    reason = "cancelled"
                    break
                chunk = self._chunks(line)
                if chunk is not None:
                    yield from self.reader.feed(chunk)
                    if self.reader.turn.stopped:  # a stop string ended the answer: the engine need not go on
                        break
            else:
                reason = "cancelled" if self._cancel.is_set() else "stop"
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.where) from None
        finally:
            self.response.close()
            self.model._track(self, False)
        if self.reader.turn.stopped:
            self._prompt_tokens(self.messages, self.tools)
        yield from self._done(reason)


class AsyncRemoteStream(_StreamBase):
    """The asyncio twin of RemoteStream, over httpx's async client: `async for event in stream`."""

    def __init__(self, model: RemoteModel, path: str, body: dict[str, Any], turn: Turn) -> None:
        super().__init__(model, path, body, turn)
        self._events: AsyncIterator[Event] | None = None
        self._client: httpx.AsyncClient | None = None

    def __aiter__(self) -> AsyncRemoteStream:
        return self

    async def __anext__(self) -> Event:
        if self._events is None:
            self._events = self._run()
        return await self._events.__anext__()

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.aclose()  # type: ignore[attr-defined]

    async def _run(self) -> AsyncIterator[Event]:
        http = self.model._http
        reason = "stop"
        self.model._track(self, True)
        try:
            async with httpx.AsyncClient(base_url=http.base_url, headers=http.headers, timeout=http.timeout) as client:
                try:
                    async with client.stream("POST", self.path, json=self.body) as response:
                        if response.status_code >= 400:
                            await response.aread()
                            raise status_error(response, self.where)
                        async for line in response.aiter_lines():
                            if self._cancel.is_set():
                                reason = "cancelled"
                                break
                            chunk = self._chunks(line)
                            if chunk is not None:
                                for event in self.reader.feed(chunk):
                                    yield event
                                if self.reader.turn.stopped:
                                    break
                            await asyncio.sleep(0)  # let cancel() from this loop's other tasks run
                except httpx.HTTPError as exc:
                    raise transport_error(exc, self.where) from None
        finally:
            self.model._track(self, False)
        for event in self._done("cancelled" if reason == "cancelled" or self._cancel.is_set() else "stop"):
            yield event
