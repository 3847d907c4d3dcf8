"""One remote reply's HTTP stream (server-sent events), read into events: sync and asyncio, each with cancel().

A reply whose thinking budget the engine cannot enforce (vLLM) has two phases, as a local one does: the chat stream
is closed when the budget is spent, and the reply goes on as a raw completion of the prompt, the thinking so far and
the Qwen3 wrap-up (`_continuation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from typing import TYPE_CHECKING, Any, Literal

import httpx

from localqwen.constants import THINKING_WRAP_UP_TEXT
from localqwen.errors import BadRequest, LocalqwenError, RemoteError
from localqwen.events import Event
from localqwen.generation import Turn, timings
from localqwen.remote.chunks import ChunkReader
from localqwen.remote.wire import error_message, send, status_error, transport_error
from localqwen.sampling import SAMPLER_OPTIONS

if TYPE_CHECKING:
    from localqwen.remote.backend import RemoteModel

Ending = Literal["stop", "cancelled", "budget"]  # how reading one HTTP stream ended


class _StreamBase:
    """What the sync and async streams share: the request, the reader, the second phase and the `done` event."""

    def __init__(self, model: RemoteModel, path: str, body: dict[str, Any], turn: Turn,
                 messages: list[Any] | None = None, tools: list[Any] | None = None) -> None:
        self.model, self.path, self.body, self.messages, self.tools = model, path, body, messages, tools
        self.reader = ChunkReader(turn, chat=path.endswith("chat/completions"), engine_stops=body.get("stop"))
        self.wrapped: tuple[int, int] | None = None  # (prompt, thinking tokens) when a second phase ran
        self._cancel = threading.Event()
        self._answer_now = threading.Event()
        self.started = time.perf_counter()

    @property
    def where(self) -> str:
        return self.model.url + self.path

    def cancel(self) -> None:
        """Stop this stream at its next chunk (from any thread); it ends with finish reason "cancelled"."""
        self._cancel.set()

    def end_thinking(self) -> None:
        """Wrap up the thinking at the next chunk and answer now, as when a thinking budget runs out (from any thread;
        on an endpoint that tokenizes). Nothing happens once the answer has begun."""
        if not self.model.can_tokenize:
            raise BadRequest(f"{self.model.url} has no tokenizer to end the thinking with")
        self._answer_now.set()

    def _read(self, line: str) -> tuple[list[Event], Ending | None]:
        """The events of one server-sent line, and why to stop reading (a stop string or the budget), if so."""
        if self._cancel.is_set():
            return [], "cancelled"
        if not line.startswith("data:") or (payload := line[5:].strip()) == "[DONE]":
            return [], None
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise RemoteError(f"sent a stream line that is not JSON: {payload[:80]!r}", self.where) from None
        if not isinstance(chunk, dict):
            return [], None
        if "error" in chunk:  # an error after the response began
            raise RemoteError(f"failed mid-reply: {error_message(chunk)}", self.where)
        events, turn = self.reader.feed(chunk), self.reader.turn
        spent = turn.budget_spent or (self._answer_now.is_set() and turn.thinking and self.wrapped is None)
        return events, "stop" if turn.stopped else "budget" if spent else None

    def _continuation(self) -> list[Event]:
        """The thinking budget is spent: the wrap-up's events; the request becomes the raw completion that goes on
        from the prompt, the thinking so far and the wrap-up."""
        model, turn = self.model, self.reader.turn
        assert self.messages is not None
        prompt = model.tokenize_chat(self.messages, self.tools)
        thinking = "".join(self.reader.raw)
        events = turn.forced(THINKING_WRAP_UP_TEXT, model.wrap_up_tokens)
        self.wrapped = (len(prompt), turn.stats.thinking_tokens)
        continued = prompt + model.tokenize(thinking + THINKING_WRAP_UP_TEXT, special=True)
        body = {"model": model.model_id, "prompt": continued, "stream": True, "stream_options": {"include_usage": True},
                **{k: v for k, v in self.body.items() if k in (*SAMPLER_OPTIONS, "stop")}}  # all answer now
        if "max_tokens" in self.body:
            body["max_tokens"] = max(1, self.body["max_tokens"] - turn.stats.completion_tokens)
        first_token_at, self.reader = self.reader.first_token_at, ChunkReader(turn, chat=False,
                                                                                engine_stops=body.get("stop"))
        self.reader.first_token_at = first_token_at
        self.path, self.body = "/v1/completions", body
        return events

    def _done(self, ending: Ending) -> list[Event]:
        events = self.reader.finish("cancelled" if ending == "cancelled" else "stop", use_usage=self.wrapped is None)
        stats = self.reader.turn.stats
        if self.wrapped is not None:  # the counts of both phases: the second's usage holds the first's tokens
            stats.prompt_tokens, stats.thinking_tokens = self.wrapped
            stats.content_tokens = int(self.reader.usage.get("completion_tokens") or stats.content_tokens)
        elif stats.stop_sequence is not None and not stats.prompt_tokens:
            self._count_prompt()
        stats.timings = timings(0.0, self.started, self.reader.first_token_at, time.perf_counter(),
                                stats.prompt_tokens - stats.cached_prompt_tokens, stats.completion_tokens)
        return [*events, Event("done", stats=stats)]

    def _count_prompt(self) -> None:
        """A stream closed at a stop string has no usage from the engine: count the prompt with its tokenizer."""
        if self.messages is None or not self.model.can_tokenize:
            return
        with contextlib.suppress(LocalqwenError):  # else the counts stay what the stream showed
            self.reader.turn.stats.prompt_tokens = len(self.model.tokenize_chat(self.messages, self.tools))


class RemoteStream(_StreamBase):
    """The events of one remote generation: an iterator with `cancel()` and `close()` (which closes the HTTP
    stream: the engine stops generating). The request is sent when the stream is made, so that an error the endpoint
    answers with raises there."""

    def __init__(self, model: RemoteModel, path: str, body: dict[str, Any], turn: Turn,
                 messages: list[Any] | None = None, tools: list[Any] | None = None) -> None:
        super().__init__(model, path, body, turn, messages, tools)
        self.response = self._open()
        model._track(self, True)
        self._events = self._run()

    def __iter__(self) -> RemoteStream:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        self._events.close()
        self.response.close()

    def _open(self) -> httpx.Response:
        http = self.model._http
        response = send(http, http.build_request("POST", self.path, json=self.body), self.where, stream=True)
        if response.status_code >= 400:
            response.read()
            response.close()
            raise status_error(response, self.where)
        return response

    def _run(self) -> Iterator[Event]:
        try:
            ending = yield from self._stream()
            if ending == "budget":
                yield from self._continuation()
                self.response = self._open()
                ending = yield from self._stream()
            yield from self._done(ending)
        finally:
            self.response.close()
            self.model._track(self, False)

    def _stream(self) -> Generator[Event, None, Ending]:
        try:
            for line in self.response.iter_lines():
                events, ending = self._read(line)
                yield from events
                if ending is not None:
                    return ending
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.where) from None
        finally:
            self.response.close()
        return "cancelled" if self._cancel.is_set() else "stop"


class AsyncRemoteStream(_StreamBase):
    """The asyncio twin of RemoteStream, over httpx's async client: `async for event in stream`; the request is sent
    on the first iteration."""

    def __init__(self, model: RemoteModel, path: str, body: dict[str, Any], turn: Turn,
                 messages: list[Any] | None = None, tools: list[Any] | None = None) -> None:
        super().__init__(model, path, body, turn, messages, tools)
        self._events: AsyncIterator[Event] | None = None

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
        self.model._track(self, True)
        try:
            async with httpx.AsyncClient(base_url=http.base_url, headers=http.headers, timeout=http.timeout) as client:
                ending = "stop"
                async for event in self._stream(client):
                    if isinstance(event, Event):
                        yield event
                    else:
                        ending = event
                if ending == "budget":
                    for event in await asyncio.to_thread(self._continuation):  # the endpoint's tokenizer, blocking
                        yield event
                    async for event in self._stream(client):
                        if isinstance(event, Event):
                            yield event
                        else:
                            ending = event
            for event in self._done(ending):
                yield event
        finally:
            self.model._track(self, False)

    async def _stream(self, client: httpx.AsyncClient) -> AsyncIterator[Event | Ending]:
        """The events of one HTTP stream, then how it ended."""
        try:
            async with client.stream("POST", self.path, json=self.body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise status_error(response, self.where)
                async for line in response.aiter_lines():
                    events, ending = self._read(line)
                    for event in events:
                        yield event
                    if ending is not None:
                        yield ending
                        return
                    await asyncio.sleep(0)  # let a cancel() from this loop's other tasks run
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.where) from None
        yield "cancelled" if self._cancel.is_set() else "stop"
