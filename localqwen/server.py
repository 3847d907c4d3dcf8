"""The OpenAI-compatible HTTP API over one loaded Model (FastAPI + uvicorn).

    POST /v1/chat/completions   thinking in `reasoning_content` (mirrored as `reasoning`), answer in `content`
    POST /v1/completions        a raw prompt (special tokens allowed: it is the caller's prompt), no thinking split
    GET  /v1/models, GET /health

Choices, for clients to rely on:
- One model: any `model` name in a request is accepted; responses name the loaded model (`model_id`).
- `reasoning_format="none"` leaves the thinking in `content` as `<think>\\n...\\n</think>\\n\\n` + answer (what
  Qwen-Agent's `thought_in_content` expects).
- Tool calls become `tool_calls` only when the request passed tools (and tool_choice is not "none"). Otherwise, and
  for a call that is not valid JSON with a name and object arguments, the model's `<tool_call>` text stays in
  `content` and does not make finish_reason "tool_calls". Forced or "required" tool choices are passed on as tools;
  the model is not constrained.
- `stop` applies to the answer, never to the thinking; the stop text is trimmed and generation ends at once.
- Thinking budget: `thinking_budget` (tokens), else `reasoning_effort` (none 0, minimal 256, low 1024, medium 8192,
  high unlimited).
- One generation at a time; up to `max_queue` requests wait, more get 503 with Retry-After. A client that
  disconnects (streaming or not, queued or running) stops its generation at the next token.
- Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Literal, TypeVar

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from localqwen.errors import LocalqwenError
from localqwen.events import Event, Stats
from localqwen.model import ContextOverflow, Model

T = TypeVar("T")
RETRY_AFTER_S = 2
REASONING_EFFORT = {"none": 0, "minimal": 256, "low": 1024, "medium": 8192, "high": None}
# Deeper request JSON is refused (400) before it is parsed (see check_json).
MAX_JSON_DEPTH = 100
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes and all
NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


# --- requests ------------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # wrong types are errors; unknown fields are ignored


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # Ollama's name for reasoning_content
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True, exclude={"reasoning"})
        out["role"] = "system" if self.role == "developer" else self.role
        if self.reasoning_content is None and self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        return out


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: dict[str, str]


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None

    def sampling(self) -> dict[str, Any]:
        names = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "seed")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    thinking_budget: int | None = Field(None, ge=0)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str]


R = TypeVar("R", bound=GenerationRequest)


# --- errors ------------------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


def api_error(exc: BaseException) -> APIError:
    """The HTTP error for an exception from starting or running a generation."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflow):
        return APIError(400, exc.message, param="messages", code="context_length_exceeded")
    if isinstance(exc, LocalqwenError):
        return APIError(400, exc.message)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


def json_depth(body: bytes) -> int:
    """How deeply a JSON text nests its arrays and objects, found without parsing it (so without recursion):
    strings dropped, then a running count of the brackets left."""
    brackets = JSON_STRING.sub(b"", body).translate(None, NOT_BRACKETS)
    if not brackets:
        return 0
    opens = np.frombuffer(brackets, np.uint8) & 2  # "[" and "{" have bit 1 set, "]" and "}" do not
    return int(np.cumsum(opens.astype(np.int32) - 1).max())


def check_json(body: bytes) -> None:
    """Refuse, before json.loads, a body nested deeper than MAX_JSON_DEPTH. Deeper JSON sends the decoder (and the
    prompt's rendering) deep into recursion: a RecursionError (a 500), and any garbage collection that runs down
    there calls finalizers with no stack left (llama-cpp-python's samplers then fail to free their memory: a leak)."""
    if json_depth(body) > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")


def check_text(data: Any, body: bytes) -> None:
    """Refuse strings with lone surrogates, which JSON's \\ud800 escapes allow but UTF-8 cannot encode (a
    UnicodeEncodeError, a 500, when they are tokenized). `body` tells whether there is such an escape at all."""
    if not SURROGATE_ESCAPE.search(body):
        return
    try:
        json.dumps(data, ensure_ascii=False).encode()  # json.loads joins valid surrogate pairs: only lone ones fail
    except UnicodeEncodeError:
        raise APIError(400, "the request body has a string that is not valid Unicode (a lone surrogate)",
                       code="invalid_json") from None


