"""The OpenAI-compatible HTTP API over one loaded Model (FastAPI + uvicorn): the app, its one-at-a-time scheduler
and the thread that runs each generation. The wire format (request models, errors, deltas) is localqwen.openai_api.

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
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from localqwen.constants import DEFAULT_MAX_TOKENS
from localqwen.events import Event
from localqwen.model import Model
from localqwen.openai_api import (
    REASONING_EFFORT,
    APIError,
    ChatOutput,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    Message,
    NamedToolChoice,
    api_error,
    check_json,
    check_text,
    sse,
    usage,
    validation_error,
)
from localqwen.web import install_web

T = TypeVar("T")
RETRY_AFTER_S = 2
R = TypeVar("R", bound=GenerationRequest)


class TokenizeRequest(BaseModel):
    messages: list[Message] | None = None
    content: str | None = None


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


# --- the app -----------------------------------------------------------------------------------------------------

def create_app(model: Model, *, api_key: str | None = None, reasoning_format: str = "deepseek",
               model_id: str | None = None, max_queue: int = 8, max_body_bytes: int = 4 << 20,
               cors_origins: Sequence[str] = ()) -> FastAPI:
    """The API for `model`, and the web chat page at `/`. reasoning_format: "deepseek" (reasoning_content) or
    "none" (<think> in content). cors_origins: other sites' pages allowed to call the API (localqwen.web.guard)."""
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

    # Stand-in for the lead's /props and /tokenize (main will carry the real ones): just what the web page needs.
    @app.get("/props")
    async def props() -> dict[str, Any]:
        defaults = model.sampling.to_dict()
        return {"model": model_id, "context_length": model.n_ctx,
                "sampling": {k: defaults[k] for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty")},
                "max_tokens": DEFAULT_MAX_TOKENS, "reasoning_effort": REASONING_EFFORT, "answer_now": False,
                "api_key_required": api_key is not None}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        authorize(request)
        try:
            body = TokenizeRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise validation_error(exc) from None
        if body.messages is not None:
            tokens = model.tokenize_chat([m.for_template() for m in body.messages])
        else:
            tokens = model.llama.tokenize((body.content or "").encode(), add_bos=False, special=False)
        return {"tokens": tokens, "count": len(tokens)}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "generating": scheduler.slot.locked(),
                "waiting": scheduler.waiting}

    install_web(app, cors_origins)
    return app


def serve(model: Model, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          reasoning_format: str = "deepseek", cors_origins: Sequence[str] = ()) -> None:
    """Serve the API and the chat page until Ctrl+C (loopback only by default)."""
    app = create_app(model, api_key=api_key, reasoning_format=reasoning_format, cors_origins=cors_origins)
    shown = f"[{host}]" if ":" in host else host
    print(f"localqwen: serving {model.path.stem} (context {model.n_ctx}) at http://{shown}:{port}/v1, "
          f"chat page at http://{shown}:{port}/", flush=True)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print("localqwen: warning: listening beyond this machine without an API key (--api-key)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3)
