"""The tool loop for the web page (`serve --mcp`): the server runs the tools (the page cannot reach MCP servers), the
page approves each call. localqwen's own endpoints; the OpenAI-compatible ones stay as they are (their clients run
their own tools).

    GET  /agent/tools                     {"tools": [{"name", "description", "server", "parameters"}]}
    POST /agent/chat                      one turn through the tool loop, as server-sent events (below)
    POST /agent/runs/{run}/calls/{call}   {"approve": true|false, "always": false}: the answer to an "approval"

/agent/chat takes what /v1/chat/completions takes (messages, sampling, max_tokens, thinking_budget,
reasoning_effort) and `approved` (tools that run without asking), `max_rounds`. Each event is `data: {"type", ...}`:
start {run}; thinking and content {round, text}; tool_call {round, id, name, arguments, error}; approval {round,
id, name, arguments}: the run waits for the POST (refused after APPROVAL_TIMEOUT_S); tool_result {round, id, name,
arguments, status, content}; done {round, finish_reason, usage}, one per round; end {finish_reason, messages: what
the turn added, to send back with the next turn}; error {message}. Closing the stream stops the run. Every
round goes through the scheduler like any other generation (queue, metrics, disconnects), so a call waiting for
the user holds no generation slot. Gated like the rest: the API key, and the origin guard (no other site's page
can start a run or approve a call).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from localqwen.agent import DEFAULT_MAX_ROUNDS, AgentRun, Decision
from localqwen.events import Event, ToolCall
from localqwen.server.http import APIError, api_error, sse
from localqwen.server.openai import ChatRequest, Strict, usage
from localqwen.server.runs import Generation, events_of
from localqwen.server.state import ServerState
from localqwen.tools import Tool

APPROVAL_TIMEOUT_S = 600.0
NO_ANSWER = "Nobody answered whether this call may run, so it did not."
router = APIRouter()


class AgentRequest(ChatRequest):
    approved: list[str] = []
    max_rounds: int = Field(DEFAULT_MAX_ROUNDS, ge=1, le=64)


class Answer(Strict):
    approve: bool
    always: bool = False  # this tool runs without asking for the rest of the turn


@dataclass
class Turn:
    """One running /agent/chat: the tools it runs without asking, and the calls that wait for an answer."""

    approved: set[str]
    waiting: dict[str, tuple[asyncio.Future[bool], str]] = field(default_factory=dict)  # call id -> answer, tool


@dataclass
class AgentState:
    tools: list[Tool]
    turns: dict[str, Turn] = field(default_factory=dict)  # by run id

    @staticmethod
    def of(request: Request) -> AgentState:
        return request.app.state.agent


class ScheduledRound:
    """One round's generation through the server's scheduler, as the tool loop's async driver iterates it."""

    def __init__(self, request: Request, server: ServerState, prompt: list[dict[str, Any]], options: Any) -> None:
        self.request, self.server, self.prompt, self.options = request, server, prompt, options
        self.generation: Generation | None = None
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[Event]:
        model = self.server.model
        self.generation = await self.server.start(self.request, lambda: model.chat(self.prompt, **self.options))
        if self.cancelled:
            self.generation.stop()
        async for event in events_of(self.generation):
            yield event

    def cancel(self) -> None:
        self.cancelled = True
        if self.generation is not None:
            self.generation.stop()

    async def aclose(self) -> None:
        self.cancel()


def event_data(event: Event) -> dict[str, Any]:
    """An event of the tool loop as the page reads it."""
    data: dict[str, Any] = {"type": event.kind, "round": event.round}
    if event.kind in ("thinking", "content"):
        data["text"] = event.text
    elif (call := event.tool_call) is not None:
        data.update(id=call.id, name=call.name, arguments=call.arguments, error=call.error)
    elif (result := event.tool_result) is not None:
        data.update(id=result.call.id, name=result.call.name, arguments=result.call.arguments, status=result.status,
                    content=result.content)
    elif (stats := event.stats) is not None:
        data.update(finish_reason=stats.finish_reason, usage=usage(stats))
    return data


@router.get("/agent/tools")
async def list_tools(request: Request) -> dict[str, Any]:
    ServerState.of(request).authorize(request)
    return {"tools": [{"name": tool.name, "description": tool.description, "server": tool.origin,
                       "parameters": tool.parameters} for tool in AgentState.of(request).tools]}


@router.post("/agent/chat")
async def agent_chat(request: Request) -> StreamingResponse:
    server, agent = ServerState.of(request), AgentState.of(request)
    req = await server.read(request, AgentRequest)
    if not agent.tools:
        raise APIError(400, "this server has no tools: start it with --mcp CONFIG.json", code="no_tools")
    if req.tools:
        raise APIError(400, "the tools are the server's (its --mcp servers): send none", param="tools")
    run_id = f"run_{secrets.token_hex(12)}"
    turn = agent.turns[run_id] = Turn(set(req.approved))
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()  # None: the end

    async def on_call(call: ToolCall) -> Decision:
        if call.name in turn.approved:
            return True
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        turn.waiting[call.id or ""] = (answer, call.name or "")
        await events.put({"type": "approval", "round": run.rounds, "id": call.id, "name": call.name,
                          "arguments": call.arguments})
        try:
            return await asyncio.wait_for(answer, APPROVAL_TIMEOUT_S)
        except TimeoutError:
            return NO_ANSWER
        finally:
            turn.waiting.pop(call.id or "", None)

    def chat(prompt: list[dict[str, Any]], **options: Any) -> ScheduledRound:
        return ScheduledRound(request, server, prompt, options)

    run = AgentRun(chat, [m.for_template() for m in req.messages], agent.tools, on_call=on_call,
                   max_rounds=req.max_rounds, **req.options())

    async def produce() -> None:
        try:
            async for event in run:
                await events.put(event_data(event))
            await events.put({"type": "end", "finish_reason": run.finish_reason, "messages": run.messages})
        except Exception as exc:  # the headers went out: an error can only be an event
            await events.put({"type": "error", "message": api_error(exc).message})
        finally:
            await events.put(None)

    async def body() -> AsyncIterator[bytes]:
        task = asyncio.create_task(produce())
        try:
            yield sse({"type": "start", "run": run_id})
            while (item := await events.get()) is not None:
                yield sse(item)
        finally:  # done, or the page went away (Stop, a closed tab): the run stops either way
            run.cancel()
            task.cancel()
            agent.turns.pop(run_id, None)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/agent/runs/{run_id}/calls/{call_id}")
async def answer_call(request: Request, run_id: str, call_id: str) -> dict[str, Any]:
    server = ServerState.of(request)
    req = await server.read(request, Answer)
    turn = AgentState.of(request).turns.get(run_id)
    answer, name = turn.waiting.get(call_id, (None, "")) if turn is not None else (None, "")
    if turn is None or answer is None or answer.done():
        raise APIError(404, f"no call {call_id} of run {run_id} waits for an answer", code="not_found")
    if req.approve and req.always:
        turn.approved.add(name)
    answer.set_result(req.approve)
    return {"run": run_id, "call": call_id, "approved": req.approve}


def install_agent(app: Any, tools: Sequence[Tool]) -> None:
    """The agent routes on `app`, with `tools` (none: /agent/chat says how to give some)."""
    app.state.agent = AgentState(list(tools))
    app.include_router(router)