def validation_error(exc: ValidationError) -> APIError:
    """The first few problems in the message; `param` names the first one's field."""
    errors = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()[:3]]
    return APIError(400, "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in errors), param=errors[0][0] or None)


# --- generation across the thread boundary -----------------------------------------------------------------------

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
    """Server-sent events whose generation stops however the response ends (done, disconnect, error)."""

    def __init__(self, body: AsyncIterator[bytes], generation: Generation) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.stop()


def sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


# --- events to OpenAI deltas -------------------------------------------------------------------------------------

class StopFilter:
    """Cut text at the first stop string, holding back any tail that could still become one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        text, self.held = self.held + text, ""
        cuts = [i for s in self.stops if (i := text.find(s)) >= 0]
        if cuts:
            self.hit = True
            return text[:min(cuts)]
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class ChatOutput:
    """Turns a generation's events into OpenAI deltas: streamed one by one, or joined into one message."""

    def __init__(self, *, think_in_content: bool, parse_tools: bool, stops: list[str]) -> None:
        self.think_in_content, self.parse_tools = think_in_content, parse_tools
        self.stop = StopFilter(stops)
        self.think_state: Literal["before", "open", "closed"] = "before"
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.stats: Stats | None = None

    @property
    def stopped(self) -> bool:
        return self.stop.hit

    def feed(self, event: Event) -> list[dict[str, Any]]:
        if event.kind == "done":
            self.stats = event.stats
            done = [] if self.stopped or (event.stats and event.stats.truncated_thinking) else self._close_think()
            return done + self._content(self.stop.flush())
        if self.stopped:
            return []
        if event.kind == "thinking":
            if self.think_in_content:
                return self._open_think() + self._content(event.text)
            self.reasoning.append(event.text)
            return [{"reasoning_content": event.text, "reasoning": event.text}]
        if event.kind == "content":
            return self._answer(event.text)
        call = event.tool_call
        if call is None:
            return []
        if not (self.parse_tools and call.error is None):
            separator = "\n" if self.content and not self.content[-1].endswith("\n") else ""
            return self._answer(f"{separator}<tool_call>\n{call.raw}\n</tool_call>")
        deltas = self._close_think() + self._content(self.stop.flush())
        self.tool_calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": {
            "name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}})
        return [*deltas, {"tool_calls": [{"index": len(self.tool_calls) - 1, **self.tool_calls[-1]}]}]

    def _answer(self, text: str) -> list[dict[str, Any]]:
        return self._close_think() + self._content(self.stop.feed(text))

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        self.content.append(text)
        return [{"content": text}]

    def _open_think(self) -> list[dict[str, Any]]:
        if not self.think_in_content or self.think_state != "before":
            return []
        self.think_state = "open"
        return self._content("<think>\n")

    def _close_think(self) -> list[dict[str, Any]]:
        if not self.think_in_content or self.think_state == "closed":
            return []
        opened = self._open_think()
        self.think_state = "closed"
        return opened + self._content("\n</think>\n\n")

    @property
    def finish_reason(self) -> str:
        if self.stopped:
            return "stop"
        if self.stats is not None and self.stats.finish_reason == "length":
            return "length"
        return "tool_calls" if self.tool_calls else "stop"

    def message(self) -> dict[str, Any]:
        content = "".join(self.content)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if self.tool_calls else "")}
        if not self.think_in_content:
            message["reasoning_content"] = message["reasoning"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


def usage(stats: Stats | None) -> dict[str, Any]:
    stats = stats or Stats(finish_reason="cancelled")
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens},
            "completion_tokens_details": {"reasoning_tokens": stats.thinking_tokens}}


# --- the app -----------------------------------------------------------------------------------------------------

