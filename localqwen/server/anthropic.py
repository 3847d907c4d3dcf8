"""Anthropic's Messages API, as localqwen serves it (Claude Code and apps built on the Anthropic SDK).

    POST /v1/messages                thinking, text and tool_use blocks; streamed as Anthropic's events
    POST /v1/messages/count_tokens   {"input_tokens": n}: the prompt as a request with the same fields would have it

Choices, for clients to rely on:
- `thinking`: {"type": "enabled", "budget_tokens": N} is the thinking budget. The model always thinks, so
  {"type": "disabled"} gives the shortest thinking it allows (budget 0: the thinking is the wrap-up sentence alone)
  and leaves the thinking block out of the reply; "adaptive", "between_tools" or no `thinking` let it think as long as
  it needs (or as `output_config.effort` says: low, medium and high are openai.REASONING_EFFORT's budgets, xhigh and
  max as high). `display: "omitted"` leaves the thinking block out too.
- `output_config.format` {"type": "json_schema", "schema": ...} (what the SDK's `messages.parse(output_format=...)`
  sends): the text block is one JSON value of that shape (the thinking stays free); cut short, stop_reason is
  "max_tokens".
- `signature` of a thinking block: base64 HMAC-SHA256 of the thinking text, under a key made when the server process
  starts. A thinking block sent back with a signature this server made goes into the prompt as that turn's reasoning
  (the chat template keeps it only for turns after the last user message); one it did not make (another server, a
  restart, an edited text) is left out, as are redacted_thinking blocks.
- `tool_choice` is enforced after the thinking: "any" (one or more tool_use blocks, nothing else), "tool" (calls of
  that tool only), "none" (the tools left out, no call possible), "auto" (every call the model opens is a valid
  one). Tools other than custom ones (Anthropic's server tools) are left out: nothing here runs them.
- `usage`: input_tokens are the prompt tokens evaluated, cache_read_input_tokens those reused from the KV cache (their
  sum is the prompt). A stream's message_start carries zeros; its message_delta carries the totals.
- An assistant message last in `messages` is a finished turn, not a prefill for the model to continue.
- Image and document blocks get a 400: the model reads text only.
- Errors: {"type": "error", "error": {"type", "message"}} with Anthropic's types, also as a stream's `error` event.
- Claude Code's system prompt starts with a billing header whose `cch=` stamp changes with every request; the stamp
  is set to a constant, or no request could reuse the KV cache of the previous one (llama.cpp does the same).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from localqwen.events import Event
from localqwen.sampling import OPTION
from localqwen.server.http import APIError, api_error, sse
from localqwen.server.openai import (
    REASONING_EFFORT,
    ChatOutput,
    GenerationOptions,
    Strict,
    answer_schema,
    tool_choice_of,
)
from localqwen.server.runs import EventStream, Generation, collect
from localqwen.server.state import ServerState

PATH_PREFIX = "/v1/messages"
SIGNING_KEY = secrets.token_bytes(32)
PING_S = 10.0  # a ping after this long without an event keeps proxies and clients from timing out
BILLING_HEADER = "x-anthropic-billing-header:"
BILLING_STAMP = re.compile(r"\bcch=[^;]*;")
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}  # -> REASONING_EFFORT
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
router = APIRouter()


# --- requests ------------------------------------------------------------------------------------------------

class TextBlock(Strict):
    type: Literal["text"]
    text: str


class ThinkingBlock(Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(Strict):
    type: Literal["redacted_thinking"]


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""


Block = Annotated[TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock,
                  Field(discriminator="type")]


class MessageIn(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolIn(Strict):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # None or "custom"; Anthropic's server tools name their kind here


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(Strict):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=OPTION["thinking_budget"].minimum)
    display: Literal["summarized", "omitted"] | None = None


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class CountTokensRequest(Strict):
    model: str | None = None
    system: str | list[TextBlock] | None = None
    messages: list[MessageIn] = Field(min_length=1)
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(GenerationOptions, CountTokensRequest):  # type: ignore[misc, valid-type]
    max_tokens: int = Field(ge=OPTION["max_tokens"].minimum)  # required, as Anthropic has it
    stop_sequences: list[str] | None = None
    stream: bool = False
    output_config: OutputConfig | None = None

    @property
    def show_thinking(self) -> bool:
        return self.thinking is None or (self.thinking.type != "disabled" and self.thinking.display != "omitted")


def sign(thinking: str) -> str:
    return base64.b64encode(hmac.new(SIGNING_KEY, thinking.encode(), hashlib.sha256).digest()).decode()


def signed(block: ThinkingBlock) -> bool:
    """Whether this server wrote the thinking block, compared in constant time (as bytes: a client's signature may
    hold any character)."""
    return hmac.compare_digest(block.signature.encode(), sign(block.thinking).encode())


def system_text(system: str | list[TextBlock] | None) -> str:
    texts = [system] if isinstance(system, str) else [block.text for block in system or []]
    return "\n\n".join(BILLING_STAMP.sub("cch=00000;", t, count=1) if t.startswith(BILLING_HEADER) else t
                       for t in texts)


def template_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it: tool results become tool messages, tool_use blocks tool calls,
    and thinking this server signed the turn's reasoning_content."""
    messages: list[dict[str, Any]] = []
    if system := system_text(req.system):
        messages.append({"role": "system", "content": system})
    for message in req.messages:
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            messages.append(assistant_turn(message.content))
        else:
            messages += user_turns(message.content)
    return messages


