"""The typed events that generation yields: the CLI, `run --json` and the server are views of these. The tool loop
(localqwen.agent) yields the same events, each tagged with its round, plus one `tool_result` per call it ran."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from localqwen.constants import tool_call_block

EventKind = Literal["thinking", "content", "tool_call", "tool_result", "done"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]
ToolStatus = Literal["ok", "error", "refused"]
WrapUp = Literal["budget", "answer_now", "loop_guard"]  # why the thinking was closed for the model


@dataclass(frozen=True)
class ToolCall:
    """One `<tool_call>` block. `error` says why it could not be parsed; then name/arguments may be None."""

    raw: str
    name: str | None = None
    arguments: dict[str, Any] | None = None
    error: str | None = None
    id: str | None = None  # given by the tool loop (localqwen.agent): what its ToolResult answers

    @property
    def block(self) -> str:
        """The call as the model wrote it, markers included: what an unparsed call shows as text."""
        return tool_call_block(self.raw)


@dataclass(frozen=True)
class ToolResult:
    """What the tool loop gave the model for one call: `content` is the tool message's text. `call` is the call as
    it ran (with the arguments an on_call hook changed); status "error": the tool failed or the call could not run
    (the text says why), "refused": the hook refused it."""

    call: ToolCall
    content: str
    status: ToolStatus = "ok"


@dataclass
class Stats:
    """Totals of one generation, carried by the final `done` event."""

    finish_reason: FinishReason
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV cache was reused from the previous generation
    thinking_tokens: int = 0
    content_tokens: int = 0
    truncated_thinking: bool = False  # generation ended before `</think>`: all thinking, no answer
    stop_sequence: str | None = None  # the stop string that ended the answer, if one did
    wrap_up: WrapUp | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return self.thinking_tokens + self.content_tokens


@dataclass(frozen=True)
class Event:
    kind: EventKind
    text: str = ""
    tool_call: ToolCall | None = None
    stats: Stats | None = None
    tool_result: ToolResult | None = None
    round: int = 0  # the tool loop's round (a generation), from 1; 0 outside a loop


@dataclass
class Reply:
    """A whole generation, collected from its events (non-streaming use)."""

    thinking: str
    content: str
    tool_calls: list[ToolCall]
    stats: Stats
    parsed: Any = None  # with an answer schema: the answer as a validated object (None if it was cut short)

    @classmethod
    def collect(cls, events: Iterable[Event]) -> Reply:
        parts: dict[str, list[str]] = {"thinking": [], "content": []}
        tool_calls: list[ToolCall] = []
        stats = None
        for event in events:
            if event.kind in parts:
                parts[event.kind].append(event.text)
            elif event.tool_call is not None:
                tool_calls.append(event.tool_call)
            elif event.stats is not None:
                stats = event.stats
        if stats is None:
            raise ValueError("a generation ends with a done event; this stream had none")
        content = "".join(parts["content"])
        answer_format = getattr(events, "answer_format", None)  # a model stream with a schema knows it
        parsed = None
        if answer_format is not None and answer_format.schema is not None and stats.finish_reason == "stop":
            parsed = answer_format.parse(content)
        return cls("".join(parts["thinking"]), content, tool_calls, stats, parsed)

    def to_dict(self) -> dict[str, Any]:
        """The shape `localqwen run --json` prints; scripts depend on it."""
        return {
            "thinking": self.thinking,
            "content": self.content,
            "tool_calls": [{k: v for k, v in asdict(call).items() if v is not None} for call in self.tool_calls],
            "finish_reason": self.stats.finish_reason,
            "truncated_thinking": self.stats.truncated_thinking,
            "wrap_up": self.stats.wrap_up,
            "usage": {"prompt_tokens": self.stats.prompt_tokens, "completion_tokens": self.stats.completion_tokens,
                      "thinking_tokens": self.stats.thinking_tokens},
            "timings": self.stats.timings,
        }
