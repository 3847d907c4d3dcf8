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

A template can still behave on the probes and blow up on some other conversation, so at runtime (`chat_renderer`)
any template but the known one renders in a long-lived child process with the same memory limit and a per-render
timeout: a render that runs away is a one-line BadRequest for that request, the child is killed and replaced, and
the serving process never runs the template's code. The known template renders in-process, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

from localqwen import verdicts
from localqwen.errors import BadRequest, LocalqwenError, ModelFileError
from localqwen.prompt import Segment, render_chat
from localqwen.tokenizer_data import ADDED_TOKENS

MAX_TEMPLATE = 256 << 10  # bytes; Qwen3's is 4 kB
MAX_RENDERED = 1 << 20  # characters a probe conversation may render to (far beyond any real template's output)
PROBE_TIMEOUT_S = 10.0
PROBE_MEMORY = 1 << 30  # bytes of address space for the child (Python with Jinja needs ~100 MB)
PROBE_FORMAT = 1  # part of the verdict key: bump when the probe conversations or limits change
RENDER_TIMEOUT_S = 5.0  # one render at runtime (the known template renders a long conversation in milliseconds)
STARTUP_TIMEOUT_S = 60.0  # the renderer child's Python start, on a busy machine
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
        error, definite = _probe(template)
        if definite:
            verdicts.remember("template", key, ok=error is None, error=error or "")
    else:
        error = None if verdict["ok"] else verdict["error"]
    if error is not None:
        raise ModelFileError(error, path)


def _child_command(mode: str) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "HOME", "SYSTEMROOT", "LANG")}
    return [sys.executable, "-m", "localqwen.template_check", mode], env


