"""The chat's state apart from the terminal: its settings and the `/set` parser, the `/save` `/load` file format,
fitting a conversation into the context, and which tool calls may run without asking."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from localqwen.errors import BadRequest
from localqwen.events import Event, ToolCall, ToolResult
from localqwen.sampling import LIMIT_OPTIONS, OPTION, Sampling
from localqwen.tools import Tool

Message = dict[str, Any]


@dataclass
class ChatSettings:
    system: str | None = None
    hide_thinking: bool = False
    verbose: bool = False
    max_tokens: int | None = None
    thinking_budget: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


def validate(settings: ChatSettings, base: Sampling) -> ChatSettings:
    """`settings` if every value is usable (sampling checked against `base`), else a LocalqwenError."""
    for key in LIMIT_OPTIONS:
        value = getattr(settings, key)
        if value is not None and (type(value) is not int or value < OPTION[key].minimum):
            raise BadRequest(f"{key} must be {OPTION[key].accepted} (or default), got {value!r}")
    if not (isinstance(settings.hide_thinking, bool) and isinstance(settings.verbose, bool)):
        raise BadRequest("hide_thinking and verbose must be true or false")
    if settings.system is not None and not isinstance(settings.system, str):
        raise BadRequest("the system prompt must be text")
    numbers = (int, float)
    if not isinstance(settings.sampling, dict) or not all(
            isinstance(v, numbers) and not isinstance(v, bool) for v in settings.sampling.values()):
        raise BadRequest(f"sampling settings must be numbers, got {settings.sampling}")
    base.with_overrides(**settings.sampling)
    return settings


def apply_set(settings: ChatSettings, base: Sampling, arg: str) -> tuple[ChatSettings, str]:
    """`/set ARG`: the changed settings, validated, and a confirmation."""
    key, _, value = arg.strip().partition(" ")
    value = value.strip()
    new = replace(settings, sampling=dict(settings.sampling))
    if key == "system":
        new.system = value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value or None
        return new, "system prompt set" if new.system else "system prompt cleared"
    if key in ("thinking", "verbose"):
        choices = {"show": False, "hide": True} if key == "thinking" else {"on": True, "off": False}
        if value not in choices:
            raise BadRequest(f"/set {key} takes {' or '.join(choices)}, got {value!r}")
        setattr(new, "hide_thinking" if key == "thinking" else "verbose", choices[value])
        return new, f"{key} {value}"
    option = OPTION.get(key)
    if option is None:
        raise BadRequest(f"unknown setting {key!r}: /help lists them" if key else "/set needs a setting: /help")
    try:
        number = None if value in ("default", "none") else option.kind(value)
    except ValueError:
        raise BadRequest(f"{key} needs {option.kind_name}, got {value!r}") from None
    if key in LIMIT_OPTIONS:
        setattr(new, key, number)
    elif number is None:
        new.sampling.pop(key, None)
    else:
        new.sampling[key] = number
    return validate(new, base), f"{key} set to {'default' if number is None else number}"


def save_conversation(path: Path, messages: list[Message], settings: ChatSettings) -> None:
    data = {"system": settings.system, "messages": messages,
            "settings": {k: v for k, v in asdict(settings).items() if k != "system"}}
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def load_conversation(path: Path, base: Sampling) -> tuple[list[Message], ChatSettings]:
    """What save_conversation wrote, validated."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadRequest(f"cannot read the file ({exc.strerror})", path) from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise BadRequest(f"not a saved conversation ({exc})", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise BadRequest('not a saved conversation (no "messages" list)', path)
    for message in data["messages"]:
        if not (isinstance(message, dict) and message.get("role") in ("user", "assistant", "tool")
                and isinstance(message.get("content"), str)):
            raise BadRequest(f"not a chat message: {json.dumps(message, ensure_ascii=False)[:80]}", path)
    stored = data.get("settings") or {}
    if not isinstance(stored, dict):
        raise BadRequest('"settings" must be an object', path)
    try:
        settings = ChatSettings(system=data.get("system"), **{k: v for k, v in stored.items() if k != "system"})
    except TypeError:
        raise BadRequest(f"unknown settings in {sorted(stored)}", path) from None
    return data["messages"], validate(settings, base)


