"""Split the model's streamed text into thinking, answer and tool calls: a pure, incremental state machine.

The chat template ends the prompt with `<think>\\n`, so generation starts inside the thinking section and normally
only closes it. The template renders `<think>\\n{thinking}\\n</think>\\n\\n{answer}`, so whitespace at section
boundaries is template layout, not text: it is trimmed here. Nothing in this module touches llama.cpp or does I/O.

A `<tool_call>` the model opens while still thinking is held back: if `</think>` follows, it was part of the
thinking and is released as thinking text; if the generation ends without one, it was a real call (as vLLM's and
llama.cpp's parsers decide), and the held text is read as the answer (calls and any text after them).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from localqwen.constants import THINK_CLOSE, THINK_OPEN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from localqwen.events import Event, ToolCall

State = Literal["thinking", "content", "tool_call", "thinking_call", "after_call"]

# (state, marker) -> next state. A marker not listed for the current state is plain text of that state.
TRANSITIONS: dict[tuple[State, str], State] = {
    ("thinking", THINK_CLOSE): "content",
    ("thinking", THINK_OPEN): "thinking",  # the model sometimes repeats the template's opening tag: drop it
    ("thinking", TOOL_CALL_OPEN): "thinking_call",  # held until `</think>` or the end decides what it was
    ("thinking_call", TOOL_CALL_CLOSE): "after_call",
    ("thinking_call", THINK_CLOSE): "content",
    ("after_call", TOOL_CALL_OPEN): "thinking_call",
    ("after_call", THINK_CLOSE): "content",
    ("content", TOOL_CALL_OPEN): "tool_call",
    ("tool_call", TOOL_CALL_CLOSE): "content",
}
STATES: tuple[State, ...] = ("thinking", "content", "tool_call", "thinking_call", "after_call")
MARKERS: dict[State, tuple[str, ...]] = {
    state: tuple(marker for (s, marker) in TRANSITIONS if s == state) for state in STATES
}
HELD: tuple[State, ...] = ("thinking_call", "after_call")  # a call opened while thinking, not yet decided
IN_CALL: tuple[State, ...] = ("tool_call", "thinking_call")  # inside a call's body


def parse_tool_call(body: str) -> ToolCall:
    """Decode the JSON between `<tool_call>` and `</tool_call>`. Never raises: problems go into `error`."""
    raw = body.strip()
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting from a runaway model
        return ToolCall(raw=raw, error=f"invalid JSON: {getattr(exc, 'msg', type(exc).__name__)}")
    if not isinstance(obj, dict):
        return ToolCall(raw=raw, error="tool call is not a JSON object")
    name = obj.get("name")
    if not isinstance(name, str):
        return ToolCall(raw=raw, error="missing or non-string name")
    arguments: Any = obj.get("arguments", {})  # a tool without parameters may be called without "arguments"
    if isinstance(arguments, str):
        # Some models double-encode the arguments as a JSON string holding the object.
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return ToolCall(raw=raw, name=name, error="arguments string is not valid JSON")
    if not isinstance(arguments, dict):
        return ToolCall(raw=raw, name=name, error="arguments is not a JSON object")
    return ToolCall(raw=raw, name=name, arguments=arguments)


def _held_marker_prefix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could still grow into one of `markers`."""
    longest = max((len(m) for m in markers), default=1)
    for size in range(min(len(text), longest - 1), 0, -1):
        tail = text[-size:]
        if any(m.startswith(tail) for m in markers):
            return size
    return 0


def merge_events(events: list[Event]) -> list[Event]:
    """Join adjacent thinking/content events of the same kind; tool calls stay separate."""
    merged: list[Event] = []
    for event in events:
        if merged and event.kind == merged[-1].kind and event.kind in ("thinking", "content"):
            merged[-1] = Event(event.kind, merged[-1].text + event.text)
        else:
            merged.append(event)
    return merged


