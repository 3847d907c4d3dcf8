"""The typed events that generation yields: the CLI, `run --json` and the server are views of these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

EventKind = Literal["thinking", "content", "tool_call", "done"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass(frozen=True)
class ToolCall:
    """One `<tool_call>` block. `error` says why it could not be parsed; then name/arguments may be None."""

    raw: str
    name: str | None = None
    arguments: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Stats:
    """Totals of one generation, carried by the final `done` event."""

    finish_reason: FinishReason
    prompt_tokens: int = 0
    thinking_tokens: int = 0
    content_tokens: int = 0
    truncated_thinking: bool = False  # generation ended before `</think>`: all thinking, no answer
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
