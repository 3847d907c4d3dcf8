"""What every route shares on the HTTP side: errors (OpenAI's shape by default), library exceptions mapped to their
status, and the checks a request body passes before and after it is parsed."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from localqwen.errors import BadRequest, ContextOverflow, LocalqwenError, ModelBusy, RemoteError

# Deeper request JSON is refused (400) before it is parsed (see check_json).
MAX_JSON_DEPTH = 100
RETRY_AFTER_S = 2
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes and all
NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
M = TypeVar("M", bound=BaseModel)


class APIError(Exception):
    """An HTTP error. `body()` is OpenAI's shape; a dialect with its own shape renders `status`/`message` itself."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(exc: BaseException) -> APIError:
    """The HTTP error for an exception from reading a request or running its generation."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflow):
        return APIError(400, exc.message, param="messages", code="context_length_exceeded")
    if isinstance(exc, BadRequest):
        return APIError(400, exc.message)
    if isinstance(exc, ModelBusy):
        return APIError(503, exc.message, type="server_busy", code="model_busy",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, RemoteError):  # the engine behind `serve --upstream`: its fault, unless it blamed the request
        # Clients see the engine's own words, never its address.
        if exc.status == 400:
            return APIError(400, exc.detail, code=exc.code)
        if exc.status in (429, 503):
            return APIError(503, f"the upstream engine is busy: {exc.detail}", type="server_busy",
                            code="upstream_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
        return APIError(502, f"the upstream engine failed: {exc.detail}", type="upstream_error", code="bad_gateway")
    if isinstance(exc, LocalqwenError):
        return APIError(500, exc.message, type="server_error")
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


def parse_body(body: bytes, kind: type[M]) -> M:
    """A request body, checked (depth, Unicode) and validated into `kind`; every problem is a 400."""
    check_json(body)
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:  # not expected after check_json; still a bad request, not a server error
        raise APIError(400, "the request body nests too deeply", code="invalid_json") from None
    check_text(data, body)
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> APIError:
    """The first few problems in the message; `param` names the first one's field."""
    errors = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()[:3]]
    return APIError(400, "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in errors), param=errors[0][0] or None)


def sse(payload: Any, event: str | None = None) -> bytes:
    """One server-sent event carrying `payload` as JSON (with an `event:` line when named)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()