def assistant_turn(blocks: list[Any]) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": "assistant", "content": "".join(b.text for b in blocks if b.type == "text")}
    reasoning = [b.thinking for b in blocks if b.type == "thinking" and signed(b)]
    if reasoning:
        turn["reasoning_content"] = "\n\n".join(reasoning)
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
             for b in blocks if b.type == "tool_use"]
    if calls:
        turn["tool_calls"] = calls
    return turn


def user_turns(blocks: list[Any]) -> list[dict[str, Any]]:
    """A user message's blocks in order: runs of text become user messages, each tool result a tool message."""
    turns: list[dict[str, Any]] = []
    text: list[str] = []
    for block in blocks:
        if block.type == "text":
            text.append(block.text)
        elif block.type == "tool_result":
            if text:
                turns.append({"role": "user", "content": "".join(text)})
                text = []
            content = block.content if isinstance(block.content, str) else "".join(b.text for b in block.content)
            turns.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
    if text or not turns:
        turns.append({"role": "user", "content": "".join(text)})
    return turns


def template_tools(req: CountTokensRequest) -> list[dict[str, Any]]:
    """Custom tools in the template's (OpenAI's) shape; none when tool_choice is "none"."""
    if req.tool_choice is not None and req.tool_choice.type == "none":
        return []
    tools = [function_tool(tool) for tool in req.tools or [] if tool.type in (None, "custom")]
    choice = req.tool_choice
    if choice is not None and choice.type == "tool" and choice.name not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"tool_choice names {choice.name!r}, which is not among the tools")
    return tools


def function_tool(tool: ToolIn) -> dict[str, Any]:
    function = {"name": tool.name, "description": tool.description, "parameters": tool.input_schema}
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


def chat_arguments(server: ServerState, req: MessagesRequest) -> dict[str, Any]:
    """Model.chat's keyword arguments for a request (messages and tools included)."""
    arguments = req.model_dump(include=set(OPTION), exclude_none=True)
    config = req.output_config or OutputConfig()
    if config.format is not None:
        arguments["schema"] = answer_schema(server, "json_schema", config.format.schema_, "output_config.format.schema")
    if config.effort is not None:
        arguments["thinking_budget"] = REASONING_EFFORT[EFFORTS[config.effort]]
    if req.thinking is not None and req.thinking.type == "enabled":
        if req.thinking.budget_tokens is None:
            raise APIError(400, "thinking.budget_tokens: required when thinking is enabled")
        arguments["thinking_budget"] = req.thinking.budget_tokens
    elif req.thinking is not None and req.thinking.type == "disabled":
        arguments["thinking_budget"] = 0  # the shortest thinking the model allows
    tools = template_tools(req)
    choice = req.tool_choice or ToolChoice(type="auto")
    named = choice.type == "tool"
    mode = {"any": "required", "tool": choice.name}.get(choice.type, choice.type)
    return {**arguments, "messages": template_messages(req), "tools": tools or None, "stop": req.stop_sequences,
            "tool_choice": tool_choice_of(mode, tools, named=named),
            "parallel_tool_calls": not choice.disable_parallel_tool_use}


# --- events to content blocks ----------------------------------------------------------------------------------