def _probe(template: str) -> tuple[str | None, bool]:
    """Render the probes in a child process: (None if fine, else the one-line reason; whether to remember that)."""
    cmd, env = _child_command("probe")
    try:
        result = subprocess.run(cmd, input=template, capture_output=True, encoding="utf-8", errors="replace",
                                timeout=PROBE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:  # a busy machine could be slow too: refused now, probed again next time
        return f"the chat template did not finish rendering a probe conversation within {PROBE_TIMEOUT_S:g} s", False
    if result.returncode == 0:
        return None, True
    lines = result.stdout.strip().splitlines()
    if result.returncode == 1 and lines:
        return lines[-1], True
    if result.returncode < 0 or "MemoryError" in result.stderr:
        return "the chat template exhausted the probe's memory or CPU time limit", True
    return f"the chat template probe failed (exit status {result.returncode})", False


def _limit_self(cpu_seconds: int | None) -> None:
    """Hard limits for this (child) process, set before the template runs: the kernel enforces them."""
    try:
        import resource
    except ImportError:  # Windows: the parent's wall-clock timeout still applies
        return
    limits = [(getattr(resource, "RLIMIT_AS", None), PROBE_MEMORY), (getattr(resource, "RLIMIT_FSIZE", None), 0)]
    if cpu_seconds is not None:
        limits.append((resource.RLIMIT_CPU, cpu_seconds))
    for which, value in limits:
        if which is not None:
            with contextlib.suppress(ValueError, OSError):  # not supported here (RLIMIT_AS on macOS)
                resource.setrlimit(which, (value, value))


def _render_probes(template: str) -> str | None:
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


class Renderer(Protocol):
    def render(self, messages: list[Any], tools: list[Any] | None = None) -> list[Segment]: ...

    def close(self) -> None: ...


class InProcessRenderer:
    """The known template: rendered here (it is localqwen's own code in effect)."""

    def __init__(self, template: str, specials: list[str]) -> None:
        self.template, self.specials = template, specials

    def render(self, messages: list[Any], tools: list[Any] | None = None) -> list[Segment]:
        return render_chat(self.template, messages, self.specials, tools=tools)

    def close(self) -> None:
        pass


class ChildRenderer:
    """Any other template: rendered by prompt.render_chat in a long-lived child process with the probe's memory
    limit. A render that does not finish within RENDER_TIMEOUT_S, or kills the child, is a BadRequest; the child is
    replaced on the next render. Thread-safe (renders take turns: each is milliseconds)."""

    def __init__(self, template: str, specials: list[str]) -> None:
        self._setup = json.dumps({"template": template, "specials": specials})
        self._lock = threading.Lock()
        self._child: subprocess.Popen[str] | None = None
        self._replies: queue.Queue[str | None] = queue.Queue()

    def render(self, messages: list[Any], tools: list[Any] | None = None) -> list[Segment]:
        request = json.dumps({"messages": messages, "tools": tools}, default=str) + "\n"
        with self._lock:
            child = self._running()
            try:
                assert child.stdin is not None
                child.stdin.write(request)
                child.stdin.flush()
                line = self._replies.get(timeout=RENDER_TIMEOUT_S)
            except (OSError, queue.Empty):
                line = None
            if line is None:
                self._stop()
                raise BadRequest(f"the chat template did not render these messages within {RENDER_TIMEOUT_S:g} s and "
                                 "its memory limit")
        reply = json.loads(line)
        if "error" in reply:
            raise BadRequest(reply["error"])
        return [Segment(text, special) for text, special in reply["segments"]]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _running(self) -> subprocess.Popen[str]:
        if self._child is None or self._child.poll() is not None:
            cmd, env = _child_command("serve")
            child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, encoding="utf-8", env=env)
            self._replies = queue.Queue()
            threading.Thread(target=_forward_lines, args=(child, self._replies), daemon=True).start()
            assert child.stdin is not None
            self._child = child
            try:  # Python's start does not count against a render's time
                child.stdin.write(self._setup + "\n")
                child.stdin.flush()
                ready = self._replies.get(timeout=STARTUP_TIMEOUT_S)
            except (OSError, queue.Empty):
                ready = None
            if ready is None:
                self._stop()
                raise BadRequest("the chat template's renderer did not start")
        return self._child

    def _stop(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            self._child = None


def _forward_lines(child: subprocess.Popen[str], replies: queue.Queue[str | None]) -> None:
    assert child.stdout is not None
    for line in child.stdout:
        replies.put(line)
    replies.put(None)  # the child is gone


def chat_renderer(template: str, specials: list[str]) -> Renderer:
    """How Model renders prompts: in-process for the known template, in a bounded child process for any other."""
    if template == OFFICIAL_TEMPLATE:
        return InProcessRenderer(template, specials)
    return ChildRenderer(template, specials)


def _utf8_pipes() -> None:
    sys.stdin.reconfigure(encoding="utf-8")  # type: ignore[union-attr]  # whatever the locale says
    sys.stdout.reconfigure(encoding="utf-8")  # type: ignore[union-attr]


def _serve() -> int:
    """The renderer child: one setup line, then one JSON request per line, one JSON reply per line."""
    _utf8_pipes()
    _limit_self(cpu_seconds=None)  # long-lived: the parent's per-render timeout bounds time
    setup = json.loads(sys.stdin.readline())
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            segments = render_chat(setup["template"], request["messages"], setup["specials"], tools=request["tools"])
            reply: dict[str, Any] = {"segments": [[s.text, s.special] for s in segments]}
        except LocalqwenError as exc:
            reply = {"error": exc.message}
        except Exception as exc:  # untrusted code: whatever it raises is the template's failure
            reply = {"error": f"the chat template failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
        print(json.dumps(reply), flush=True)
    return 0


def _probe_main() -> int:
    _utf8_pipes()
    _limit_self(cpu_seconds=int(PROBE_TIMEOUT_S) + 1)
    template = sys.stdin.read()
    error = _render_probes(template)
    if error is not None:
        print(error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_serve() if sys.argv[1:] == ["serve"] else _probe_main())
