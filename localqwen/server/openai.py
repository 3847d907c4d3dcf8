"""OpenAI's Chat Completions and Completions, as localqwen serves them: request bodies, a generation's events turned
into OpenAI's deltas and messages, and the route handlers.

    POST /v1/chat/completions   thinking in `reasoning_content` (mirrored as `reasoning`), answer in `content`
    POST /v1/completions        a raw prompt (special tokens allowed: it is the caller's prompt), no thinking split
    GET  /v1/models
    POST /v1/chat/completions/{id}/answer-now   end the thinking of a running completion (the `id` of its chunks)

Choices, for clients to rely on:
- One model: any `model` name in a request is accepted; responses name the loaded model.
- `--reasoning-format none` leaves the thinking in `content` as `<think>\\n...\\n</think>\\n\\n` + answer (what
  Qwen-Agent's `thought_in_content` expects).
- Tool calls become `tool_calls` only when the request passed tools (and tool_choice is not "none"). Otherwise the
  model's `<tool_call>` text stays in `content` and does not make finish_reason "tool_calls". `tool_choice` is
  enforced after the thinking: "required" (one or more calls, nothing else), a named function (calls of it only),
  "none" (the tools are left out of the prompt and the model cannot open a call), "auto" (the model may answer, and
  every call it opens is a valid one: the call body follows the tool's parameters).
- `response_format` (on /v1/completions too): {"type": "json_object"} or {"type": "json_schema", "json_schema":
  {"schema": ...}} make the answer one JSON value of that shape (the thinking stays free); with finish_reason "stop"
  it parses and validates, with "length" it was cut short. A schema with keywords the grammar cannot enforce is a
  400 naming the keyword.
- Answer now: POST /v1/chat/completions/{id}/answer-now (same key and origin rules as the rest) closes a running
  completion's thinking with the thinking budget's wrap-up, and the model answers; 404 once it has finished.
- `stop` applies to the answer, never to the thinking; the stop text is trimmed and generation ends at once.
- Thinking budget: `thinking_budget` (tokens), else `reasoning_effort` (REASONING_EFFORT).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from localqwen.constants import THINKING_CLOSER, THINKING_OPENER
from localqwen.events import Event, Stats
from localqwen.sampling import OPTIONS
from localqwen.server.http import APIError, api_error, sse
from localqwen.server.runs import EventStream, Generation, collect, events_of
from localqwen.server.state import ServerState

# reasoning_effort as a thinking budget in tokens (None: unlimited); Responses and Ollama's `think` levels use it too.
REASONING_EFFORT = {"none": 0, "minimal": 256, "low": 1024, "medium": 8192, "high": None}
router = APIRouter()


# --- requests ------------------------------------------------------------------------------------------------

class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # wrong types are errors; unknown fields are ignored


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # Ollama's and vLLM's name for reasoning_content
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True, exclude={"reasoning"})
        out["role"] = "system" if self.role == "developer" else self.role
        if self.reasoning_content is None and self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        return out


class FunctionDef(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(Strict):
    type: Literal["function"] = "function"
    function: dict[str, str]


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchema(Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


def answer_schema(server: ServerState, kind: str, schema: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """Model.chat's `schema` for an answer format of `kind` ("text", "json_object", "json_schema"): None for text,
    any JSON object for json_object, `schema` (required) for json_schema; `where` names the schema's field."""
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if schema is None:
        raise APIError(400, f"{where}: required with type json_schema", param=where.split(".")[0])
    server.check_schema(schema, where)
    return schema


def tool_choice_of(choice: str | None, tools: list[dict[str, Any]], *, named: bool = False) -> str:
    """Model.chat's `tool_choice`: "auto", "required", "none", or (`named`) the name of a tool among `tools`."""
    if named:
        if choice not in {tool["function"]["name"] for tool in tools}:
            raise APIError(400, f"tool_choice names {choice!r}, which is not among the tools", param="tool_choice")
        return choice
    if choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs tools to call", param="tool_choice")
    return choice or "auto"