class Blocks:
    """A generation's events as Anthropic content blocks: built up for the whole message, and as stream events."""

    def __init__(self, *, show_thinking: bool, parse_tools: bool) -> None:
        self.output = ChatOutput(think_in_content=False, parse_tools=parse_tools)
        self.show_thinking = show_thinking
        self.content: list[dict[str, Any]] = []
        self.open = False

    def feed(self, event: Event) -> list[bytes]:
        """The stream events for one generation event (the blocks grow as they go)."""
        out: list[bytes] = []
        for delta in self.output.feed(event):
            if "reasoning_content" in delta and self.show_thinking:
                out += self._ensure("thinking", {"thinking": "", "signature": ""})
                self.content[-1]["thinking"] += delta["reasoning_content"]
                out.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
            elif "content" in delta:
                out += self._ensure("text", {"text": ""})
                self.content[-1]["text"] += delta["content"]
                out.append(self._delta({"type": "text_delta", "text": delta["content"]}))
            elif "tool_calls" in delta:
                call = delta["tool_calls"][0]["function"]
                out += self._ensure("tool_use", {"id": f"toolu_{secrets.token_hex(12)}", "name": call["name"],
                                                 "input": {}}, new=True)
                self.content[-1]["input"] = json.loads(call["arguments"])
                out.append(self._delta({"type": "input_json_delta", "partial_json": call["arguments"]}))
        return out

    def close(self) -> list[bytes]:
        """End the open block: a thinking block gets its signature first."""
        if not self.open:
            return []
        self.open = False
        block, index = self.content[-1], len(self.content) - 1
        out = []
        if block["type"] == "thinking":
            block["signature"] = sign(block["thinking"])
            out.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
        return [*out, sse({"type": "content_block_stop", "index": index}, "content_block_stop")]

    def _ensure(self, kind: str, empty: dict[str, Any], new: bool = False) -> list[bytes]:
        if self.open and self.content[-1]["type"] == kind and not new:
            return []
        out = self.close()
        self.content.append({"type": kind, **empty})
        self.open = True
        start = {"type": "content_block_start", "index": len(self.content) - 1, "content_block": self.content[-1]}
        return [*out, sse(start, "content_block_start")]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse({"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta},
                   "content_block_delta")

    def stop(self) -> dict[str, str | None]:
        stats = self.output.stats
        if stats is not None and stats.stop_sequence is not None:
            return {"stop_reason": "stop_sequence", "stop_sequence": stats.stop_sequence}
        reason = {"length": "max_tokens", "tool_calls": "tool_use"}.get(self.output.finish_reason, "end_turn")
        return {"stop_reason": reason, "stop_sequence": None}

    def usage(self) -> dict[str, int]:
        stats = self.output.stats
        prompt, cached = (stats.prompt_tokens, stats.cached_prompt_tokens) if stats else (0, 0)
        return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
                "output_tokens": stats.completion_tokens if stats else 0}


# --- responses ---------------------------------------------------------------------------------------------------

def error_response(err: APIError) -> JSONResponse:
    kind = ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": err.message}}, status_code=err.status,
                        headers=err.headers)


def message(server: ServerState, message_id: str, blocks: Blocks | None) -> dict[str, Any]:
    """The message object: whole (blocks given) or as message_start announces it."""
    if blocks is None:
        return {"id": message_id, "type": "message", "role": "assistant", "model": server.model_id, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
    return {"id": message_id, "type": "message", "role": "assistant", "model": server.model_id,
            "content": blocks.content, **blocks.stop(), "usage": blocks.usage()}


async def events_with_pings(generation: Generation) -> AsyncIterator[Event | None]:
    """The generation's events, and None (a ping is due) after every PING_S seconds without one."""
    pending: asyncio.Future[Event | None] | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(generation.next())
            done, _ = await asyncio.wait({pending}, timeout=PING_S)
            if not done:
                yield None
                continue
            event, pending = pending.result(), None
            if event is None:
                return
            yield event
    finally:
        if pending is not None:
            pending.cancel()


async def stream(server: ServerState, blocks: Blocks, generation: Generation) -> AsyncIterator[bytes]:
    message_id = f"msg_{secrets.token_hex(12)}"
    yield sse({"type": "message_start", "message": message(server, message_id, None)}, "message_start")
    yield sse({"type": "ping"}, "ping")
    try:
        async for event in events_with_pings(generation):
            for chunk in blocks.feed(event) if event is not None else [sse({"type": "ping"}, "ping")]:
                yield chunk
    except Exception as exc:  # after the headers went out, an error can only be an event
        yield sse(json.loads(error_response(api_error(exc)).body), "error")
        return
    for chunk in blocks.close():
        yield chunk
    yield sse({"type": "message_delta", "delta": blocks.stop(), "usage": blocks.usage()}, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")


# --- routes ------------------------------------------------------------------------------------------------------

@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    server = ServerState.of(request)
    req = await server.read(request, MessagesRequest)
    arguments = chat_arguments(server, req)
    blocks = Blocks(show_thinking=req.show_thinking, parse_tools=bool(arguments["tools"]))

    def start() -> Iterator[Event]:
        return server.model.chat(**arguments)

    generation = await server.start(request, start)
    if req.stream:
        return EventStream(stream(server, blocks, generation), generation)
    for event in await collect(request, generation):
        blocks.feed(event)
    blocks.close()
    return JSONResponse(message(server, f"msg_{secrets.token_hex(12)}", blocks))


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> dict[str, int]:
    server = ServerState.of(request)
    req = await server.read(request, CountTokensRequest)
    tools = template_tools(req) or None
    return {"input_tokens": len(server.model.tokenize_chat(template_messages(req), tools))}
