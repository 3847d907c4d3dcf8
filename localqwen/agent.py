"""The tool loop: the model calls tools (Python functions, MCP servers' tools) as often as it needs, then answers.

    run = model.act(messages, tools=[get_weather], on_call=approve, max_rounds=8)
    for event in run:                      # or `async for` (model.aact is the same)
        ...
    print(run.answer, run.finish_reason)

A round is one generation. A round that ends in tool calls has each call checked (a known tool, readable JSON),
put to `on_call`, run, and answered with a `tool` message; then the next round generates from the conversation so
far. The run ends when a round answers without calling ("stop"), reaches its token limit ("length"), is cancelled
("cancelled"), or when the round `max_rounds` still calls tools ("max_rounds": those calls are not run).

`on_call(call)` (plain or async) decides each call: True (or None) runs it, False refuses it, a dict runs it with
those arguments instead, a string refuses it with that text as the result. A tool that raises gives the model the
error's text; the app never sees the exception.

Events: every round's thinking, content, tool_call (each with an `id`) and done (that round's Stats), then one
tool_result per call; each event carries its round. The messages the run adds (`run.messages`) are OpenAI-shaped: an
assistant message with `tool_calls` (as they ran) and its thinking as `reasoning_content`, then one `tool` message
per call. The chat template keeps that thinking for the rounds after the last user message and drops it in later
turns, as Qwen's own agent does.

One implementation of the rounds (`Rounds`: what to generate from, what a call may do, what goes back to the
model; no I/O), driven twice: `__iter__` runs in the caller's thread with no event loop (so an on_call hook may
prompt through prompt_toolkit, which runs its own loop), `__aiter__` on the caller's loop without ever blocking it
(blocking tools and hooks run in a worker thread).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any, Literal

from localqwen.errors import BadRequest
from localqwen.events import Event, Stats, ToolCall, ToolResult
from localqwen.tools import Tool, ToolError, tool_table

DEFAULT_MAX_ROUNDS = 8
REFUSED = "The user refused this tool call."
AgentFinish = Literal["stop", "length", "cancelled", "max_rounds"]
# What on_call returns: run (True/None), refuse (False), run with other arguments (a dict), refuse saying (a str).
Decision = bool | dict[str, Any] | str | None
OnCall = Callable[[ToolCall], Decision | Awaitable[Decision]]


def error_text(exc: Exception) -> str:
    return f"Error: {exc}" if isinstance(exc, ToolError) else f"Error: {type(exc).__name__}: {exc}"


class Rounds:
    """The state of a run and every rule of the loop; the drivers (AgentRun) only generate, ask and call."""

    def __init__(self, messages: list[dict[str, Any]], tools: dict[str, Tool], max_rounds: int) -> None:
        self.prompt, self.tools, self.max_rounds = list(messages), tools, max_rounds
        self.messages: list[dict[str, Any]] = []  # what this run added to the conversation
        self.round = 0
        self.stats: list[Stats] = []
        self.thinking, self.answer = "", ""
        self.finish_reason: AgentFinish | None = None
        self._parts: dict[str, list[str]] = {"thinking": [], "content": []}
        self._calls: list[ToolCall] = []
        self._sent: dict[str, dict[str, Any]] = {}  # call id -> its entry in the assistant message's tool_calls

    def next_prompt(self) -> list[dict[str, Any]] | None:
        """The conversation to generate the next round from, or None: the run is over."""
        if self.finish_reason is not None:
            return None
        self.round += 1
        self._parts, self._calls = {"thinking": [], "content": []}, []
        return [*self.prompt, *self.messages]

    def see(self, event: Event) -> Event:
        """An event of this round's generation, tagged with the round; a tool call gets its id."""
        if event.kind in self._parts:
            self._parts[event.kind].append(event.text)
        elif event.tool_call is not None:
            call = replace(event.tool_call, id=f"call_{self.round}_{len(self._calls) + 1}")
            self._calls.append(call)
            event = replace(event, tool_call=call)
        elif event.stats is not None:
            self._end_round(event.stats)
        return replace(event, round=self.round)

    def _end_round(self, stats: Stats) -> None:
        self.stats.append(stats)
        self.thinking, self.answer = "".join(self._parts["thinking"]), "".join(self._parts["content"])
        if stats.finish_reason == "cancelled":
            self.finish_reason = "cancelled"  # a reply cut off mid-way joins nothing
            return
        message: dict[str, Any] = {"role": "assistant", "content": self.answer}
        if self.thinking:
            message["reasoning_content"] = self.thinking
        readable = [call for call in self._calls if call.error is None]
        self._sent = {}
        if readable and stats.finish_reason == "tool_calls":
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}} for call in readable]
            self._sent = {entry["id"]: entry for entry in message["tool_calls"]}
        self.messages.append(message)
        if stats.finish_reason != "tool_calls":
            self.finish_reason = stats.finish_reason
        elif self.round >= self.max_rounds:
            self.finish_reason = "max_rounds"

    def pending(self) -> Iterator[ToolCall]:
        """The calls to answer before the next round; none once the run is over (cancelled between two calls too)."""
        for call in self._calls:
            if self.finish_reason is not None:
                return
            yield call

    def check(self, call: ToolCall) -> ToolResult | None:
        """The result of a call that cannot run (unreadable, or no such tool), or None."""
        if call.error is not None:
            return ToolResult(call, f"Error: the tool call could not be read ({call.error}): {call.raw}", "error")
        if call.name not in self.tools:
            known = ", ".join(self.tools) or "none"
            return ToolResult(call, f"Error: there is no tool named {call.name!r} (the tools: {known})", "error")
        return None

    def decide(self, call: ToolCall, decision: Decision) -> ToolCall | ToolResult | None:
        """The call to run after on_call's `decision`, the result of refusing it, or None: the run was cancelled
        while the hook decided."""
        if self.finish_reason is not None:
            return None
        if decision is None or decision is True:
            return call
        if decision is False:
            return ToolResult(call, REFUSED, "refused")
        if isinstance(decision, str):
            return ToolResult(call, decision, "refused")
        if isinstance(decision, dict):
            changed = replace(call, arguments=decision)
            self._sent[call.id or ""]["function"]["arguments"] = json.dumps(decision, ensure_ascii=False)
            return changed
        raise BadRequest(f"on_call returns True, False, a dict of arguments or a string, got {decision!r}")

    def result(self, result: ToolResult) -> Event:
        """The tool message for `result`, added to the conversation, and its event."""
        message = {"role": "tool", "tool_call_id": result.call.id, "content": result.content}
        if result.call.name:
            message["name"] = result.call.name
        self.messages.append(message)
        return Event("tool_result", tool_result=result, round=self.round)

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"


