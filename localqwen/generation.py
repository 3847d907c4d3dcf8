"""One reply, token by token, apart from how tokens are evaluated and sampled: its limits, its phases and its events.

A reply has two phases. The model thinks (and, once it closes its thinking on its own, answers) until it ends its
turn or reaches the token limit. If its thinking budget runs out first, the thinking is closed for it with the
Qwen3 report's wrap-up sentence, and it answers in a second phase. `Turn` keeps the state that decides this (the
parser, the counts) and turns sampled bytes into events; the runtime (localqwen.model) drives it.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import numpy as np

from localqwen.constants import DEFAULT_MAX_TOKENS
from localqwen.errors import BadRequest
from localqwen.events import Event, FinishReason, Stats, WrapUp
from localqwen.parser import StreamParser

# When thinking would eat all of max_tokens, this many tokens (at most a quarter of max_tokens) stay for the answer.
DEFAULT_ANSWER_RESERVE = 1024
# The loop guard: thinking whose last LOOP_REPEATS spans of the same tokens are identical, for a span of LOOP_SPANS
# tokens, is looping (a real chain of thought does not say the same 24+ tokens three times in a row); it is wrapped
# up as a spent budget is. Checked every LOOP_CHECK_EVERY thinking tokens (numpy: about 1 ms a check).
LOOP_SPANS = range(24, 513)
LOOP_REPEATS = 3
LOOP_CHECK_EVERY = 16


def repeats_itself(tokens: np.ndarray) -> bool:
    """Do the last LOOP_REPEATS spans of some length in LOOP_SPANS hold the same tokens?"""
    n = len(tokens)
    for span in range(LOOP_SPANS.start, min(LOOP_SPANS.stop, n // LOOP_REPEATS + 1)):
        tail = tokens[n - span * LOOP_REPEATS:]
        if (tail.reshape(LOOP_REPEATS, span) == tail[-span:]).all():
            return True
    return False


@dataclass(frozen=True)
class Limits:
    """How many tokens one reply may take: in all, and for thinking before the wrap-up."""

    total: int
    thinking: int

    @classmethod
    def for_reply(cls, *, room: int, max_tokens: int | None, thinking_budget: int | None,
                  answer_reserve: int | None, wrap_up_tokens: int) -> Limits:
        """`room`: context left after the prompt. Unless `answer_reserve=0`, thinking stops early enough that the
        wrap-up and a reserved answer (a quarter of the limit, at most DEFAULT_ANSWER_RESERVE) still fit."""
        if max_tokens is not None and max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}")
        if thinking_budget is not None and thinking_budget < 0:
            raise BadRequest(f"thinking_budget must be 0 or more, got {thinking_budget}")
        total = min(max_tokens or DEFAULT_MAX_TOKENS, room)
        reserve = min(total // 4, DEFAULT_ANSWER_RESERVE) if answer_reserve is None else answer_reserve
        thinking = thinking_budget if thinking_budget is not None else total
        before_reserve = total - reserve - wrap_up_tokens
        if reserve and before_reserve > 0:
            thinking = min(thinking, before_reserve)
        return cls(total, thinking)


class StopFilter:
    """Cut text at the first stop string, holding back any tail that could still become one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held = [s for s in stops if s], ""
        self.hit: str | None = None  # the stop string found

    def feed(self, text: str) -> str:
        if self.hit is not None:
            return ""
        text, self.held = self.held + text, ""
        found = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            index, self.hit = min(found)
            return text[:index]
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class Turn:
    """The state of one reply: bytes to text, text to events (through the parser and the stop strings, which apply
    to the answer only), and the token counts."""

    def __init__(self, prompt_tokens: int, limits: Limits, *, thinking: bool, stops: list[str] | None = None,
                 loop_guard: bool = True, one_call: bool = False) -> None:
        self.limits = limits
        self.stats = Stats(finish_reason="stop", prompt_tokens=prompt_tokens)
        self.parser = StreamParser(thinking=thinking)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopFilter(stops or [])
        self._tool_calls = 0
        self._one_call = one_call  # the reply ends with its first tool call (OpenAI's parallel_tool_calls false)
        self._thought: list[int] | None = [] if loop_guard else None  # thinking token ids, for the loop guard

    @property
    def stopped(self) -> bool:
        """The answer reached a stop string, or its one tool call: the reply is complete."""
        return self._stops.hit is not None or (self._one_call and self._tool_calls > 0)

    @property
    def thinking(self) -> bool:
        return self.parser.in_thinking

    @property
    def out_of_tokens(self) -> bool:
        return self.stats.completion_tokens >= self.limits.total

    @property
    def can_wrap_up(self) -> bool:
        """Thinking (not holding a tool call it opened), and not inside a multi-byte character: the thinking can be
        closed for the model here."""
        return self.parser.state == "thinking" and not self._decoder.getstate()[0]

    @property
    def budget_spent(self) -> bool:
        """Still thinking with the thinking budget used up: time to wrap up."""
        return self.can_wrap_up and self.stats.thinking_tokens >= self.limits.thinking

    @property
    def looping(self) -> bool:
        """The thinking repeats itself (the loop guard): time to wrap up."""
        thought = self._thought
        if thought is None or len(thought) % LOOP_CHECK_EVERY or not self.can_wrap_up:
            return False
        return repeats_itself(np.asarray(thought[-LOOP_SPANS.stop * LOOP_REPEATS:]))

    def token(self, piece: bytes, token: int | None = None) -> list[Event]:
        """One sampled token (its bytes, and its id where known): counted as thinking if it arrived while thinking
        (`</think>` itself included)."""
        if self.parser.in_thinking:
            self.stats.thinking_tokens += 1
            if self._thought is not None and token is not None:
                self._thought.append(token)
        else:
            self.stats.content_tokens += 1
        return self._events(self.parser.feed(self._decoder.decode(piece)))

    def forced(self, text: str, n_tokens: int, reason: WrapUp | None = None) -> list[Event]:
        """Text put in the model's mouth (the thinking wrap-up, with its reason): shown, counted as thinking."""
        self.stats.thinking_tokens += n_tokens
        if reason is not None:
            self.stats.wrap_up = reason
        return self._events(self.parser.feed(text))

    def stop(self, reason: FinishReason) -> None:
        self.stats.finish_reason = reason

    def finish(self) -> list[Event]:
        """The events still held back at the end, with the final counts in `stats` (timings are the caller's)."""
        complete = self.stats.finish_reason == "stop"  # the model ended its turn (or a stop string did)
        events = self._events(self.parser.feed(self._decoder.decode(b"", final=True)) + self.parser.finish(complete))
        events += self._content(self._stops.flush())
        self.stats.truncated_thinking = self.parser.in_thinking
        self.stats.stop_sequence = self._stops.hit
        if self._stops.hit is not None:
            self.stats.finish_reason = "stop"
        elif self.stats.finish_reason == "stop" and self._tool_calls:
            self.stats.finish_reason = "tool_calls"
        return events

    def _events(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for event in events:
            if self.stopped:
                break
            if event.kind == "content":
                out += self._content(self._stops.feed(event.text))
            elif event.kind == "tool_call":
                out += [*self._content(self._stops.flush()), event]
                self._tool_calls += 1
            else:
                out.append(event)
        return out

    def _content(self, text: str) -> list[Event]:
        return [Event("content", text)] if text else []


def timings(load_s: float, started: float, first: float | None, finished: float, prompt: int, generated: int,
            ) -> dict[str, float]:
    first = first or finished
    decode_s = finished - first
    return {
        "load_s": round(load_s, 4),
        "prompt_eval_s": round(first - started, 4),  # time to first token: prompt evaluation plus one sample
        "prompt_tokens_per_s": round(prompt / (first - started), 2) if first > started else 0.0,  # uncached ones
        "generation_s": round(decode_s, 4),
        "tokens_per_s": round((generated - 1) / decode_s, 2) if generated > 1 and decode_s > 0 else 0.0,
    }