def _option_field(option: Any) -> tuple[Any, Any]:
    """A request field for one of localqwen's generation options (sampling.OPTIONS), with its range."""
    low = {"gt" if option.above_minimum else "ge": option.minimum}
    high = {"le": option.maximum} if option.maximum is not None else {}
    return option.kind | None, Field(None, **low, **high)


# Every generation option is a request field of the same name (temperature, ..., max_tokens, thinking_budget).
GenerationOptions = create_model("GenerationOptions", __base__=Strict,
                                 **{option.name: _option_field(option) for option in OPTIONS})


class GenerationRequest(GenerationOptions):  # type: ignore[misc, valid-type]
    model: str | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    response_format: ResponseFormat | None = None

    def options(self) -> dict[str, Any]:
        """The generation options the request set, as Model.chat takes them (stop strings included)."""
        chosen = {o.name: getattr(self, o.name) for o in OPTIONS if getattr(self, o.name) is not None}
        if self.max_completion_tokens is not None:
            chosen["max_tokens"] = self.max_completion_tokens
        return {**chosen, "stop": self.stop}

    def schema(self, server: ServerState) -> dict[str, Any] | None:
        """The answer's JSON Schema (response_format), or None for text."""
        fmt = self.response_format
        if fmt is None:
            return None
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
        return answer_schema(server, fmt.type, schema, "response_format.json_schema.schema")


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None

    def options(self) -> dict[str, Any]:
        chosen = super().options()
        if self.thinking_budget is None and self.reasoning_effort is not None:
            chosen["thinking_budget"] = REASONING_EFFORT[self.reasoning_effort]
        return chosen


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str]


# --- events to OpenAI deltas -------------------------------------------------------------------------------------

class ChatOutput:
    """Turns a generation's events into OpenAI deltas: streamed one by one, or joined into one message."""

    def __init__(self, *, think_in_content: bool, parse_tools: bool) -> None:
        self.think_in_content, self.parse_tools = think_in_content, parse_tools
        self.think_state: Literal["before", "open", "closed"] = "before"
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.stats: Stats | None = None

    def feed(self, event: Event) -> list[dict[str, Any]]:
        if event.kind == "done":
            self.stats = event.stats
            ended_thinking = event.stats is not None and event.stats.truncated_thinking
            return [] if ended_thinking else self._close_think()
        if event.kind == "thinking":
            if self.think_in_content:
                return self._open_think() + self._content(event.text)
            self.reasoning.append(event.text)
            return [{"reasoning_content": event.text, "reasoning": event.text}]
        if event.kind == "content":
            return self._close_think() + self._content(event.text)
        call = event.tool_call
        if call is None:
            return []
        if not (self.parse_tools and call.error is None):
            separator = "\n" if self.content and not self.content[-1].endswith("\n") else ""
            return self._close_think() + self._content(separator + call.block)
        self.tool_calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": {
            "name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}})
        return [*self._close_think(), {"tool_calls": [{"index": len(self.tool_calls) - 1, **self.tool_calls[-1]}]}]

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        self.content.append(text)
        return [{"content": text}]

    def _open_think(self) -> list[dict[str, Any]]:
        if not self.think_in_content or self.think_state != "before":
            return []
        self.think_state = "open"
        return self._content(THINKING_OPENER)

    def _close_think(self) -> list[dict[str, Any]]:
        if not self.think_in_content or self.think_state == "closed":
            return []
        opened = self._open_think()
        self.think_state = "closed"
        return opened + self._content(THINKING_CLOSER)

    @property
    def finish_reason(self) -> str:
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


# --- responses ---------------------------------------------------------------------------------------------------