class AgentRun:
    """One run of the tool loop: iterate it (`for` or `async for`, once) for its events; afterwards `answer`,
    `thinking` (the last round's), `messages` (what the run added), `finish_reason`, `rounds` and `stats` (one Stats
    per round) tell how it went. `cancel()` (any thread) stops the generation at its next token and runs no more
    calls; `collect()`/`acollect()` run it to the end without looking at the events."""

    def __init__(self, chat: Callable[..., Any], messages: list[dict[str, Any]],
                 tools: Iterable[Tool | Callable[..., Any]], *, on_call: OnCall | None = None,
                 max_rounds: int = DEFAULT_MAX_ROUNDS, **options: Any) -> None:
        if max_rounds < 1:
            raise BadRequest(f"max_rounds must be at least 1, got {max_rounds}")
        self._chat, self._on_call, self._options = chat, on_call, options
        self._tools = tool_table(tools)
        self._schemas = [tool.schema() for tool in self._tools.values()] or None
        self._rounds = Rounds(messages, self._tools, max_rounds)
        self._stream: Any = None
        self._started = False

    # --- how it went -----------------------------------------------------------------------------------------

    @property
    def answer(self) -> str:
        return self._rounds.answer

    @property
    def thinking(self) -> str:
        return self._rounds.thinking

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self._rounds.messages

    @property
    def finish_reason(self) -> AgentFinish | None:
        """None until the run is over."""
        return self._rounds.finish_reason

    @property
    def rounds(self) -> int:
        return self._rounds.round

    @property
    def stats(self) -> list[Stats]:
        return self._rounds.stats

    def cancel(self) -> None:
        self._rounds.cancel()
        if self._stream is not None:
            self._stream.cancel()

    def end_thinking(self) -> None:
        """Ask the round generating now to wrap up its thinking and answer (from any thread)."""
        if self._stream is not None:
            self._stream.end_thinking()

    def collect(self) -> AgentRun:
        for _ in self:
            pass
        return self

    async def acollect(self) -> AgentRun:
        async for _ in self:
            pass
        return self

    # --- the drivers -----------------------------------------------------------------------------------------

    def _start(self) -> Rounds:
        if self._started:
            raise BadRequest("a tool loop run can be iterated once")
        self._started = True
        return self._rounds

    def __iter__(self) -> Iterator[Event]:
        rounds = self._start()
        while (prompt := rounds.next_prompt()) is not None:
            self._stream = self._chat(prompt, tools=self._schemas, **self._options)
            try:
                for event in self._stream:
                    yield rounds.see(event)
            finally:
                self._stream.close()
            for call in rounds.pending():
                outcome = rounds.check(call) or rounds.decide(call, self._ask(call))
                if outcome is None:
                    break
                if isinstance(outcome, ToolCall):
                    try:
                        outcome = ToolResult(outcome, self._tools[outcome.name or ""].call(outcome.arguments or {}))
                    except Exception as exc:
                        outcome = ToolResult(outcome, error_text(exc), "error")
                yield rounds.result(outcome)

    async def __aiter__(self) -> AsyncIterator[Event]:
        rounds = self._start()
        while (prompt := rounds.next_prompt()) is not None:
            self._stream = self._chat(prompt, tools=self._schemas, **self._options)
            try:
                async for event in self._stream:
                    yield rounds.see(event)
            finally:
                await self._stream.aclose()
            for call in rounds.pending():
                outcome = rounds.check(call) or rounds.decide(call, await self._aask(call))
                if outcome is None:
                    break
                if isinstance(outcome, ToolCall):
                    try:
                        outcome = ToolResult(outcome, await self._tools[outcome.name or ""].acall(
                            outcome.arguments or {}))
                    except Exception as exc:
                        outcome = ToolResult(outcome, error_text(exc), "error")
                yield rounds.result(outcome)

    def _ask(self, call: ToolCall) -> Decision:
        if self._on_call is None:
            return True
        decision = self._on_call(call)
        return asyncio.run(wait_for(decision)) if inspect.isawaitable(decision) else decision

    async def _aask(self, call: ToolCall) -> Decision:
        if self._on_call is None:
            return True
        if inspect.iscoroutinefunction(self._on_call):
            return await self._on_call(call)
        decision = await asyncio.to_thread(self._on_call, call)
        return await decision if inspect.isawaitable(decision) else decision


async def wait_for(awaitable: Awaitable[Decision]) -> Decision:
    return await awaitable
