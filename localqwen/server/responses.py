"""OpenAI's Responses API, as localqwen serves it (Codex, newer OpenAI SDK code): stateless, as `store: false` is.

    POST /v1/responses                   reasoning, message and function_call output items; streamed as Responses
                                         events
    POST /v1/responses/{id}/answer-now   end the thinking of a running response (the `id` of its events)

Choices, for clients to rely on:
- Nothing is stored: every request carries its whole conversation in `input` (messages, function_call and
  function_call_output items, reasoning items). `previous_response_id` and `conversation` get a 400 that says so;
  the reply says `"store": false` whatever the request asked.
- Thinking comes as a `reasoning` item whose `content` holds the text (`reasoning_text`; no summaries), streamed as
  response.reasoning_text.delta. A reasoning item sent back becomes the next assistant turn's reasoning_content
  (its content, else its summary); `encrypted_content` is neither made nor read.
- `reasoning.effort` is a thinking budget (openai.REASONING_EFFORT; "xhigh" as "high"), `max_output_tokens` the limit
  of thinking and answer together; running out of it makes the response "incomplete" (reason max_output_tokens).
- Function tools only: tools of other types (web search, file search, shell, ...) are left out, as nothing here
  runs them. `tool_choice` is enforced after the thinking as on /v1/chat/completions: "required", a named function,
  "none" (the tools left out, no call possible), "auto" (every call the model opens is a valid one).
- `text.format` {"type": "json_schema", "schema": ...} or {"type": "json_object"}: the answer is one JSON value of
  that shape (the thinking stays free); a response cut short by max_output_tokens is "incomplete".
- Answer now: POST /v1/responses/{id}/answer-now ends a running response's thinking (see openai.py).
- Errors have OpenAI's shape; in a stream, an `error` event.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Discriminator, Field, Tag

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
from localqwen.server.runs import EventStream, Generation, collect, events_of
from localqwen.server.state import ServerState

EFFORT_ALIASES = {"xhigh": "high"}  # newer OpenAI effort names, as the nearest of REASONING_EFFORT
router = APIRouter()


# --- requests ------------------------------------------------------------------------------------------------

class TextPart(Strict):
    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]


class ReasoningPart(Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(Strict):
    type: Literal["reasoning"]
    summary: list[ReasoningPart] = []
    content: list[ReasoningPart] | None = None


def item_kind(item: Any) -> str | None:
    """An input item's kind: its `type`, "message" when it has none (the short form {"role", "content"})."""
    return item.get("type", "message") if isinstance(item, dict) else None


Item = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                 | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                 | Annotated[ReasoningItem, Tag("reasoning")], Discriminator(item_kind)]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OtherTool(Strict):
    type: str  # a hosted tool (web_search, file_search, ...): left out


Tool = Annotated[Annotated[FunctionTool, Tag("function")] | Annotated[OtherTool, Tag("other")],
                 Discriminator(lambda tool: "function" if isinstance(tool, dict) and tool.get("type") == "function"
                               else "other")]


class NamedToolChoice(Strict):
    type: Literal["function"]
    name: str


class Reasoning(Strict):
    effort: str | None = None


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class TextOptions(Strict):
    format: TextFormat | None = None


class ResponsesRequest(GenerationOptions):  # type: ignore[misc, valid-type]
    model: str | None = None
    input: str | list[Item]
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: int | None = Field(None, ge=OPTION["max_tokens"].minimum)
    text: TextOptions | None = None
    stream: bool = False
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    metadata: dict[str, str] | None = None

    @property
    def function_tools(self) -> list[FunctionTool]:
        return [tool for tool in self.tools or [] if isinstance(tool, FunctionTool)]


def template_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it. Items the model wrote (reasoning, its messages, function
    calls) join the assistant turn before them, when there is one; function call outputs become tool messages."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    for item in [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input:
        if isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": text_of(item.output)})
            continue
        if isinstance(item, MessageItem) and item.role != "assistant":
            messages.append({"role": "system" if item.role == "developer" else item.role,
                             "content": text_of(item.content)})
            continue
        if not messages or messages[-1]["role"] != "assistant":
            messages.append({"role": "assistant", "content": ""})
        turn = messages[-1]
        if isinstance(item, MessageItem):
            turn["content"] += text_of(item.content)
        elif isinstance(item, FunctionCallItem):
            turn.setdefault("tool_calls", []).append({"id": item.call_id, "type": "function", "function": {
                "name": item.name, "arguments": item.arguments}})
        else:
            parts = item.content or item.summary
            turn["reasoning_content"] = turn.get("reasoning_content", "") + "".join(p.text for p in parts)
    return messages


