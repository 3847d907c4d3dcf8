"""The HTTP app over one loaded Model (FastAPI + uvicorn): the server's state, error handling, metrics, and the
routes of each dialect (a module of wire format over the model's events: openai.py, responses.py, anthropic.py,
ollama.py) and the utility routes.

Up to the model's `parallel` generations run together (engine.py batches them); up to `max_queue` more wait,
beyond that a 503 with Retry-After. A client that disconnects
(streaming or not, queued or running) stops its generation at the next token. Errors have OpenAI's shape
{"error": {"message", "type", "param", "code"}} except under the paths of a dialect with its own (ERROR_SHAPES).
"""

from __future__ import annotations

import contextlib
import threading
import time
import webbrowser
from collections.abc import AsyncIterator, Sequence

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from localqwen.model import Model
from localqwen.remote import RemoteModel
from localqwen.server import anthropic, metrics, ollama, openai, responses, utility
from localqwen.server.agent import install_agent
from localqwen.server.http import APIError, api_error
from localqwen.server.runs import ClientGone, Scheduler
from localqwen.server.state import REASONING_FORMATS, ServerState
from localqwen.tools import Tool
from localqwen.web import install_web

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Errors under these paths take that dialect's shape (whatever raised them: the route, the key check, a 404).
ERROR_SHAPES = ((anthropic.PATH_PREFIX, anthropic.error_response), (ollama.PATH_PREFIX, ollama.error_response))


def create_app(model: Model | RemoteModel, *, api_key: str | None = None, reasoning_format: str = "deepseek",
               model_id: str | None = None, max_queue: int = 8, max_body_bytes: int = 4 << 20,
               cors_origins: Sequence[str] = (), tools: Sequence[Tool] = ()) -> FastAPI:
    """The API for `model` (a local one, or a RemoteModel: the engine behind it runs the generations), and the web
    chat page at `/`. reasoning_format: "deepseek" (reasoning_content) or "none" (<think> in content). cors_origins:
    other sites' pages allowed to call the API (localqwen.web.guard). tools: what the page's tool loop may call
    (server/agent.py), e.g. MCP servers' tools."""
    if reasoning_format not in REASONING_FORMATS:
        raise ValueError(f"reasoning_format must be 'deepseek' or 'none', not {reasoning_format!r}")
    scheduler = Scheduler(model, max_queue)
    meter = metrics.Metrics(scheduler)
    server = ServerState(model, model_id or model_name(model), scheduler, api_key=api_key,
                         reasoning_format=reasoning_format, max_body_bytes=max_body_bytes, observer=meter.observe)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        model.cancel()  # shutting down: running and waiting generations end now

    app = FastAPI(title="localqwen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server, app.state.metrics = server, meter
    app.add_middleware(metrics.CountRequests, metrics=meter)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_error)
    for dialect in (openai, responses, anthropic, ollama, utility, metrics):
        app.include_router(dialect.router)
    install_agent(app, tools)
    install_web(app, cors_origins, root_text=ollama.ROOT_TEXT, refusal=guard_refusal)
    return app


def error_response(request: Request, err: APIError) -> Response:
    return error_for_path(request.url.path, err)


def error_for_path(path: str, err: APIError) -> Response:
    for prefix, render in ERROR_SHAPES:
        if path.startswith(prefix):
            return render(err)
    return err.response()


def guard_refusal(path: str, status: int, message: str, code: str) -> Response:
    """The web guard's refusals (another site's page, a body that is not JSON) in the shape of the path's dialect."""
    return error_for_path(path, APIError(status, message, code=code))


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(request, exc)


async def on_client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody is listening


async def on_error(request: Request, exc: Exception) -> Response:
    return error_response(request, api_error(exc))  # uvicorn still logs the traceback of an unexpected one


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(request, APIError(exc.status_code, str(exc.detail), headers=exc.headers,
                                            code="not_found" if exc.status_code == 404 else None))


def model_name(model: Model | RemoteModel) -> str:
    return model.model_id if isinstance(model, RemoteModel) else model.path.stem


def serve(model: Model | RemoteModel, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          reasoning_format: str = "deepseek", cors_origins: Sequence[str] = (), tools: Sequence[Tool] = (),
          open_page: bool = False) -> None:
    """Serve the API and the chat page until Ctrl+C (loopback only by default); `open_page`: open the page in the
    browser once the server answers."""
    app = create_app(model, api_key=api_key, reasoning_format=reasoning_format, cors_origins=cors_origins,
                     tools=tools)
    page = page_url(host, port)
    upstream = f" from {model.url}" if isinstance(model, RemoteModel) else ""
    print(f"localqwen: serving {model_name(model)}{upstream} (context {model.n_ctx}) at {page}v1, chat page at {page}",
          flush=True)
    if api_key is None and host not in LOOPBACK:
        print("localqwen: warning: listening beyond this machine without an API key (--api-key)", flush=True)
    if open_page:
        threading.Thread(target=open_when_up, args=(page,), daemon=True).start()
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3)


def page_url(host: str, port: int) -> str:
    """The chat page's address (a server listening on every address is reached on loopback)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def running_at(page: str) -> bool:
    """Is a localqwen server answering there?"""
    try:
        return httpx.get(f"{page}health", timeout=2).json().get("status") == "ok"
    except (httpx.HTTPError, ValueError):
        return False


def open_when_up(page: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not running_at(page):
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    webbrowser.open(page)
