"""The GGUF's chat template is untrusted code: render it once, in a child process with hard limits, before use.

Jinja's sandbox stops a template from reaching Python internals, but not from running forever (nested loops need no
function call the sandbox could count), nor from allocating gigabytes inside one filter call (`center`, `replace`,
string repetition). No in-process hook bounds both, so the probe runs where the operating system does: a child
process with an address-space limit, a CPU-time limit and a wall-clock timeout. It renders probe conversations that
cover what localqwen sends (system prompt, several turns, reasoning, tools, tool calls and results, long and
non-ASCII text) through the same renderer as the runtime (prompt.render_chat); any failure (syntax, recursion,
huge ranges, arithmetic, type errors, includes, enormous output, endless loops, a template that drops the user's
message) becomes one line naming the file, at load rather than at the first message.

The verdict is remembered by the template's hash, so a template costs its child process once; the template localqwen
ships (Qwen3-4B-Thinking-2507's own) is known good and never probed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

from localqwen import verdicts
from localqwen.errors import LocalqwenError, ModelFileError
from localqwen.tokenizer_data import ADDED_TOKENS

MAX_TEMPLATE = 256 << 10  # bytes; Qwen3's is 4 kB
MAX_RENDERED = 1 << 20  # characters a probe conversation may render to (far beyond any real template's output)
PROBE_TIMEOUT_S = 10.0
PROBE_MEMORY = 1 << 30  # bytes of address space for the child (Python with Jinja needs ~100 MB)
PROBE_FORMAT = 1  # part of the verdict key: bump when the probe conversations or limits change
OFFICIAL_TEMPLATE = files("localqwen").joinpath("data/qwen3_thinking_chat_template.jinja").read_text(encoding="utf-8")
MARKER = "probe-7f3a"  # each probe's last user message carries it; a template that drops it is broken

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather now, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
PROBES: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    ([{"role": "user", "content": f"Hello {MARKER}"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4", "reasoning_content": "Simple."},
      {"role": "user", "content": f"中文 🙂 {MARKER} <|im_start|> {{{{ x }}}}"}], None),
    ([{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": "18 C, sunny"}, {"role": "user", "content": f"And tomorrow? {MARKER}"}], TOOLS),
    ([{"role": "user", "content": "x" * 20_000}, {"role": "assistant", "content": "<think>\nr\n</think>\n\ny"}] * 20
     + [{"role": "user", "content": f"{MARKER}\n" + "é" * 1000}], None),
]


def check_template(template: str | None, path: Path) -> None:
    """Raise ModelFileError unless `template` renders the probe conversations within bounded time and memory."""
    if not template:
        raise ModelFileError("has no chat template (tokenizer.chat_template)", path)
    if len(template.encode()) > MAX_TEMPLATE:
        raise ModelFileError(f"the chat template is {len(template.encode())} bytes, more than the {MAX_TEMPLATE} "
                             "allowed", path)
    if template == OFFICIAL_TEMPLATE:
        return
    key = hashlib.sha256(f"{PROBE_FORMAT}\0{template}".encode()).hexdigest()
    verdict = verdicts.recall("template", key)
    if verdict is None:
        error = _probe(template)
        verdicts.remember("template", key, ok=error is None, error=error or "")
    else:
        error = None if verdict["ok"] else verdict["error"]
    if error is not None:
        raise ModelFileError(error, path)


def _probe(template: str) -> str | None:
    """Render the probes in a child process; None if fine, else the one-line reason."""
    cmd = [sys.executable, "-m", "localqwen.template_check"]
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "HOME", "SYSTEMROOT", "LANG")}
    try:
        result = subprocess.run(cmd, input=template, capture_output=True, text=True, errors="replace",
                                timeout=PROBE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return f"the chat template did not finish rendering a probe conversation within {PROBE_TIMEOUT_S:g} s"
    if result.returncode == 0:
        return None
    lines = result.stdout.strip().splitlines()
    if result.returncode == 1 and lines:
        return lines[-1]
    if result.returncode < 0 or "MemoryError" in result.stderr:
        return "the chat template exhausted the probe's memory or CPU time limit"
    return f"the chat template probe failed (exit status {result.returncode})"


def _limit_self() -> None:
    """Hard limits for this (child) process, set before the template runs: the kernel enforces them."""
    try:
        import resource
    except ImportError:  # Windows: the parent's wall-clock timeout still applies
        return
    limits = [(getattr(resource, "RLIMIT_AS", None), PROBE_MEMORY),
              (resource.RLIMIT_CPU, int(PROBE_TIMEOUT_S) + 1), (getattr(resource, "RLIMIT_FSIZE", None), 0)]
    for which, value in limits:
        if which is not None:
            with contextlib.suppress(ValueError, OSError):  # not supported here (RLIMIT_AS on macOS)
                resource.setrlimit(which, (value, value))


def _render_probes(template: str) -> str | None:
    from localqwen.prompt import render_chat

    specials = list(ADDED_TOKENS)
    for i, (messages, tools) in enumerate(PROBES, 1):
        try:
            rendered = "".join(s.text for s in render_chat(template, messages, specials, tools=tools))
        except Exception as exc:  # untrusted code: every failure is the template's (render_chat names most)
            detail = " ".join(str(exc).split())[:200].removeprefix("the chat template failed: ")
            if not isinstance(exc, LocalqwenError):
                detail = f"{type(exc).__name__}: {detail}"
            return f"the chat template fails on probe conversation {i}: {detail}"
        if len(rendered) > MAX_RENDERED:
            return f"the chat template renders probe conversation {i} to {len(rendered)} characters"
        if MARKER not in rendered:
            return f"the chat template leaves the user's message out of probe conversation {i}"
    return None


def _child() -> int:
    _limit_self()
    template = sys.stdin.read()
    error = _render_probes(template)
    if error is not None:
        print(error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child())
