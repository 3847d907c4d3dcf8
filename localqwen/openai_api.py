"""OpenAI's wire format, as localqwen.server speaks it: the request bodies (pydantic models) and the checks a body
passes before and after parsing, errors in OpenAI's shape, and a generation's events turned into OpenAI's deltas,
messages, usage and server-sent events.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Literal

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localqwen.errors import LocalqwenError
from localqwen.events import Event, Stats
from localqwen.model import ContextOverflow

# ChatRequest.reasoning_effort as a thinking budget in tokens (None: unlimited).
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


def sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()
