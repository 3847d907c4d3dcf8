"""Render the model's own chat template so that only the template's structure can be special tokens.

The template (Jinja, from the GGUF) is rendered in Jinja's sandbox. Before rendering, every special-token text
inside user-supplied strings (message content, reasoning, tool calls, tool definitions) is swapped for an opaque
placeholder; after rendering, the output is cut at the placeholders into segments. Segments from the template
are tokenized with special tokens enabled, the placeholders' original text with them disabled: a user who types
`<|im_start|>` gets the characters, never the control token.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localqwen.constants import THINK_CLOSE, THINK_OPEN
from localqwen.errors import BadRequest, ModelFileError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Segment:
    text: str
    special: bool  # may the text contain special tokens (template structure) or not (user text)


def tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # As transformers renders chat templates: no HTML escaping, non-ASCII kept.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message: str) -> None:
    raise TemplateError(message)


ENVIRONMENT = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
ENVIRONMENT.filters["tojson"] = tojson
ENVIRONMENT.globals["raise_exception"] = raise_exception


@functools.lru_cache(maxsize=4)
def compile_template(template: str) -> Any:
    try:
        return ENVIRONMENT.from_string(template)
    except TemplateError as exc:
        raise ModelFileError(f"the chat template does not compile: {exc}") from None


def content_text(content: Any, role: str) -> str:
    """OpenAI messages carry content as a string, null, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise BadRequest(f"{role} message content must be a string or a list of text parts")


def normalize_message(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise BadRequest(f"each message needs a role among {', '.join(ROLES)}")
    out = dict(message)
    out["content"] = content_text(message.get("content"), message["role"])
    # Clients often send back the raw output: move "<think>...</think>" into reasoning_content, as the template would.
    raw_output = not isinstance(out.get("reasoning_content"), str) and THINK_CLOSE in out["content"]
    if out["role"] == "assistant" and raw_output:
        reasoning, _, answer = out["content"].partition(THINK_CLOSE)
        out["reasoning_content"] = reasoning.split(THINK_OPEN)[-1].strip("\n")
        out["content"] = answer.lstrip("\n")
    return out


class Protector:
    """Swaps special-token texts for placeholders nobody can type (a random nonce per prompt) and back; also
    brings user text to NFC."""

    def __init__(self, specials: list[str]) -> None:
        self.nonce = secrets.token_hex(8)
        self.specials = sorted(set(specials), key=len, reverse=True)
        self.find = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None
        self.placeholder = re.compile(f"\ue000{self.nonce}(\\d+)\ue001")

    def protect(self, value: Any) -> Any:
        if isinstance(value, str):
            # The tokenizer normalizes to NFC; llama.cpp does not, so user text is normalized here.
            value = unicodedata.normalize("NFC", value)
            if self.find is None:
                return value
            return self.find.sub(lambda m: f"\ue000{self.nonce}{self.specials.index(m[0])}\ue001", value)
        if isinstance(value, list):
            return [self.protect(v) for v in value]
        if isinstance(value, dict):
            return {k: self.protect(v) for k, v in value.items()}
        return value

    def segments(self, rendered: str) -> list[Segment]:
        out: list[Segment] = []
        pos = 0
        for match in self.placeholder.finditer(rendered):
            out.append(Segment(rendered[pos:match.start()], True))
            out.append(Segment(self.specials[int(match[1])], False))
            pos = match.end()
        out.append(Segment(rendered[pos:], True))
        return [s for s in out if s.text]


def render_chat(template: str, messages: list[Any], specials: list[str], *, tools: list[Any] | None = None,
                add_generation_prompt: bool = True) -> list[Segment]:
    """Render `messages` (and `tools`) with the model's template into segments ready for tokenization."""
    if not messages:
        raise BadRequest("at least one message is needed")
    protector = Protector(specials)
    safe_messages = protector.protect([normalize_message(m) for m in messages])
    safe_tools = protector.protect(tools) if tools else None
    try:
        rendered = compile_template(template).render(
            messages=safe_messages, tools=safe_tools, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError, RecursionError, MemoryError) as exc:
        # The template is the GGUF's code: however it fails on these messages, the caller gets one line.
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__  # MemoryError() says nothing
        raise BadRequest(f"the chat template failed: {detail}") from None
    return protector.segments(rendered)