def text_of(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def chat_arguments(server: ServerState, req: ResponsesRequest) -> dict[str, Any]:
    """Model.chat's keyword arguments for a request (messages and tools included)."""
    if req.previous_response_id is not None or req.conversation is not None:
        field = "previous_response_id" if req.previous_response_id is not None else "conversation"
        raise APIError(400, f"{field}: this server keeps no responses; send the whole conversation in `input`",
                       param=field)
    arguments = req.model_dump(include=set(OPTION), exclude_none=True)
    text_format = req.text.format if req.text is not None else None
    if text_format is not None:
        arguments["schema"] = answer_schema(server, text_format.type, text_format.schema_, "text.format.schema")
    if req.max_output_tokens is not None:
        arguments["max_tokens"] = req.max_output_tokens
    requested = req.reasoning.effort if req.reasoning is not None else None
    if requested is not None:
        effort = EFFORT_ALIASES.get(requested, requested)
        if effort not in REASONING_EFFORT:
            raise APIError(400, f"reasoning.effort must be one of {', '.join([*REASONING_EFFORT, *EFFORT_ALIASES])},"
                                f" not {requested!r}", param="reasoning.effort")
        arguments.setdefault("thinking_budget", REASONING_EFFORT[effort])
    tools = [] if req.tool_choice == "none" else [
        {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
        for tool in req.function_tools]
    named = isinstance(req.tool_choice, NamedToolChoice)
    choice = req.tool_choice.name if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
    return {**arguments, "messages": template_messages(req), "tools": tools or None,
            "tool_choice": tool_choice_of(choice, tools, named=named), "parallel_tool_calls": req.parallel_tool_calls}


# --- events to output items ------------------------------------------------------------------------------------

class Output:
    """A generation's events as a response's output items: built up for the whole response, and as stream events."""

    def __init__(self, server: ServerState, req: ResponsesRequest, *, parse_tools: bool) -> None:
        self.server, self.req = server, req
        self.output = ChatOutput(think_in_content=False, parse_tools=parse_tools)
        self.id, self.created = f"resp_{secrets.token_hex(12)}", int(time.time())
        self.items: list[dict[str, Any]] = []
        self.open = False
        self.sequence = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        self.sequence += 1
        return sse({"type": kind, "sequence_number": self.sequence - 1, **fields}, kind)

    def feed(self, event: Event) -> list[bytes]:
        """The stream events for one generation event (the items grow as they go)."""
        out: list[bytes] = []
        for delta in self.output.feed(event):
            if "reasoning_content" in delta:
                out += self._ensure("reasoning", {"summary": [], "content": []}, {"type": "reasoning_text"})
                out.append(self._text_delta("response.reasoning_text.delta", delta["reasoning_content"]))
            elif "content" in delta:
                out += self._ensure("message", {"role": "assistant", "content": []},
                                    {"type": "output_text", "annotations": []})
                out.append(self._text_delta("response.output_text.delta", delta["content"], logprobs=[]))
            elif "tool_calls" in delta:
                call = delta["tool_calls"][0]
                out += self.close()
                item = {"id": f"fc_{secrets.token_hex(12)}", "type": "function_call", "status": "in_progress",
                        "call_id": call["id"], "name": call["function"]["name"], "arguments": ""}
                out.append(self.event("response.output_item.added", output_index=len(self.items), item=item))
                self.items.append(item)
                arguments, where = call["function"]["arguments"], self._where()
                out.append(self.event("response.function_call_arguments.delta", **where, delta=arguments))
                out.append(self.event("response.function_call_arguments.done", **where, arguments=arguments))
                item.update(arguments=arguments, status="completed")
                out.append(self.event("response.output_item.done", output_index=where["output_index"], item=item))
        return out

    def close(self) -> list[bytes]:
        """End the open reasoning or message item."""
        if not self.open:
            return []
        self.open = False
        item, where = self.items[-1], self._where()
        part = item["content"][0]
        done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
        extra = {"logprobs": []} if item["type"] == "message" else {}
        item["status"] = "incomplete" if self.output.finish_reason == "length" else "completed"
        return [self.event(done, **where, content_index=0, text=part["text"], **extra),
                self.event("response.content_part.done", **where, content_index=0, part=part),
                self.event("response.output_item.done", output_index=where["output_index"], item=item)]

    def _ensure(self, kind: str, fields: dict[str, Any], part: dict[str, Any]) -> list[bytes]:
        if self.open and self.items[-1]["type"] == kind:
            return []
        out = self.close()
        prefix = "rs" if kind == "reasoning" else "msg"
        item = {"id": f"{prefix}_{secrets.token_hex(12)}", "type": kind, "status": "in_progress", **fields}
        out.append(self.event("response.output_item.added", output_index=len(self.items), item=item))
        self.items.append(item)
        self.open = True
        item["content"].append({**part, "text": ""})
        out.append(self.event("response.content_part.added", **self._where(), content_index=0,
                              part=item["content"][0]))
        return out

    def _text_delta(self, kind: str, text: str, **extra: Any) -> bytes:
        self.items[-1]["content"][0]["text"] += text
        return self.event(kind, **self._where(), content_index=0, delta=text, **extra)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def response(self, status: Literal["in_progress", "completed", "incomplete"]) -> dict[str, Any]:
        req, sampling, stats = self.req, self.server.model.sampling, self.output.stats
        effort = req.reasoning.effort if req.reasoning is not None else None
        usage = None if stats is None else {
            "input_tokens": stats.prompt_tokens,
            "input_tokens_details": {"cached_tokens": stats.cached_prompt_tokens, "cache_write_tokens": 0},
            "output_tokens": stats.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": stats.thinking_tokens},
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}
        tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice) else (
            req.tool_choice or "auto")
        given = req.text.format if req.text is not None else None
        text_format = given.model_dump(by_alias=True, exclude_none=True) if given is not None else {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.server.model_id, "output": self.items if status != "in_progress" else [],
            "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": None,
            "reasoning": {"effort": effort, "summary": None}, "store": False,
            "temperature": req.temperature if req.temperature is not None else sampling.temperature,
            "top_p": req.top_p if req.top_p is not None else sampling.top_p,
            "text": {"format": text_format}, "tool_choice": tool_choice,
            "tools": [tool.model_dump(exclude_none=True) for tool in req.function_tools], "truncation": "disabled",
            "usage": usage, "metadata": req.metadata or {},
        }

    @property
    def status(self) -> Literal["completed", "incomplete"]:
        return "incomplete" if self.output.finish_reason == "length" else "completed"


async def stream(output: Output, generation: Generation) -> AsyncIterator[bytes]:
    yield output.event("response.created", response=output.response("in_progress"))
    yield output.event("response.in_progress", response=output.response("in_progress"))
    try:
        async for event in events_of(generation):
            for chunk in output.feed(event):
                yield chunk
    except Exception as exc:  # after the headers went out, an error can only be an event
        err = api_error(exc)
        yield output.event("error", code=err.code, message=err.message, param=err.param)
        return
    for chunk in output.close():
        yield chunk
    status = output.status
    yield output.event(f"response.{status}", response=output.response(status))


# --- routes ------------------------------------------------------------------------------------------------------

@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    server = ServerState.of(request)
    req = await server.read(request, ResponsesRequest)
    arguments = chat_arguments(server, req)
    output = Output(server, req, parse_tools=bool(arguments["tools"]))

    def start() -> Iterator[Event]:
        return server.model.chat(**arguments)

    generation = await server.start(request, start, output.id)
    if req.stream:
        return EventStream(stream(output, generation), generation)
    for event in await collect(request, generation):
        output.feed(event)
    output.close()
    return JSONResponse(output.response(output.status))


@router.post("/v1/responses/{response_id}/answer-now")
async def answer_now(request: Request, response_id: str) -> dict[str, Any]:
    return ServerState.of(request).answer_now(request, response_id)


@router.get("/v1/responses/{response_id}")
async def stored_response(request: Request, response_id: str) -> Response:
    ServerState.of(request).authorize(request)
    raise APIError(404, f"no response {response_id!r}: this server keeps no responses", code="not_found")
