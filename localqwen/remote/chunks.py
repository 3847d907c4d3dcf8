"""An engine's streamed chunks turned into localqwen's events: pure, no I/O (the streams feed it)."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from localqwen.constants import THINK_CLOSE, tool_call_block
from localqwen.events import Event, Stats
from localqwen.generation import Turn


class ChunkReader:
    """One streamed completion's chunks -> localqwen events (pure: no I/O), through a generation.Turn.

    The engine's split is turned back into the model's raw text (thinking, `</think>`, answer, `<tool_call>` blocks)
    and fed to the Turn, so the parsing, the stop strings and the finish reasons are those of the local runtime.
    """

    def __init__(self, turn: Turn, chat: bool, engine_stops: list[str] | None = None) -> None:
        """`engine_stops`: stop strings the engine applies itself (it then says which one ended the reply)."""
        self.turn, self.chat, self.engine_stops = turn, chat, engine_stops or []
        self.mode: Literal["unknown", "split", "raw"] = "unknown" if chat and turn.thinking else "raw"
        self.held: list[str] = []  # content deltas while the mode is unknown
        self.calls: dict[int, dict[str, Any]] = {}  # index -> {"name", "arguments" fragments}
        self.usage: dict[str, Any] = {}
        self.finish_reason: str | None = None
        self.stop_reason: Any = None  # the stop string (or token id) that ended the reply: vLLM's, localqwen's field
        self.first_token_at: float | None = None
        self.raw: list[str] = []  # the text fed to the turn: what the model wrote, as far as the engine showed it

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        events: list[Event] = []
        for choice in chunk.get("choices") or []:
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            self.stop_reason = choice.get("stop_reason", self.stop_reason)
            if not self.chat:
                events += self._raw(choice.get("text") or "")
                continue
            delta = choice.get("delta") or {}
            if not delta and not choice.get("finish_reason") and self.mode != "unknown":
                events += self._token("")  # vLLM: a token that ends inside a character (its bytes come later)
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")  # localqwen sends both
            if reasoning:
                events += self._reasoning(reasoning)
            for call in delta.get("tool_calls") or []:
                self._call_fragment(call)
            if delta.get("content"):
                events += self._content(delta["content"])
        return events

    def finish(self, reason: str, *, use_usage: bool = True) -> list[Event]:
        """The events still held at the end; `reason`: "cancelled" when the client stopped the stream. `use_usage`:
        take the token counts from the engine's usage (else the counts streamed)."""
        events: list[Event] = []
        if self.mode == "unknown":  # content without `</think>` and no reasoning field: a reply without thinking
            events += self._decide("split")
        if self.stop_reason in self.engine_stops:  # the engine cut the stop string out: the turn cuts it as locally
            events += self.turn.forced(self.stop_reason, 0)
        if self.calls:
            events += self._answer()
            for call in (self.calls[i] for i in sorted(self.calls)):
                raw = f'{{"name": {json.dumps(call["name"], ensure_ascii=False)}, "arguments": ' \
                      f'{"".join(call["arguments"]) or "{}"}}}'
                events += self.turn.forced(tool_call_block(raw), 0)
        stats = self.turn.stats
        if reason == "cancelled" or self.finish_reason == "length":
            self.turn.stop("cancelled" if reason == "cancelled" else "length")
        events += self.turn.finish()
        if use_usage:
            self._count(stats)
        return events

    def _count(self, stats: Stats) -> None:
        """The engine's token counts where it sent them; the streamed thinking/answer split otherwise."""
        usage = self.usage
        if not usage:
            return
        stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        stats.cached_prompt_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
        thinking = min(reasoning or stats.thinking_tokens, completion)
        stats.thinking_tokens, stats.content_tokens = thinking, completion - thinking

    def _token(self, text: str) -> list[Event]:
        self.first_token_at = self.first_token_at or time.perf_counter()
        self.raw.append(text)
        return self.turn.token(text.encode())

    def _raw(self, text: str) -> list[Event]:
        return self._token(text) if text else []

    def _reasoning(self, text: str) -> list[Event]:
        events = self._decide("split") if self.mode == "unknown" else []
        return events + self._token(text)  # (after the answer began it can only be shown as answer text)

    def _content(self, text: str) -> list[Event]:
        if self.mode == "unknown":
            self.held.append(text)
            return self._decide("raw") if THINK_CLOSE in "".join(self.held) else []
        if self.mode == "split":
            return self._answer() + self._token(text)
        return self._token(text)

    def _decide(self, mode: Literal["split", "raw"]) -> list[Event]:
        """Fix how this stream carries the thinking; replay the content held so far."""
        self.mode, held, self.held = mode, self.held, []
        events: list[Event] = []
        for text in held:
            events += self._content(text)
        return events

    def _answer(self) -> list[Event]:
        """Close the thinking (the engine cut `</think>` out, a token localqwen counts as thinking) before the first
        answer text or tool call."""
        return self.turn.forced(THINK_CLOSE, 1) if self.turn.thinking else []

    def _call_fragment(self, call: dict[str, Any]) -> None:
        if self.mode == "unknown":
            self.mode = "split"
        slot = self.calls.setdefault(int(call.get("index") or 0), {"name": "", "arguments": []})
        function = call.get("function") or {}
        slot["name"] += function.get("name") or ""
        arguments = function.get("arguments")
        if isinstance(arguments, dict):  # some servers send the object, not its JSON text
            arguments = json.dumps(arguments, ensure_ascii=False)
        slot["arguments"].append(arguments or "")
