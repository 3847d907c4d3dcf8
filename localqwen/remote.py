"""The remote backend: localqwen's generation interface over an OpenAI-compatible endpoint.

    model = RemoteModel.connect("http://gpu-box:8000", api_key="...")   # vLLM, llama-server, localqwen serve, ...
    for event in model.chat([{"role": "user", "content": "Hi"}]):
        print(event.kind, event.text)

`RemoteModel` has the events, the `chat`/`generate` signatures, `tokenize_chat`, `n_ctx` and `sampling` of
`localqwen.model.Model`, so the terminal chat, `run`, the Python API and `serve --upstream` work through it. What
the engines do differently is normalised here:

- Thinking arrives as `reasoning_content` (llama.cpp, localqwen), `reasoning` (vLLM), or left in `content` up to
  `</think>` (an engine without a reasoning parser, or localqwen's `--reasoning-format none`). Which one a stream
  uses is decided by what it sends first: a reasoning field, or content holding `</think>`. Until then content is
  held back, so a reply without thinking is only shown when its stream ends.
- Tool calls arrive as `tool_calls` deltas (assembled and parsed when the stream ends) or as `<tool_call>` text in
  the content (parsed as localqwen's own runtime does).
- Stop strings end the answer, never the thinking, as with a local model: localqwen's server applies them itself;
  for other engines (which match them in the thinking too) they are matched here and the stream is closed.
- Thinking budget: localqwen takes `thinking_budget`; llama-server takes `reasoning_budget_tokens` with the Qwen3
  report's wrap-up as its message; an engine without a per-request budget (vLLM) refuses the request rather than
  return a reply with no answer. With `max_tokens` alone, llama-server also gets localqwen's answer reserve.
- Token counts come from the engine's `usage`; thinking tokens from its `reasoning_tokens` where it counts them
  (localqwen), else one per streamed thinking delta (llama-server and vLLM send one delta per token).

Every failure to reach or use the endpoint is a one-line `RemoteError` naming it (its `status` is the HTTP status).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import httpx

from localqwen.constants import (
    NATIVE_CONTEXT,
    THINK_CLOSE,
    THINKING_BUDGET_WRAP_UP,
    tool_call_block,
)
from localqwen.errors import BadRequest, LocalqwenError, RemoteError
from localqwen.events import Event
from localqwen.generation import Limits, Turn, timings
from localqwen.sampling import Sampling

Engine = Literal["localqwen", "llamacpp", "vllm", "openai"]
# /v1/models' `owned_by` names the engine behind an endpoint.
ENGINES: dict[str, Engine] = {"localqwen": "localqwen", "llamacpp": "llamacpp", "vllm": "vllm"}
# What llama-server puts before `</think>` when a request's reasoning_budget_tokens run out: the Qwen3 report's
# wrap-up, laid out as localqwen's own runtime writes it (Model's WRAP_UP_TEXT without the closing tag).
LLAMACPP_BUDGET_MESSAGE = "\n\n" + THINKING_BUDGET_WRAP_UP
# A reply's thinking budget and answer reserve are planned as localqwen's runtime plans them; llama.cpp spends this
# many tokens on the wrap-up message and </think> (measured once on the endpoint; this is its usual size).
WRAP_UP_TOKENS = 25
CONNECT_TIMEOUT_S = 10.0
# Between two bytes of a reply: a CPU engine may think about a long prompt for minutes before its first token.
READ_TIMEOUT_S = 600.0
# Requests `serve --upstream` forwards at once: the engine batches them (more wait in localqwen's queue).
DEFAULT_CONCURRENCY = 8
HUGE = 1 << 62  # no limit of localqwen's own: the engine enforces max_tokens and its context


@dataclass(frozen=True)
class Endpoint:
    """What an endpoint says about itself: the engine, the served model's id, its context and vocabulary."""

    engine: Engine
    model_id: str
    n_ctx: int | None  # per request (per slot on llama-server); None when the endpoint does not say
    n_vocab: int | None
    sampling: Sampling  # the engine's defaults where it reports them, else the model card's