def create_app(model: Model, *, api_key: str | None = None, reasoning_format: str = "deepseek",
               model_id: str | None = None, max_queue: int = 8, max_body_bytes: int = 4 << 20) -> FastAPI:
    """The API for `model`. reasoning_format: "deepseek" (reasoning_content) or "none" (<think> in content)."""
    if reasoning_format not in ("deepseek", "none"):
        raise ValueError(f"reasoning_format must be 'deepseek' or 'none', not {reasoning_format!r}")
    model_id = model_id or model.path.stem
    scheduler = Scheduler(model, max_queue)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if scheduler.slot.locked():
            model.cancel()  # shutting down: the running generation ends now, its worker thread with it

    app = FastAPI(title="localqwen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def on_client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody is listening

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return api_error(exc).response()  # uvicorn still logs the traceback

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                        headers=exc.headers).response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read(request: Request, kind: type[R]) -> R:
        authorize(request)
        length = request.headers.get("content-length", "")
        too_big = APIError(413, f"the request body is larger than {max_body_bytes} bytes", code="request_too_large",
                           headers={"Connection": "close"})
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise too_big
        check_json(body)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
        except RecursionError:  # not expected after check_json; still a bad request, not a server error
            raise APIError(400, "the request body nests too deeply", code="invalid_json") from None
        check_text(data, body)
        try:
            parsed = kind.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if parsed.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        return parsed

    def chunk_base(kind: str) -> dict[str, Any]:
        return {"id": f"{kind}-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_id}

    async def collect(generation: Generation, output: ChatOutput) -> None:
        while (event := await generation.next()) is not None:
            output.feed(event)
            if output.stopped:
                generation.stop()

    async def respond(request: Request, req: GenerationRequest, output: ChatOutput,
                      start: Callable[[], Iterator[Event]], kind: Literal["chat", "text"]) -> Response:
        generation = await scheduler.start(request, start)
        base = chunk_base("chatcmpl" if kind == "chat" else "cmpl")
        if not req.stream:
            try:
                await until_disconnected(request, collect(generation, output))
            finally:
                generation.stop()
            if kind == "chat":
                choice = {"index": 0, "message": output.message(), "logprobs": None,
                          "finish_reason": output.finish_reason}
            else:
                choice = {"index": 0, "text": "".join(output.content), "logprobs": None,
                          "finish_reason": output.finish_reason}
            stats = output.stats
            return JSONResponse({**base, "object": "chat.completion" if kind == "chat" else "text_completion",
                                 "choices": [choice], "usage": usage(stats), "timings": stats.timings if stats else {}})
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            if kind == "chat":
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                return sse({**base, "object": "chat.completion.chunk", "choices": [choice], **extra})
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish_reason}
            return sse({**base, "object": "text_completion", "choices": [choice], **extra})

        async def body() -> AsyncIterator[bytes]:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            try:
                while (event := await generation.next()) is not None:
                    for delta in output.feed(event):
                        yield chunk(delta)
                    if output.stopped:
                        generation.stop()
            except Exception as exc:  # after the headers went out, an error can only be an event
                yield sse(api_error(exc).body())
            else:
                yield chunk({}, output.finish_reason)
                if include_usage:
                    yield sse({**base, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                               "choices": [], "usage": usage(output.stats)})
            yield b"data: [DONE]\n\n"

        return EventStream(body(), generation)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await read(request, ChatRequest)
        messages = [m.for_template() for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
        if isinstance(req.tool_choice, NamedToolChoice):
            name = req.tool_choice.function.get("name")
            if name not in {t["function"]["name"] for t in tools}:
                raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        budget = req.thinking_budget
        if budget is None and req.reasoning_effort is not None:
            budget = REASONING_EFFORT[req.reasoning_effort]
        max_tokens = req.max_completion_tokens or req.max_tokens
        sampling = req.sampling()

        def start() -> Iterator[Event]:
            return model.chat(messages, tools=tools or None, max_tokens=max_tokens, thinking_budget=budget, **sampling)

        output = ChatOutput(think_in_content=reasoning_format == "none", parse_tools=bool(tools), stops=req.stops())
        return await respond(request, req, output, start, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await read(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if isinstance(prompt, list) and not all(0 <= t < model.llama.n_vocab() for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {model.llama.n_vocab()})", param="prompt")
        max_tokens = req.max_completion_tokens or req.max_tokens
        sampling = req.sampling()

        def start() -> Iterator[Event]:
            tokens = model.llama.tokenize(prompt.encode(), add_bos=False, special=True) \
                if isinstance(prompt, str) else list(prompt)
            return model.generate(tokens, thinking=False, max_tokens=max_tokens, **sampling)

        output = ChatOutput(think_in_content=False, parse_tools=False, stops=req.stops())
        return await respond(request, req, output, start, "text")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "localqwen", "context_length": model.n_ctx}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "generating": scheduler.slot.locked(),
                "waiting": scheduler.waiting}

    return app


def serve(model: Model, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          reasoning_format: str = "deepseek") -> None:
    """Serve the API until Ctrl+C (loopback only by default)."""
    app = create_app(model, api_key=api_key, reasoning_format=reasoning_format)
    shown = f"[{host}]" if ":" in host else host
    print(f"localqwen: serving {model.path.stem} (context {model.n_ctx}) at http://{shown}:{port}/v1", flush=True)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print("localqwen: warning: listening beyond this machine without an API key (--api-key)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3)
