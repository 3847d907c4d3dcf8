"""Ollama's native API, as localqwen serves it (desktop apps and editor plugins configured for Ollama; run
`localqwen serve --port 11434` to stand where they look).

    POST /api/chat        message.thinking, message.content, message.tool_calls; streamed as NDJSON (the default)
    POST /api/generate    a prompt (and system) through the chat template, or `raw` as given
    GET  /api/tags        the loaded model           POST /api/show   its details, template, parameters
    GET  /api/ps          the loaded model, running  GET  /api/version
    GET  /                "Ollama is running", as apps probe for it

Choices, for clients to rely on:
- One model: any `model` name is accepted and the loaded model answers; /api/tags and /api/ps list it under the
  server's model id. Pulling, creating, copying or deleting models is not served (404).
- `think`: true or absent lets the model think as long as it needs; "low", "medium", "high" are thinking budgets
  (openai.REASONING_EFFORT); false gives the shortest thinking the model allows (budget 0, the model always thinks)
  and leaves `thinking` out of the reply.
- `options`: temperature, top_p, top_k, min_p, seed, presence_penalty, stop, num_predict (-1 or -2: no limit but the
  context), num_ctx (at most the loaded context: a larger one is refused, as the context is fixed when the server
  starts); Ollama's other options are accepted and have no effect. `keep_alive` is accepted: the model stays loaded.
- `format`: "json" (any JSON object) or a JSON schema: the answer (`content`, `response`) is one JSON value of that
  shape; the thinking stays free. Cut short by num_predict, done_reason is "length".
- Images, `suffix`, `template` and `context` get a 400.
- The final chunk carries Ollama's counts and durations (nanoseconds): prompt_eval_count is the whole prompt,
  prompt_eval_duration the time to the first token, eval_count the tokens generated (thinking included),
  load_duration 0 (the model was loaded when the server started), total_duration the request's time.
- /api/show reports the loaded context as `<architecture>.context_length`, since that is what a client can use.
- /api/version reports OLLAMA_VERSION: the Ollama API level these routes follow (thinking levels, tool calls).
- Errors are {"error": message}, also as a stream's last line.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from localqwen.constants import GGUF_ARCH
from localqwen.events import Event
from localqwen.model import Model
from localqwen.remote import RemoteModel
from localqwen.sampling import OPTION
from localqwen.server.http import APIError, api_error
from localqwen.server.openai import REASONING_EFFORT, ChatOutput, GenerationOptions, Strict, Tool, answer_schema
from localqwen.server.runs import EventStream, Generation, collect, events_of
from localqwen.server.state import ServerState

PATH_PREFIX = "/api/"
OLLAMA_VERSION = "0.12.0"
# What Ollama answers at "/", where apps probe for it; browsers get the chat page there (localqwen.web).
ROOT_TEXT = "Ollama is running"
NDJSON = "application/x-ndjson"
NO_LIMIT = (-1, -2)  # num_predict: Ollama's "until the model stops" and "until the context is full"
router = APIRouter()


# --- requests ------------------------------------------------------------------------------------------------

class FunctionCall(Strict):
    name: str
    arguments: dict[str, Any] = {}


class ToolCallIn(Strict):
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None

    def for_template(self) -> dict[str, Any]:
        if self.images:
            raise APIError(400, "images are not supported: this model reads text only")
        out: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.thinking is not None:
            out["reasoning_content"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return out


class Options(GenerationOptions):  # type: ignore[misc, valid-type]
    num_predict: int | None = None
    num_ctx: int | None = Field(None, ge=1)
    stop: list[str] | None = None


class GenerationRequest(Strict):
    model: str
    options: Options | None = None
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None
    stream: bool = True
    keep_alive: str | float | None = None


class ChatRequest(GenerationRequest):
    messages: list[Message] = []
    tools: list[Tool] | None = None


class GenerateRequest(GenerationRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None


class ShowRequest(Strict):
    model: str


def generation_arguments(server: ServerState, req: GenerationRequest) -> dict[str, Any]:
    """Model.chat's (or Model.generate's) limits, sampling and stop strings for a request."""
    options = req.options or Options()
    arguments = options.model_dump(include=set(OPTION), exclude_none=True)
    if isinstance(req.format, dict):
        arguments["schema"] = answer_schema(server, "json_schema", req.format, "format")
    elif req.format == "json":
        arguments["schema"] = answer_schema(server, "json_object", None, "format")
    elif req.format:
        raise APIError(400, f"format must be \"json\" or a JSON schema, not {req.format!r}")
    if options.num_ctx is not None and options.num_ctx > server.model.n_ctx:
        raise APIError(400, f"num_ctx {options.num_ctx} is more than the loaded context of {server.model.n_ctx} "
                            f"tokens; start `localqwen serve` with --ctx {options.num_ctx} to use it")
    if options.num_predict is not None and options.num_predict not in NO_LIMIT:
        if options.num_predict < OPTION["max_tokens"].minimum:
            raise APIError(400, f"num_predict must be at least {OPTION['max_tokens'].minimum:g}, or -1 for no limit")
        arguments["max_tokens"] = options.num_predict
    if isinstance(req.think, str):
        if req.think not in ("low", "medium", "high"):
            raise APIError(400, f"think must be true, false, 'low', 'medium' or 'high', not {req.think!r}")
        arguments["thinking_budget"] = REASONING_EFFORT[req.think]
    elif req.think is False:
        arguments["thinking_budget"] = 0  # the shortest thinking the model allows
    return {**arguments, "stop": options.stop}


def chat_arguments(server: ServerState, req: ChatRequest) -> dict[str, Any]:
    """Model.chat's keyword arguments for a chat request (messages and tools included)."""
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools or []]
    return {**generation_arguments(server, req), "messages": [m.for_template() for m in req.messages],
            "tools": tools or None}