class RemoteModel:
    def __init__(self, url: str, http: httpx.Client, endpoint: Endpoint, *, timeout: float,
                 concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self.url, self.endpoint, self.timeout, self.concurrency = url, endpoint, timeout, concurrency
        self.model_id, self.sampling = endpoint.model_id, endpoint.sampling
        self._http = http
        self._streams: set[RemoteStream | AsyncRemoteStream] = set()
        self._streams_lock = threading.Lock()

    @classmethod
    def connect(cls, url: str, *, api_key: str | None = None, model: str | None = None,
                timeout: float = READ_TIMEOUT_S, concurrency: int = DEFAULT_CONCURRENCY) -> RemoteModel:
        """Connect to an OpenAI-compatible endpoint (with or without its /v1) and find the model it serves: `model`,
        or the only (else the first) one listed."""
        base = url.rstrip("/").removesuffix("/v1").rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise RemoteError("not an http:// or https:// URL", url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        http = httpx.Client(base_url=base, headers=headers,
                            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S),
                            limits=httpx.Limits(max_connections=concurrency + 4))
        try:
            endpoint = discover(http, base, model)
        except BaseException:
            http.close()
            raise
        return cls(base, http, endpoint, timeout=timeout, concurrency=concurrency)

    # --- what the front ends read -----------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self.endpoint.engine

    @property
    def n_ctx(self) -> int:
        """The context one request may fill; the model's native context when the endpoint does not say."""
        return self.endpoint.n_ctx or NATIVE_CONTEXT

    @property
    def context_known(self) -> bool:
        return self.endpoint.n_ctx is not None

    @property
    def n_vocab(self) -> int:
        return self.endpoint.n_vocab or HUGE  # unknown: the endpoint checks the ids itself

    @property
    def can_tokenize(self) -> bool:
        """Does the endpoint tokenize (localqwen, llama-server and vLLM do: /tokenize)?"""
        return self.engine != "openai"

    def describe(self, used: int) -> dict[str, str]:
        """Rows for the terminal chat's /show; `used`: the tokens the conversation takes."""
        return {"endpoint": f"{self.url} ({self.engine})", "model": self.model_id,
                "context": (f"{self.n_ctx} tokens, {used} in use" if self.context_known else
                            f"{used} tokens in use; the endpoint does not say its context: assumed {NATIVE_CONTEXT}, "
                            "the model's native one"),
                "tokens": "counted by the endpoint" if self.can_tokenize else
                          "the endpoint has no /tokenize: context use is taken from the last reply's usage"}

    # --- tokens ------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text` by the endpoint's tokenizer. vLLM's always reads special-token text as special."""
        if self.engine == "vllm":
            body: dict[str, Any] = {"model": self.model_id, "prompt": text, "add_special_tokens": False}
        else:
            body = {"content": text, "parse_special": special, "add_special": False}
        return self._tokens(self._post_json("/tokenize", body))

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        data = self._post_json("/detokenize", {"model": self.model_id, "tokens": list(tokens)})
        return str(data.get("content", data.get("prompt", "")))

    def tokenize_chat(self, messages: list[Any], tools: list[Any] | None = None) -> list[int]:
        """The prompt tokens the endpoint makes of `messages` with its chat template."""
        if self.engine == "llamacpp":  # its /tokenize takes text only: render with its template first
            prompt = self._post_json("/apply-template", {"messages": messages, "tools": tools or []})["prompt"]
            return self._tokens(self._post_json("/tokenize", {"content": prompt, "parse_special": True}))
        return self._tokens(self._post_json("/tokenize", {"model": self.model_id, "messages": messages,
                                                          "tools": tools, "add_generation_prompt": True}))

    def _tokens(self, data: dict[str, Any]) -> list[int]:
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise RemoteError("/tokenize gave no token list", self.url)
        return tokens

    # --- generation ----------------------------------------------------------------------------------------------

    def chat(self, messages: list[Any], *, tools: list[Any] | None = None, max_tokens: int | None = None,
             thinking_budget: int | None = None, answer_reserve: int | None = None, stop: str | list[str] | None = None,
             wait: float | None = None, **sampling: Any) -> RemoteStream:
        """Stream the reply to `messages` as events, as Model.chat does. The request is sent now: an error the
        endpoint answers with (a prompt too long, a wrong key) raises here. `wait` is accepted for Model's signature:
        the engine queues requests itself."""
        body, stops = self._chat_body(messages, tools, max_tokens, thinking_budget, answer_reserve, stop, sampling)
        return RemoteStream(self, "/v1/chat/completions", body, Turn(0, Limits(HUGE, HUGE), thinking=True,
                                                                     stops=stops), messages, tools)

    def generate(self, prompt: Sequence[int], *, max_tokens: int | None = None, thinking_budget: int | None = None,
                 answer_reserve: int | None = None, thinking: bool = True, stop: str | list[str] | None = None,
                 wait: float | None = None, **sampling: Any) -> RemoteStream:
        """A raw completion of prompt tokens (/v1/completions), as Model.generate; `thinking`: the prompt leaves the
        model inside `<think>`. Stop strings go to the engine (a raw prompt has no thinking apart)."""
        if thinking_budget is not None:
            raise BadRequest("a thinking budget needs a chat request: raw completions have no thinking apart")
        body = {"model": self.model_id, "prompt": list(prompt), "stream": True, **self._sampling_fields(sampling)}
        body.update({"stream_options": {"include_usage": True}} | ({"max_tokens": max_tokens} if max_tokens else {}))
        if stop:
            body["stop"] = stop
        return RemoteStream(self, "/v1/completions", body, Turn(len(prompt), Limits(HUGE, HUGE), thinking=thinking))

    def achat(self, messages: list[Any], **options: Any) -> AsyncRemoteStream:
        """`chat` for asyncio: an async iterator of the same events, with `cancel()` and `aclose()`. The request is
        sent on the first iteration (or `await stream.open()`)."""
        body, stops = self._chat_body(messages, options.pop("tools", None), options.pop("max_tokens", None),
                                      options.pop("thinking_budget", None), options.pop("answer_reserve", None),
                                      options.pop("stop", None), {k: v for k, v in options.items() if k != "wait"})
        return AsyncRemoteStream(self, "/v1/chat/completions", body, Turn(0, Limits(HUGE, HUGE), thinking=True,
                                                                          stops=stops))

    def cancel(self) -> None:
        """Stop every running stream of this backend (from any thread): each ends with finish reason "cancelled"."""
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.cancel()

    def close(self) -> None:
        self.cancel()
        self._http.close()

    def _chat_body(self, messages: list[Any], tools: list[Any] | None, max_tokens: int | None,
                   thinking_budget: int | None, answer_reserve: int | None, stop: str | list[str] | None,
                   sampling: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The request body for the engine, and the stop strings left for the client side."""
        if not messages:
            raise BadRequest("at least one message is needed")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        body: dict[str, Any] = {"model": self.model_id, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}, **self._sampling_fields(sampling)}
        if tools:
            body["tools"] = tools
        limits = Limits.for_reply(room=HUGE, max_tokens=max_tokens, thinking_budget=thinking_budget,
                                  answer_reserve=answer_reserve, wrap_up_tokens=WRAP_UP_TOKENS)  # checks the values
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if self.engine == "localqwen":  # the same semantics server-side: stop strings and budget go as they are
            body.update({"stop": stops} if stops else {})
            body.update({"thinking_budget": thinking_budget} if thinking_budget is not None else {})
            return body, []
        if self.engine == "llamacpp":
            if thinking_budget is not None or (max_tokens is not None and limits.thinking < limits.total):
                body["reasoning_budget_tokens"] = max(0, min(limits.thinking, limits.total))
                body["reasoning_budget_message"] = LLAMACPP_BUDGET_MESSAGE
        elif thinking_budget is not None:
            raise BadRequest(f"the {self.engine} endpoint {self.url} has no per-request thinking budget: leave "
                             "thinking_budget unset there (llama-server and localqwen serve have one)")
        return body, stops

    def _sampling_fields(self, sampling: dict[str, Any]) -> dict[str, Any]:
        """The sampling the caller set (checked as a local model checks it); unset ones are the engine's defaults."""
        self.sampling.with_overrides(**sampling)
        return {k: v for k, v in sampling.items() if v is not None}

    def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.url + path) from None
        return json_of(response, self.url + path)

    def _track(self, stream: RemoteStream | AsyncRemoteStream, running: bool) -> None:
        with self._streams_lock:
            (self._streams.add if running else self._streams.discard)(stream)


# --- streams -----------------------------------------------------------------------------------------------------

class ChunkReader:
    """One streamed completion's chunks -> localqwen events (pure: no I/O), through a generation.Turn.

    The engine's split is turned back into the model's raw text (thinking, `</think>`, answer, `<tool_call>` blocks)
    and fed to the Turn, so the parsing, the stop strings and the finish reasons are those of the local runtime.
    """

    def __init__(self, turn: Turn, chat: bool) -> None:
        self.turn, self.chat = turn, chat
        self.mode: Literal["unknown", "split", "raw"] = "unknown" if chat and turn.thinking else "raw"
        self.held: list[str] = []  # content deltas while the mode is unknown
        self.calls: dict[int, dict[str, Any]] = {}  # index -> {"name", "arguments" fragments}
        self.usage: dict[str, Any] = {}
        self.finish_reason: str | None = None
        self.stop_reason: Any = None  # vLLM: the stop string that ended the reply
        self.first_token_at: float | None = None

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        events: list[Event] = []
        for choice in chunk.get("choices") or []:
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            self.stop_reason = choice.get("stop_reason", self.stop_reason)
            if not self.chat:
                events += self._raw(choice.get("text") or "")
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")  # localqwen sends both
            if reasoning:
                events += self._reasoning(reasoning)
            for call in delta.get("tool_calls") or []:
                self._call_fragment(call)
            if delta.get("content"):
                events += self._content(delta["content"])
        return events

    def finish(self, reason: str) -> list[Event]:
        """The events still held at the end; `reason`: "cancelled" when the client stopped the stream."""
        events: list[Event] = []
        if self.mode == "unknown":  # content without `</think>` and no reasoning field: a reply without thinking
            events += self._decide("split")
        if self.calls:
            events += self._answer()
            for call in (self.calls[i] for i in sorted(self.calls)):
                raw = f'{{"name": {json.dumps(call["name"], ensure_ascii=False)}, "arguments": ' \
                      f'{"".join(call["arguments"]) or "{}"}}}'
                events += self.turn.forced(tool_call_block(raw), 0)
        stats = self.turn.stats
        if reason == "cancelled" or self.finish_reason == "length":
            self.turn.stop("cancelled" if reason == "cancelled" else "length")
        events += self.turn.finish()
        if self.stop_reason and isinstance(self.stop_reason, str) and stats.stop_sequence is None:
            stats.stop_sequence = self.stop_reason
        self._count(stats)
        return events

    def _count(self, stats: Any) -> None:
        """The engine's token counts where it sent them; the streamed thinking/answer split otherwise."""
        usage = self.usage
        if not usage:
            return
        stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        stats.cached_prompt_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
        thinking = min(reasoning or stats.thinking_tokens, completion)
        stats.thinking_tokens, stats.content_tokens = thinking, completion - thinking

    def _token(self, text: str) -> list[Event]:
        self.first_token_at = self.first_token_at or time.perf_counter()
        return self.turn.token(text.encode())

    def _raw(self, text: str) -> list[Event]:
        return self._token(text) if text else []

    def _reasoning(self, text: str) -> list[Event]:
        events = self._decide("split") if self.mode == "unknown" else []
        return events + self._token(text)  # (after the answer began it can only be shown as answer text)

    def _content(self, text: str) -> list[Event]:
        if self.mode == "unknown":
            self.held.append(text)
            return self._decide("raw") if THINK_CLOSE in "".join(self.held) else []
        if self.mode == "split":
            return self._answer() + self._token(text)
        return self._token(text)

    def _decide(self, mode: Literal["split", "raw"]) -> list[Event]:
        """Fix how this stream carries the thinking; replay the content held so far."""
        self.mode, held, self.held = mode, self.held, []
        events: list[Event] = []
        for text in held:
            events += self._content(text)
        return events

    def _answer(self) -> list[Event]:
        """Close the thinking (the engine cut `</think>` out) before the first answer text or tool call."""
        return self.turn.forced(THINK_CLOSE, 0) if self.turn.thinking else []

    def _call_fragment(self, call: dict[str, Any]) -> None:
        if self.mode == "unknown":
            self.mode = "split"
        slot = self.calls.setdefault(int(call.get("index") or 0), {"name": "", "arguments": []})
        function = call.get("function") or {}
        slot["name"] += function.get("name") or ""
        arguments = function.get("arguments")
        if isinstance(arguments, dict):  # some servers send the object, not its JSON text
            arguments = json.dumps(arguments, ensure_ascii=False)
        slot["arguments"].append(arguments or "")


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


# --- the endpoint --------------------------------------------------------------------------------------------------

def discover(http: httpx.Client, base: str, model: str | None) -> Endpoint:
    """Read /v1/models (and /props where the engine has it) into an Endpoint."""
    listed = get_json(http, base, "/v1/models").get("data")
    if not isinstance(listed, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in listed):
        raise RemoteError("/v1/models did not list models", base)
    if not listed:
        raise RemoteError("serves no model (/v1/models is empty)", base)
    ids = [m["id"] for m in listed]
    if model is not None and model not in ids:
        raise RemoteError(f"does not serve {model!r}: it serves {', '.join(ids)}", base)
    card = listed[ids.index(model)] if model is not None else listed[0]
    engine = ENGINES.get(str(card.get("owned_by")), "openai")
    meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}
    n_ctx = card.get("context_length") or card.get("max_model_len") or meta.get("n_ctx")
    props: dict[str, Any] = {}
    if engine in ("localqwen", "llamacpp"):
        props = get_json(http, base, "/props")
    return Endpoint(engine, card["id"], n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None,
                    meta.get("n_vocab") if isinstance(meta.get("n_vocab"), int) else None, engine_sampling(props))


