"""The HTTP app over one loaded Model (FastAPI + uvicorn): the server's state, error handling, metrics, and the
routes of each dialect (a module of wire format over the model's events: openai.py, responses.py, anthropic.py,
ollama.py) and the utility routes.

One generation at a time; up to `max_queue` requests wait, more get 503 with Retry-After. A client that disconnects
(streaming or not, queued or running) stops its generation at the next token. Errors have OpenAI's shape
{"error": {"message", "type", "param", "code"}} except under the paths of a dialect with its own (ERROR_SHAPES).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from localqwen.model import Model
from localqwen.server import anthropic, metrics, ollama, openai, responses, utility
from localqwen.server.http import APIError, api_error
from localqwen.server.runs import ClientGone, Scheduler
from localqwen.server.state import REASONING_FORMATS, ServerState
from localqwen.web import install_web

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Errors under these paths take that dialect's shape (whatever raised them: the route, the key check, a 404).
ERROR_SHAPES = ((anthropic.PATH_PREFIX, anthropic.error_response), (ollama.PATH_PREFIX, ollama.error_response))


def create_app(model: Model, *, api_key: str | None = None, reasoning_format: str = "deepseek",
               model_id: str | None = None, max_queue: int = 8, max_body_bytes: int = 4 << 20,
               cors_origins: Sequence[str] = ()) -> FastAPI:
    """The API for `model`, and the web chat page at `/`. reasoning_format: "deepseek" (reasoning_content) or
    "none" (<think> in content). cors_origins: other sites' pages allowed to call the API (localqwen.web.guard)."""
    if reasoning_format not in REASONING_FORMATS:
        raise ValueError(f"reasoning_format must be 'deepseek' or 'none', not {reasoning_format!r}")
    scheduler = Scheduler(model, max_queue)
    meter = metrics.Metrics(scheduler)
    server = ServerState(model, model_id or model.path.stem, scheduler, api_key=api_key,
                         reasoning_format=reasoning_format, max_body_bytes=max_body_bytes, observer=meter.watch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if server.scheduler.slot.locked():
            model.cancel()  # shutting down: the running generation ends now, its worker thread with it

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


def serve(model: Model, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          reasoning_format: str = "deepseek", cors_origins: Sequence[str] = ()) -> None:
    """Serve the API and the chat page until Ctrl+C (loopback only by default)."""
    app = create_app(model, api_key=api_key, reasoning_format=reasoning_format, cors_origins=cors_origins)
    shown = f"[{host}]" if ":" in host else host
    print(f"localqwen: serving {model.path.stem} (context {model.n_ctx}) at http://{shown}:{port}/v1, "
          f"chat page at http://{shown}:{port}/", flush=True)
    if api_key is None and host not in LOOPBACK:
        print("localqwen: warning: listening beyond this machine without an API key (--api-key)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3)
