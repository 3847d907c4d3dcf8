"""The web chat page of `localqwen serve`: served at `/`, its assets under `/static/`, all inside the package.

The page talks to the server's own API (/props, /tokenize, /v1/chat/completions). Its assets are plain files:
our ES modules in static/js/ and the libraries in static/vendor/ (vendored by scripts/vendor_web.py, versions and
licences in static/vendor/VERSIONS.json). `install_web` adds the page and the cross-origin guard to an app.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localqwen.web.guard import OriginGuard, Refusal, openai_refusal, parse_origin

STATIC = Path(str(resources.files("localqwen.web") / "static"))

# Model output and imported conversations are untrusted. Besides sanitising them, the page may run only its own
# scripts, load nothing from elsewhere, and (Trusted Types) put HTML into the document only through DOMPurify's
# policy: a string that skipped the sanitiser cannot reach innerHTML at all.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self'", "connect-src 'self'",
    "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    "require-trusted-types-for 'script'", "trusted-types dompurify",
])
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidate: an upgraded package serves new assets at the same URLs
}


class WithHeaders:
    """ASGI wrapper that adds `headers` to every response of `app`."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]) -> None:
        self.app = app
        self.raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.raw]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_web(app: FastAPI, cors_origins: Iterable[str] = (), root_text: str = "",
                refusal: Refusal = openai_refusal) -> None:
    """Serve the chat page at `/` and guard the API against other sites' pages (see localqwen.web.guard).
    `cors_origins`: sites allowed to call the API from a browser (`--cors ORIGIN`); ValueError for a malformed one.
    `root_text`: what `/` answers a client that does not ask for HTML (an app probing for an API); `refusal`
    renders the guard's errors."""
    origins = [parse_origin(origin) for origin in cors_origins]

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page(request: Request) -> Response:
        if "text/html" not in request.headers.get("accept", "") and root_text:
            return PlainTextResponse(root_text)
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", WithHeaders(StaticFiles(directory=STATIC), PAGE_HEADERS), name="static")
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           allow_private_network=True)  # Chrome asks before a public site may reach loopback
    # Added last, so outermost: it refuses before CORS answers.
    app.add_middleware(OriginGuard, allowed_origins=origins, refusal=refusal)