def fit_context(messages: list[Message], count: Callable[[list[Message]], int], n_ctx: int,
                room: int) -> tuple[list[Message], int]:
    """Drop the oldest whole turns (a user message and what followed it) until the prompt plus `room` tokens for the
    reply fit `n_ctx`. `messages` ends with the new user message, which always stays; `count` measures a prompt, the
    system prompt included. Returns the kept messages and how many turns went; nothing goes when even the new message
    alone would not fit (the model then says so)."""
    kept, dropped = messages, 0
    while len(kept) > 1 and count(kept) + room > n_ctx:
        kept = kept[next(i for i in range(1, len(kept)) if kept[i].get("role") == "user"):]
        dropped += 1
    return (kept, dropped) if count(kept) < n_ctx else (messages, 0)


def turns(messages: list[Message]) -> str:
    n = sum(m["role"] == "user" for m in messages)
    return f"{n} turn{'' if n == 1 else 's'}"


# --- tools (`localqwen chat --mcp`) ------------------------------------------------------------------------------

APPROVAL_QUESTION = "Run {call}? [y]es, [n]o, [a]lways for this tool: "


def call_text(call: ToolCall) -> str:
    """A call the way the chat shows it: `name {"argument": value}`."""
    return f"{call.name} {json.dumps(call.arguments or {}, ensure_ascii=False)}"


class Approvals:
    """Which tool calls run without asking: tools named by --yes, and tools answered "always"."""

    def __init__(self, preapproved: Iterable[str] = ()) -> None:
        self.always = set(preapproved)

    def decide(self, call: ToolCall, ask: Callable[[str], str], stop: Callable[[], None]) -> bool:
        """Run `call`? Asks unless its tool is approved always; anything but yes or always refuses, and Ctrl+C or
        Ctrl+D at the question also stops the reply (`stop`)."""
        if call.name in self.always:
            return True
        try:
            answer = ask(APPROVAL_QUESTION.format(call=call_text(call))).strip().lower()
        except (KeyboardInterrupt, EOFError):
            stop()
            return False
        if answer in ("a", "always"):
            self.always.add(call.name or "")
        return answer in ("y", "yes", "a", "always")


def tool_list(tools: list[Tool], approvals: Approvals) -> str:
    """`/tools`: one line per tool, with its server, whether it runs without asking, and its description."""
    if not tools:
        return "no tools: start the chat with --mcp CONFIG.json to give the model MCP servers' tools"
    width = max(len(tool.name) for tool in tools)
    lines = [f"  {tool.name:<{width}}  {tool.origin or 'python'}{' (always)' * (tool.name in approvals.always)}  "
             f"{(tool.description.splitlines() or [''])[0]}" for tool in tools]
    return "\n".join(lines) + "\n(calls ask first unless marked always; --yes TOOL,... approves at start)"


def one_round(first: Event, events: Iterator[Event]) -> Iterator[Event]:
    """`first` and the tool loop's events after it up to the round's `done`: one reply for the chat to draw."""
    yield first
    for event in events if first.kind != "done" else ():
        yield event
        if event.kind == "done":
            return


RESULT_STYLES = {"ok": "dim", "refused": "yellow", "error": "red"}


def result_line(result: ToolResult, width: int) -> tuple[str, str]:
    """A tool result in one line cut to `width` characters, and its style."""
    text = "refused" if result.status == "refused" else " ".join(result.content.split())
    line = f"  → {result.call.name}: {text}"
    return line if len(line) <= width else line[:max(width - 1, 0)] + "…", RESULT_STYLES[result.status]