class Reply:
    """One response in OpenAI's chat ("chat.completion") or text ("text_completion") shape, whole or streamed."""

    def __init__(self, server: ServerState, req: GenerationRequest, output: ChatOutput, chat: bool) -> None:
        self.req, self.output, self.chat = req, output, chat
        self.base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
                     "model": server.model_id}
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def choice(self, delta: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
        stats = self.output.stats
        # The stop string that ended the reply, as vLLM reports it (localqwen's remote backend reads it back).
        stopped = {"stop_reason": stats.stop_sequence} if finish_reason and stats and stats.stop_sequence else {}
        if finish_reason and stats and stats.wrap_up:  # the thinking was closed for the model, and why
            stopped["thinking_wrap_up"] = stats.wrap_up
        if not self.chat:
            text = "".join(self.output.content) if delta is None else delta.get("content", "")
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, **stopped}
        key, value = ("message", self.output.message()) if delta is None else ("delta", delta)
        return {"index": 0, key: value, "logprobs": None, "finish_reason": finish_reason, **stopped}

    def whole(self, events: list[Event]) -> JSONResponse:
        for event in events:
            self.output.feed(event)
        stats = self.output.stats
        return JSONResponse({**self.base, "object": "chat.completion" if self.chat else "text_completion",
                             "choices": [self.choice(None, self.output.finish_reason)], "usage": usage(stats),
                             "timings": stats.timings if stats else {}})

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        extra = {"usage": None} if self.include_usage else {}
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self.base, "object": kind, "choices": [self.choice(delta, finish_reason)], **extra})

    async def stream(self, generation: Generation) -> AsyncIterator[bytes]:
        if self.chat:
            yield self.chunk({"role": "assistant", "content": ""})
        try:
            async for event in events_of(generation):
                for delta in self.output.feed(event):
                    yield self.chunk(delta)
        except Exception as exc:  # after the headers went out, an error can only be an event
            yield sse(api_error(exc).body())
        else:
            yield self.chunk({}, self.output.finish_reason)
            if self.include_usage:
                kind = "chat.completion.chunk" if self.chat else "text_completion"
                yield sse({**self.base, "object": kind, "choices": [], "usage": usage(self.output.stats)})
        yield b"data: [DONE]\n\n"


async def respond(request: Request, server: ServerState, reply: Reply, start: Any) -> Response:
    generation = await server.start(request, start, reply.base["id"] if reply.chat else None)
    if not reply.req.stream:
        return reply.whole(await collect(request, generation))
    return EventStream(reply.stream(generation), generation)


def check_n(req: GenerationRequest) -> None:
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")


# --- routes ------------------------------------------------------------------------------------------------------

@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    server = ServerState.of(request)
    req = await server.read(request, ChatRequest)
    check_n(req)
    messages = [m.for_template() for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
    named = isinstance(req.tool_choice, NamedToolChoice)
    choice = req.tool_choice.function.get("name", "") if isinstance(req.tool_choice, NamedToolChoice) else \
        req.tool_choice
    tool_choice = tool_choice_of(choice, tools, named=named)
    options = {**req.options(), "schema": req.schema(server)}

    def start() -> Iterator[Event]:
        return server.model.chat(messages, tools=tools or None, tool_choice=tool_choice,
                                 parallel_tool_calls=req.parallel_tool_calls, **options)

    output = ChatOutput(think_in_content=server.reasoning_format == "none", parse_tools=bool(tools))
    return await respond(request, server, Reply(server, req, output, chat=True), start)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    server = ServerState.of(request)
    req = await server.read(request, CompletionRequest)
    check_n(req)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    n_vocab = server.model.n_vocab
    if isinstance(prompt, list) and not all(0 <= t < n_vocab for t in prompt):
        raise APIError(400, f"prompt token ids must be in [0, {n_vocab})", param="prompt")
    options = {**req.options(), "schema": req.schema(server)}

    def start() -> Iterator[Event]:
        tokens = server.model.tokenize(prompt, special=True) if isinstance(prompt, str) else list(prompt)
        return server.model.generate(tokens, thinking=False, **options)

    output = ChatOutput(think_in_content=False, parse_tools=False)
    return await respond(request, server, Reply(server, req, output, chat=False), start)


@router.post("/v1/chat/completions/{completion_id}/answer-now")
async def answer_now(request: Request, completion_id: str) -> dict[str, Any]:
    return ServerState.of(request).answer_now(request, completion_id)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    server = ServerState.of(request)
    server.authorize(request)
    return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                        "owned_by": "localqwen", "context_length": server.model.n_ctx}]}