def generate_arguments(server: ServerState, req: GenerateRequest) -> dict[str, Any]:
    """Model.chat's keyword arguments for a prompt (or, for a raw one, Model.generate's: the tokens instead)."""
    for field in ("suffix", "template", "context", "images"):
        if getattr(req, field):
            raise APIError(400, f"{field} is not supported by this server")
    arguments = generation_arguments(server, req)
    if req.raw:  # the caller's prompt exactly, special tokens included, with no thinking split
        return {**arguments, "prompt": server.model.tokenize(req.prompt, special=True), "thinking": False}
    system = [{"role": "system", "content": req.system}] if req.system else []
    return {**arguments, "messages": [*system, {"role": "user", "content": req.prompt}]}


# --- replies -----------------------------------------------------------------------------------------------------

def error_response(err: APIError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Reply:
    """A generation's events as Ollama's chat messages or generate responses: NDJSON chunks, or one whole reply."""

    def __init__(self, server: ServerState, *, chat: bool, show_thinking: bool, parse_tools: bool) -> None:
        self.server, self.chat, self.show_thinking = server, chat, show_thinking
        self.output = ChatOutput(think_in_content=False, parse_tools=parse_tools)
        self.started_ns = time.monotonic_ns()

    def chunk(self, thinking: str = "", content: str = "", tool_calls: list[dict[str, Any]] | None = None,
              done: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.server.model_id, "created_at": now()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking and self.show_thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            body["message"] = message
        else:
            body["response"] = content
            if thinking and self.show_thinking:
                body["thinking"] = thinking
        return {**body, "done": done, **(self.totals() if done else {})}

    def feed(self, event: Event) -> list[dict[str, Any]]:
        chunks = []
        for delta in self.output.feed(event):
            if "reasoning_content" in delta and self.show_thinking:
                chunks.append(self.chunk(thinking=delta["reasoning_content"]))
            elif "content" in delta:
                chunks.append(self.chunk(content=delta["content"]))
            elif "tool_calls" in delta:
                chunks.append(self.chunk(tool_calls=[tool_call(delta["tool_calls"][0])]))
        return chunks

    def whole(self, events: list[Event]) -> dict[str, Any]:
        for event in events:
            self.feed(event)
        return self.chunk("".join(self.output.reasoning), "".join(self.output.content),
                          [tool_call({"index": i, **call}) for i, call in enumerate(self.output.tool_calls)],
                          done=True)

    def totals(self) -> dict[str, Any]:
        """The final chunk's counts, and durations in nanoseconds as Ollama gives them."""
        stats = self.output.stats
        timings = stats.timings if stats else {}
        return {"done_reason": "length" if self.output.finish_reason == "length" else "stop",
                "total_duration": time.monotonic_ns() - self.started_ns, "load_duration": 0,
                "prompt_eval_count": stats.prompt_tokens if stats else 0,
                "prompt_eval_duration": round(timings.get("prompt_eval_s", 0.0) * 1e9),
                "eval_count": stats.completion_tokens if stats else 0,
                "eval_duration": round(timings.get("generation_s", 0.0) * 1e9)}

    async def stream(self, generation: Generation) -> AsyncIterator[bytes]:
        try:
            async for event in events_of(generation):
                for chunk in self.feed(event):
                    yield line(chunk)
        except Exception as exc:  # after the headers went out, an error can only be a line
            yield line({"error": api_error(exc).message})
            return
        yield line(self.chunk(done=True))


def tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call (openai.ChatOutput's) as Ollama's: arguments as an object."""
    function = call["function"]
    return {"id": call["id"], "function": {"index": call["index"], "name": function["name"],
                                           "arguments": json.loads(function["arguments"])}}


def line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode() + b"\n"


async def respond(request: Request, server: ServerState, req: GenerationRequest, reply: Reply,
                  start: Callable[[], Iterator[Event]]) -> Response:
    generation = await server.start(request, start)
    if req.stream:
        return EventStream(reply.stream(generation), generation, media_type=NDJSON)
    return JSONResponse(reply.whole(await collect(request, generation)))


def loaded(server: ServerState, chat: bool) -> JSONResponse:
    """What Ollama answers to a request with nothing to generate: the model is loaded."""
    body = {"model": server.model_id, "created_at": now(),
            **({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})}
    return JSONResponse({**body, "done": True, "done_reason": "load"})


# --- model information -------------------------------------------------------------------------------------------

def details(model: Model | RemoteModel) -> dict[str, Any]:
    if isinstance(model, RemoteModel):  # an upstream engine's model (serve --upstream): no file to describe
        return {"parent_model": "", "format": "", "family": GGUF_ARCH, "families": [GGUF_ARCH], "parameter_size": "",
                "quantization_level": ""}
    meta = model.meta
    return {"parent_model": "", "format": "gguf", "family": meta.architecture, "families": [meta.architecture],
            "parameter_size": parameter_size(parameter_count(model)), "quantization_level": meta.quant.upper()}


def parameter_count(model: Model) -> int:
    return sum(math.prod(tensor.shape) for tensor in model.meta.tensors.values())


def parameter_size(count: int) -> str:
    """As Ollama shows it: "4.0B", "596.0M"."""
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def listing(server: ServerState) -> dict[str, Any]:
    """The model as /api/tags and /api/ps list it. The digest identifies the file (path, size, time), without
    hashing gigabytes."""
    model = server.model
    if isinstance(model, RemoteModel):
        size, modified, identity = 0, float(server.created), f"{model.url}:{model.model_id}"
    else:
        stat = model.path.stat()
        size, modified = stat.st_size, stat.st_mtime
        identity = f"{model.path.resolve()}:{size}:{stat.st_mtime_ns}"
    return {"name": server.model_id, "model": server.model_id,
            "modified_at": datetime.fromtimestamp(modified, timezone.utc).isoformat().replace("+00:00", "Z"),
            "size": size, "digest": hashlib.sha256(identity.encode()).hexdigest(), "details": details(model)}


# --- routes ------------------------------------------------------------------------------------------------------

@router.post("/api/chat")
async def chat(request: Request) -> Response:
    server = ServerState.of(request)
    req = await server.read(request, ChatRequest)
    arguments = chat_arguments(server, req)
    if not req.messages:
        return loaded(server, chat=True)
    reply = Reply(server, chat=True, show_thinking=req.think is not False, parse_tools=bool(arguments["tools"]))

    def start() -> Iterator[Event]:
        return server.model.chat(**arguments)

    return await respond(request, server, req, reply, start)


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    server = ServerState.of(request)
    req = await server.read(request, GenerateRequest)
    if not req.prompt:
        return loaded(server, chat=False)
    arguments = generate_arguments(server, req)
    reply = Reply(server, chat=False, show_thinking=req.think is not False, parse_tools=False)

    def start() -> Iterator[Event]:
        if "prompt" in arguments:
            return server.model.generate(**arguments)
        return server.model.chat(**arguments)

    return await respond(request, server, req, reply, start)


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    server = ServerState.of(request)
    server.authorize(request)
    return {"models": [listing(server)]}


@router.post("/api/show")
async def show(request: Request) -> dict[str, Any]:
    server = ServerState.of(request)
    await server.read(request, ShowRequest)
    model = server.model
    if isinstance(model, RemoteModel):  # what an upstream engine's model is known by
        info: dict[str, Any] = {"general.architecture": GGUF_ARCH}
        source, template = f"{model.model_id} (an upstream engine's)", ""
    else:
        info = {key: value for key, value in model.meta.header.metadata.items()
                if isinstance(value, (str, int, float, bool)) and not key.startswith("tokenizer.")}
        info["general.parameter_count"] = parameter_count(model)
        source, template = str(model.path), model.template
    info[f"{GGUF_ARCH}.context_length"] = model.n_ctx
    sampling = {k: v for k, v in model.sampling.to_dict().items() if v is not None}
    parameters = "\n".join(f"{k:<20}{v}" for k, v in {**sampling, "num_ctx": model.n_ctx}.items())
    return {"modelfile": f"# localqwen serves this model as it is\nFROM {source}\n", "parameters": parameters,
            "template": template, "details": details(model), "model_info": info,
            "capabilities": ["completion", "tools", "thinking"], "modified_at": listing(server)["modified_at"]}


@router.get("/api/ps")
async def running_models(request: Request) -> dict[str, Any]:
    server = ServerState.of(request)
    server.authorize(request)
    model = server.model
    size, vram = (0, 0) if isinstance(model, RemoteModel) else (model.plan.total, model.plan.total_gpu)
    return {"models": [{**listing(server), "size": size, "size_vram": vram, "expires_at": None,
                        "context_length": model.n_ctx}]}


@router.get("/api/version")
async def version(request: Request) -> dict[str, str]:
    ServerState.of(request).authorize(request)
    return {"version": OLLAMA_VERSION}