class StreamParser:
    """Feed decoded text as it arrives; get back the events that are certain so far."""

    def __init__(self, thinking: bool = True) -> None:
        self._state: State = "thinking" if thinking else "content"
        self._buf = ""  # unscanned text: after feed(), at most a possible marker prefix
        self._ws = ""  # trailing whitespace of the section, emitted only if more text follows in the section
        self._fresh = True  # nothing emitted in this section yet: leading whitespace is dropped
        self._body: list[str] = []  # the open tool call's text
        self._held: list[str] = []  # from a `<tool_call>` opened while thinking on, markers included

    @property
    def state(self) -> State:
        return self._state

    @property
    def in_thinking(self) -> bool:
        """Not yet past `</think>` (a held call included: it may still turn out to be thinking)."""
        return self._state in ("thinking", *HELD)

    @property
    def in_call(self) -> bool:
        """Inside the body of a tool call (in the answer, or opened while thinking)."""
        return self._state in IN_CALL

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        while True:
            found = [(i, m) for m in MARKERS[self._state] if (i := self._buf.find(m)) >= 0]
            if not found:
                # Emit everything except what could still be the start of a marker.
                keep = _held_marker_prefix(self._buf, MARKERS[self._state])
                events += self._take(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return merge_events(events)
            index, marker = min(found)
            events += self._take(self._buf[:index])
            self._buf = self._buf[index + len(marker) :]
            events += self._transition(marker)

    def finish(self, complete: bool = True) -> list[Event]:
        """Flush at the end of generation. `complete`: the model ended its turn (not cut off by a token limit or a
        cancel). Then a call held since the thinking is a real call, and a last call whose closing tag is missing
        counts if its body is a valid call. Otherwise the state is left as it was, so callers see where it stopped."""
        events: list[Event] = []
        if self._state in HELD:
            held, self._held, self._buf = "".join(self._held) + self._buf, [], ""
            if complete:  # the thinking ended without `</think>`: the held text is the answer
                answer = StreamParser(thinking=False)
                self._state = "content"
                return merge_events(answer.feed(held) + answer.finish(complete))
            self._state = "thinking"
            events += self._text(held)
        elif self._state == "tool_call":
            call = parse_tool_call("".join(self._body) + self._buf)
            if not (complete and call.error is None):
                call = ToolCall(call.raw, call.name, call.arguments, "unterminated tool call")
            events.append(Event("tool_call", tool_call=call))
        else:
            events += self._text(self._buf)  # a marker prefix that never completed is just text
        self._buf, self._ws, self._body = "", "", []  # the final section's trailing whitespace is dropped
        return merge_events(events)

    def _take(self, text: str) -> list[Event]:
        if self._state == "tool_call":
            self._body.append(text)  # tool call text is never content; it is decoded when the call closes
            return []
        if self._state in HELD:
            self._held.append(text)
            return []
        return self._text(text)

    def _text(self, text: str) -> list[Event]:
        if self._fresh:
            text = text.lstrip()
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body) :]
        if not body:
            return []
        self._fresh = False
        return [Event(self._state, body)]

    def _transition(self, marker: str) -> list[Event]:
        events: list[Event] = []
        nxt = TRANSITIONS[(self._state, marker)]
        if nxt in HELD:  # a call while thinking: held, markers and all, until it is clear what it was
            self._held.append(marker)
            self._state = nxt
            return events
        if self._state in HELD:  # `</think>` after it: it was thinking after all
            held, self._held, self._state = "".join(self._held), [], "thinking"
            events += self._text(held)
        if self._state == "tool_call":
            events.append(Event("tool_call", tool_call=parse_tool_call("".join(self._body))))
            self._body = []
        if nxt != self._state:  # a real section boundary (not a dropped stray tag): trim around it
            self._ws, self._fresh = "", True
        self._state = nxt
        return events


def parse_text(text: str, thinking: bool = True) -> list[Event]:
    """One-shot parse of a complete generation."""
    parser = StreamParser(thinking=thinking)
    return merge_events(parser.feed(text) + parser.finish())
