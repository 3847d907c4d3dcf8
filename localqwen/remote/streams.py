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
from localqwen.constrain import AnswerFormat
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
    """What reading either way shares: the request, the reader, the second phase and the `done` event."""

    def __init__(self, model: RemoteModel, path: str, body: dict[str, Any], turn: Turn,
                 messages: list[Any] | None = None, tools: list[Any] | None = None,
                 answer_format: AnswerFormat | None = None) -> None:
        self.model, self.path, self.body, self.messages, self.tools = model, path, body, messages, tools
        self.answer_format = answer_format  # what Reply.collect parses the answer with, as for a local stream
        self.reader = ChunkReader(turn, chat=path.endswith("chat/completions"), engine_stops=body.get("stop"))
        self.wrapped: tuple[int, int] | None = None  # (prompt, thinking tokens) when a second phase ran
        self.prompt_tokens: int | None = None  # counted by the endpoint's tokenizer, when its usage is missing
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
        reason = "budget" if turn.budget_spent else "answer_now"
        events = turn.forced(THINKING_WRAP_UP_TEXT, model.wrap_up_tokens, reason)
        self.wrapped = (len(prompt), turn.stats.thinking_tokens)
        continued = prompt + model.tokenize(thinking + THINKING_WRAP_UP_TEXT, special=True)
        # What follows is all answer: the stop strings and the answer's format apply from its first token.
        body = {"model": model.model_id, "prompt": continued, "stream": True, "stream_options": {"include_usage": True},
                **{k: v for k, v in self.body.items() if k in (*SAMPLER_OPTIONS, "stop", "response_format")}}
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
        elif self.prompt_tokens is not None:
            stats.prompt_tokens = self.prompt_tokens
        stats.timings = timings(0.0, self.started, self.reader.first_token_at, time.perf_counter(),
                                stats.prompt_tokens - stats.cached_prompt_tokens, stats.completion_tokens)
        return [*events, Event("done", stats=stats)]

    def _prompt_uncounted(self) -> bool:
        """A stream closed by the client at a stop string has no usage from the engine."""
        return (self.reader.turn.stopped and not self.reader.usage and self.wrapped is None
                and self.messages is not None and self.model.can_tokenize)

    def _count_prompt(self) -> None:
        """Count the prompt with the endpoint's tokenizer (blocking; the counts stay as streamed if it fails)."""
        assert self.messages is not None
        with contextlib.suppress(LocalqwenError):
            self.prompt_tokens = len(self.model.tokenize_chat(self.messages, self.tools))


class RemoteStream(_StreamBase):
    """The events of one remote generation, iterated with `for` (httpx's client) or `async for` (its async client),
    as a local model's stream is; `cancel()` and `end_thinking()` from anywhere; `close()` / `aclose()` close the HTTP
    stream, and the engine stops generating. The request goes out when the first event is asked for (or, for
    `async for`, at `await stream.wait_started()`), and the endpoint's refusal (a prompt too long, a wrong key) raises
    there."""

    def __init__(self, model: RemoteModel, path: str, body: dict[str, Any], turn: Turn,
                 messages: list[Any] | None = None, tools: list[Any] | None = None,
                 answer_format: AnswerFormat | None = None) -> None:
        super().__init__(model, path, body, turn, messages, tools, answer_format)
        self.finished = False
        self._response: httpx.Response | None = None  # the HTTP stream being read (either client's)
        self._client: httpx.AsyncClient | None = None  # `async for`: one client per stream, on its event loop
        self._events: Iterator[Event] | None = None
        self._aevents: AsyncIterator[Event] | None = None

    def close(self) -> None:
        self._cancel.set()
        if self._events is not None:
            self._events.close()
        if self._response is not None and self._client is None:
            self._response.close()
        self.finished = True

    async def aclose(self) -> None:
        self._cancel.set()
        if self._aevents is not None:
            await self._aevents.aclose()  # type: ignore[attr-defined]
        await self._aclose_http()
        self.finished = True

    # --- for ---------------------------------------------------------------------------------------------------

    def __iter__(self) -> RemoteStream:
        return self

    def __next__(self) -> Event:
        if self._events is None:
            self._check_one_way(self._aevents)
            self._events = self._run()
        return next(self._events)

    def _open(self) -> httpx.Response:
        http = self.model._http
        response = send(http, http.build_request("POST", self.path, json=self.body), self.where, stream=True)
        if response.status_code >= 400:
            response.read()
            response.close()
            raise status_error(response, self.where)
        self.model._track(self, True)
        return response

    def _run(self) -> Iterator[Event]:
        try:
            self._response = self._open()
            ending = yield from self._stream(self._response)
            if ending == "budget":
                yield from self._continuation()
                self._response = self._open()
                ending = yield from self._stream(self._response)
            if self._prompt_uncounted():
                self._count_prompt()
            yield from self._done(ending)
        finally:
            if self._response is not None:
                self._response.close()
            self.model._track(self, False)
            self.finished = True

    def _stream(self, response: httpx.Response) -> Generator[Event, None, Ending]:
        try:
            for line in response.iter_lines():
                events, ending = self._read(line)
                yield from events
                if ending is not None:
                    return ending
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.where) from None
        finally:
            response.close()
        return "cancelled" if self._cancel.is_set() else "stop"

    # --- async for -----------------------------------------------------------------------------------------------

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> Event:
        if self._aevents is None:
            self._check_one_way(self._events)
            self._aevents = self._arun()
        return await self._aevents.__anext__()

    async def wait_started(self) -> None:
        """Send the request and wait for the engine's answer to begin; raise what the endpoint refused it with."""
        if self._response is None and not self.finished:
            self._response = await self._aopen()

    async def _aopen(self) -> httpx.Response:
        if self._client is None:
            http = self.model._http
            self._client = httpx.AsyncClient(base_url=http.base_url, headers=http.headers, timeout=http.timeout)
        try:
            response = await self._client.send(self._client.build_request("POST", self.path, json=self.body),
                                               stream=True)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.where) from None
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise status_error(response, self.where)
        self.model._track(self, True)
        return response

    async def _arun(self) -> AsyncIterator[Event]:
        try:
            await self.wait_started()
            ending: Ending = "stop"
            async for item in self._astream():
                if isinstance(item, Event):
                    yield item
                else:
                    ending = item
            if ending == "budget":
                for event in await asyncio.to_thread(self._continuation):  # the endpoint's tokenizer: blocking calls
                    yield event
                self._response = await self._aopen()
                async for item in self._astream():
                    if isinstance(item, Event):
                        yield item
                    else:
                        ending = item
            if self._prompt_uncounted():
                await asyncio.to_thread(self._count_prompt)
            for event in self._done(ending):
                yield event
        finally:
            await self._aclose_http()
            self.model._track(self, False)
            self.finished = True

    async def _astream(self) -> AsyncIterator[Event | Ending]:
        """The events of the HTTP stream being read, then how it ended."""
        assert self._response is not None
        try:
            async for line in self._response.aiter_lines():
                events, ending = self._read(line)
                for event in events:
                    yield event
                if ending is not None:
                    yield ending
                    return
            yield "cancelled" if self._cancel.is_set() else "stop"
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.where) from None
        finally:
            await self._response.aclose()

    async def _aclose_http(self) -> None:
        if self._response is not None and self._client is not None:
            await self._response.aclose()
        if self._client is not None:
            await self._client.aclose()

    def _check_one_way(self, other: object) -> None:
        if other is not None:
            raise RuntimeError("a stream is read with `for` or with `async for`, not both")
