"""Requests to an endpoint and their failures, each one line naming the endpoint (RemoteError)."""

from __future__ import annotations

from typing import Any

import httpx

from localqwen.errors import RemoteError

CONNECT_TIMEOUT_S = 10.0


def send(http: httpx.Client, request: httpx.Request, where: str, *, stream: bool = False) -> httpx.Response:
    """Send `request`; once more when the connection broke before any response came, the race of reusing a kept-alive
    connection the server was closing (llama-server drops idle ones after 5 s). Failures are RemoteErrors."""
    try:
        try:
            return http.send(request, stream=stream)
        except httpx.RemoteProtocolError:
            return http.send(request, stream=stream)  # the pool dropped that connection: this one is fresh
    except httpx.HTTPError as exc:
        raise transport_error(exc, where) from None


def get_json(http: httpx.Client, base: str, path: str) -> dict[str, Any]:
    return json_of(send(http, http.build_request("GET", path), base + path), base + path)


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
        body = response.json()
    except ValueError:
        message, code = " ".join(response.text.split())[:300] or response.reason_phrase, None
    else:
        error = body.get("error") if isinstance(body, dict) else None
        message, code = error_message(body), error.get("code") if isinstance(error, dict) else None
    return RemoteError(message, where, response.status_code, code if isinstance(code, str) else None)


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
