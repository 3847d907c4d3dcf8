"""Keep other web sites from driving the local model through a user's browser.

A page on any site can send requests to http://127.0.0.1:8000 from its visitors' browsers. CORS only stops it from
reading the answers; the request itself (and the generation it starts) still happens. So the server refuses, before
anything runs:

- a request whose `Origin` header names another site than the server's own page, unless `--cors ORIGIN` allows
  it. The own origin counts only when the page was reached by an IP address or a `localhost` name: a site that
  rebinds its own DNS name to 127.0.0.1 (DNS rebinding) is same-origin with itself, never with those;
- a POST whose body is not declared as JSON: an HTML form, or a "simple" fetch without CORS, can only send
  `text/plain`, form encodings or no type at all (a browser that does not send `Origin` is still stopped here).

Allowed origins get their CORS answers (preflights included) from Starlette's CORSMiddleware, inside this guard.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send


def parse_origin(value: str) -> str:
    """`scheme://host[:port]` as browsers send it in `Origin` (lower case, no default port, no path);
    ValueError for anything else."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{value!r} is not an origin: give scheme://host[:port], e.g. http://localhost:5173")
    default_port = {"http": 80, "https": 443}[parts.scheme]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = "" if parts.port in (None, default_port) else f":{parts.port}"
    return f"{parts.scheme}://{host}{port}"


def cannot_be_rebound(hostname: str) -> bool:
    """An IP address, or a name browsers resolve to loopback themselves: no other site can take it over."""
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        return False
    return True


# (path, status, message, code) -> the error response: the server renders it in the shape of the path's dialect.
Refusal = Callable[[str, int, str, str], Response]


def openai_refusal(path: str, status: int, message: str, code: str) -> Response:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}},
                        status_code=status)


def is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "application/json"


class OriginGuard:
    """ASGI middleware: the two refusals of the module docstring, in OpenAI's error shape."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str], refusal: Refusal = openai_refusal) -> None:
        self.app, self.refusal = app, refusal
        self.allowed_origins = frozenset(allowed_origins)

    def allows(self, origin: str, scope: Scope, headers: Headers) -> bool:
        if origin in self.allowed_origins:
            return True
        host = headers.get("host", "")
        own = f"{scope.get('scheme', 'http')}://{host}".lower()
        return origin.lower() == own and cannot_be_rebound(urlsplit(own).hostname or "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and not self.allows(origin, scope, headers):
            await self.refusal(scope["path"], 403, f"requests from pages at {origin} are refused; to allow that site, "
                               f"start the server with --cors {origin}", "origin_not_allowed")(scope, receive, send)
            return
        if scope["method"] == "POST" and not is_json(headers.get("content-type")):
            given = headers.get("content-type") or "none"
            await self.refusal(scope["path"], 415, f"send the request body as JSON with 'Content-Type: "
                               f"application/json' (the request had {given})", "unsupported_media_type")(scope, receive,
                                                                                                         send)
            return
        await self.app(scope, receive, send)