def engine_sampling(props: dict[str, Any]) -> Sampling:
    """The sampling defaults /props reports (localqwen: `sampling`; llama.cpp: `default_generation_settings.params`);
    the model card's when there are none, or when they are not values localqwen accepts."""
    reported = props.get("sampling") or (props.get("default_generation_settings") or {}).get("params") or {}
    names = {f.name for f in fields(Sampling)} - {"seed"}
    try:
        return Sampling(**{k: v for k, v in reported.items() if k in names})
    except (BadRequest, TypeError):
        return Sampling()


def get_json(http: httpx.Client, base: str, path: str) -> dict[str, Any]:
    try:
        response = http.get(path)
    except httpx.HTTPError as exc:
        raise transport_error(exc, base + path) from None
    return json_of(response, base + path)


def json_of(response: httpx.Response, where: str) -> dict[str, Any]:
    if response.status_code >= 400:
        raise status_error(response, where)
    try:
        data = response.json()
    except ValueError:
        raise RemoteError(f"answered HTTP {response.status_code} with a body that is not JSON", where) from None
    if not isinstance(data, dict):
        raise RemoteError("answered with JSON that is not an object", where)
    return data


def error_message(body: Any) -> str:
    """The message of an error body: OpenAI's {"error": {"message"}}, vLLM's older {"message"}, FastAPI's
    {"detail"}."""
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or body.get("message") or body.get("detail")
        if message:
            return " ".join(str(message).split())[:300]
    return " ".join(str(body).split())[:300]


def status_error(response: httpx.Response, where: str) -> RemoteError:
    try:
        message = error_message(response.json())
    except ValueError:
        message = " ".join(response.text.split())[:300] or response.reason_phrase
    return RemoteError(f"HTTP {response.status_code}: {message}", where, response.status_code)


def transport_error(exc: httpx.HTTPError, where: str) -> RemoteError:
    """One line for each way a request fails before an HTTP status comes back."""
    if isinstance(exc, httpx.ConnectTimeout):
        why = f"no connection within {CONNECT_TIMEOUT_S:g} s"
    elif isinstance(exc, httpx.TimeoutException):
        why = "timed out waiting for the reply (the engine may be overloaded; raise the timeout)"
    elif isinstance(exc, httpx.ConnectError):
        why = f"cannot connect ({str(exc) or type(exc).__name__}): is the engine running there?"
    elif isinstance(exc, httpx.RemoteProtocolError):
        why = f"the connection broke off ({str(exc) or 'the server closed it'})"
    else:
        why = f"{type(exc).__name__}: {str(exc) or 'request failed'}"
    return RemoteError(" ".join(why.split()), where)
