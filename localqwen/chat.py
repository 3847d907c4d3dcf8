"""`localqwen chat`: an interactive terminal chat in the manner of Ollama's.

The thinking streams live and dimmed under a "Thinking..." header and collapses to a one-line summary when the answer
starts; Enter while it thinks makes the model answer now (chat_keys). The answer renders as Markdown (plain text when
the output is not a terminal). Each turn sends the whole
conversation (llama.cpp reuses the cached prefix); turns that no longer fit the context are dropped, never silently.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from localqwen.chat_keys import ANSWER_NOW_HINT, watch_keys
from localqwen.chat_view import ReplyView
from localqwen.conversation import (
    Approvals,
    ChatSettings,
    Message,
    apply_set,
    fit_context,
    load_conversation,
    one_round,
    result_line,
    save_conversation,
    tool_list,
    turns,
    validate,
)
from localqwen.errors import BadRequest, LocalqwenError
from localqwen.events import Event, Stats
from localqwen.model import Model
from localqwen.remote import RemoteModel
from localqwen.tools import Tool

WARN_AT = 0.8  # share of the context in use after a reply that earns a warning
HELP = """\
/set KEY VALUE   temperature, top_p, top_k, min_p, presence_penalty, seed, max_tokens, thinking_budget
                 (a number, or "default"); system TEXT; thinking show|hide; verbose on|off
/show            model, quantization, context, memory plan and the current settings
/stats           timings and token counts of the last reply
/thinking        the last reply's thinking in full
/tools           the tools the model may call (--mcp) and which run without asking
/clear           forget the conversation (the system prompt stays)
/save FILE       save the conversation and settings as JSON; /load FILE restores them
/bye             leave (or Ctrl+D)
Alt+Enter (or Esc, Enter) starts a new line; \"\"\" opens and closes a multi-line message; Ctrl+C stops a reply;
Enter while the model thinks makes it answer now."""


class ChatSession:
    """The conversation and the slash commands, apart from the prompt."""

    def __init__(self, model: Model | RemoteModel, settings: ChatSettings, console: Console,
                 tools: list[Tool] | None = None, approvals: Approvals | None = None) -> None:
        self.model, self.settings, self.console = model, validate(settings, model.sampling), console
        self.tools, self.approvals = tools or [], approvals or Approvals()
        self.tool_schemas = [tool.schema() for tool in self.tools] or None
        self.ask: Callable[[str], str] = lambda question: "no"  # chat_repl asks through the prompt
        self.run: Any = None  # the tool loop's run of the reply in progress
        self.messages: list[Message] = []
        self.last: Stats | None = None
        self.last_thinking = ""
        self.used = 0  # context tokens the conversation takes
        self.keys_fd: int | None = None  # the terminal to read keys from while a reply streams (chat_repl sets it)
        self.typed = ""  # text typed while a reply streamed: the next prompt starts with it

    def prompt_of(self, messages: list[Message]) -> list[Message]:
        return ([{"role": "system", "content": self.settings.system}] if self.settings.system else []) + messages

    def count(self, messages: list[Message]) -> int:
        if not messages:
            return 0
        if isinstance(self.model, RemoteModel) and not self.model.can_tokenize:  # what the last reply took
            return self.last.prompt_tokens + self.last.completion_tokens if self.last and self.messages else 0
        return len(self.model.tokenize_chat(self.prompt_of(messages), self.tool_schemas))

    def tokens_in(self, text: str) -> int:
        if isinstance(self.model, RemoteModel) and not self.model.can_tokenize:
            return len(text.encode()) // 4  # about 4 bytes per token of English text
        return len(self.model.tokenize(text))

    def note(self, text: str, style: str = "dim") -> None:
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def toolbar(self) -> str:
        return f" ctx {self.used}/{self.model.n_ctx} · /help · Alt+Enter new line · Ctrl+D quit"

    def command(self, line: str) -> bool:
        """Run one slash command; False when the chat should end."""
        name, _, arg = line.strip()[1:].partition(" ")
        handler = {"help": self.help, "?": self.help, "set": self.set, "show": self.show, "stats": self.stats,
                   "thinking": lambda arg: self.note(self.last_thinking or "no thinking yet"), "clear": self.clear,
                   "save": self.save, "load": self.load,
                   "tools": lambda arg: self.note(tool_list(self.tools, self.approvals), style="")}.get(name)
        if name in ("bye", "exit", "quit"):
            return False
        try:
            if handler is None:
                raise BadRequest(f"unknown command /{name}: /help lists the commands")
            handler(arg.strip())
        except LocalqwenError as exc:
            self.note(f"Error: {exc.message}", style="red")
        return True

    def help(self, arg: str) -> None:
        self.note(HELP, style="")

    def set(self, arg: str) -> None:
        self.settings, message = apply_set(self.settings, self.model.sampling, arg)
        self.used = self.count(self.messages)  # the system prompt may have changed
        self.note(message)

    def show(self, arg: str) -> None:
        s = self.settings
        sampling = self.model.sampling.with_overrides(**s.sampling).to_dict()
        rows = {**(self.model.describe(self.used) if isinstance(self.model, RemoteModel) else self.local_rows()),
                **{k: "random" if v is None else v for k, v in sampling.items()},
                "max_tokens": s.max_tokens or "default",
                "thinking_budget": "none" if s.thinking_budget is None else s.thinking_budget,
                "thinking": "hide" if s.hide_thinking else "show", "verbose": "on" if s.verbose else "off",
                "system": s.system or "(none)"}
        self.note("\n".join(f"  {k:<17}{v}" for k, v in rows.items()), style="")

    def local_rows(self) -> dict[str, Any]:
        assert isinstance(self.model, Model)
        plan = self.model.plan.to_dict()
        sizes = [f"{k.removesuffix('_cpu')} {v / 2**20:.0f}" for k, v in plan.items()
                 if k.endswith(("_cpu", "_gpu", "output")) and k not in ("total_cpu", "total_gpu") and v]
        return {"model": self.model.path, "quant": self.model.meta.quant.upper() or "?",
                "context": f"{self.model.n_ctx} tokens, {self.used} in use",
                "memory": f"{plan['total'] / 2**20:.0f} MiB ({', '.join(sizes)} MiB)",
                "kv cache": f"{plan['kv_type']}, flash attention {'on' if plan['flash_attn'] else 'off'}, "
                            f"{plan['gpu_layers']} GPU layers"}

    def stats(self, arg: str = "") -> None:
        if self.last is None:
            raise BadRequest("no reply yet")
        st, t = self.last, self.last.timings
        cached = getattr(st, "cached_prompt_tokens", 0)  # reused from the previous turn's KV cache
        self.note(f"  prompt      {st.prompt_tokens} tokens{f' ({cached} cached)' if cached else ''}, "
                  f"{t.get('prompt_tokens_per_s', 0)} tokens/s, first token after {t.get('prompt_eval_s', 0):.2f} s\n"
                  f"  generation  {st.completion_tokens} tokens ({st.thinking_tokens} thinking, {st.content_tokens} "
                  f"answer), {t.get('tokens_per_s', 0)} tokens/s over {t.get('generation_s', 0):.2f} s\n"
                  f"  finish      {st.finish_reason}; context {self.used}/{self.model.n_ctx} tokens"
                  + (f"\n  thinking    wrapped up by the {st.wrap_up.replace('_', ' ')}" if st.wrap_up else ""))

    def clear(self, arg: str) -> None:
        self.messages, self.used = [], 0
        self.note("conversation cleared")

    def save(self, arg: str) -> None:
        if not arg:
            raise BadRequest("/save needs a file name")
        try:
            save_conversation(Path(arg).expanduser(), self.messages, self.settings)
        except OSError as exc:
            raise LocalqwenError(f"cannot write ({exc.strerror})", arg) from None
        self.note(f"saved {turns(self.messages)} to {arg}")

    def load(self, arg: str) -> None:
        if not arg:
            raise BadRequest("/load needs a file name")
        self.messages, self.settings = load_conversation(Path(arg).expanduser(), self.model.sampling)
        self.used = self.count(self.messages)
        self.note(f"loaded {turns(self.messages)} from {arg} (ctx {self.used}/{self.model.n_ctx})")

    def send(self, text: str) -> None:
        s, n_ctx = self.settings, self.model.n_ctx
        room = min(s.max_tokens or n_ctx // 4, n_ctx // 2)  # kept free for the reply
        messages, dropped = fit_context([*self.messages, {"role": "user", "content": text}], self.count, n_ctx, room)
        if dropped:
            self.messages = messages[:-1]
            self.note(f"dropped {dropped} earlier turn{'s' * (dropped > 1)} to fit the context", style="yellow")
        options = {"max_tokens": s.max_tokens, "thinking_budget": s.thinking_budget, "wait": 0, **s.sampling}
        try:
            with self.interruptible():
                if self.tools:
                    thinking, content, stats, added = self.act(self.prompt_of(messages), options)
                else:
                    stream = self.model.chat(self.prompt_of(messages), **options)
                    thinking, content, stats = self.draw(stream, stream.end_thinking)
                    added = [{"role": "assistant", "content": content, **(
                        {"reasoning_content": thinking} if thinking else {})}]
        except LocalqwenError as exc:
            self.note(f"Error: {exc.message}", style="red")
            return
        self.last, self.last_thinking = stats, thinking
        if stats.finish_reason == "cancelled":
            self.note("stopped: this exchange is not kept (Up recalls your message)", style="yellow")
        elif not content.strip() and stats.finish_reason != "tool_calls":
            self.note("stopped at the token limit while thinking: no answer, the exchange is not kept "
                      "(raise /set max_tokens, or set /set thinking_budget)", style="yellow")
        else:
            if stats.finish_reason == "length":
                self.note(f"stopped at the token limit ({stats.completion_tokens} tokens): the answer is cut short",
                          style="yellow")
            elif stats.finish_reason == "tool_calls":  # the tool loop ran out of rounds
                self.note("stopped at the round limit: the last round's tool calls did not run", style="yellow")
            self.messages = [*messages, *added]
            self.used = self.count(self.messages)
        if s.verbose:
            self.stats()
        if self.used > WARN_AT * n_ctx:
            self.note(f"context {100 * self.used // n_ctx}% full ({self.used}/{n_ctx} tokens): the oldest turns will "
                      "be dropped to make room for new ones; /clear starts afresh", style="yellow")
        self.console.print()

    def draw(self, events: Iterator[Event], end_thinking: Callable[[], None]) -> tuple[str, str, Stats]:
        """Draw one reply as it streams; on a terminal, Enter while it thinks calls `end_thinking` (answer now)."""
        remote_without_tokenizer = isinstance(self.model, RemoteModel) and not self.model.can_tokenize
        with watch_keys(None if remote_without_tokenizer else self.keys_fd, end_thinking) as keys:
            hint = None if keys is None else lambda: "answering now" if keys.pressed else ANSWER_NOW_HINT
            shown = ReplyView(self.console, not self.settings.hide_thinking, self.tokens_in, hint).run(events)
        self.typed += keys.typed if keys is not None else ""
        return shown

    def act(self, prompt: list[Message], options: dict[str, Any]) -> tuple[str, str, Stats, list[Message]]:
        """A reply through the tool loop: each round drawn as a reply, each call asked for, each result one line.
        The next event is taken before a round's view starts, so approvals are asked with no live region drawn."""
        self.run = self.model.act(prompt, tools=self.tools, **options,
                                  on_call=lambda call: self.approvals.decide(call, self.ask, self.stop))
        events, shown = iter(self.run), ("", "", Stats(finish_reason="cancelled"))
        while (first := next(events, None)) is not None:
            if first.tool_result is None:
                shown = self.draw(one_round(first, events), self.run.end_thinking)
            else:
                self.note(*result_line(first.tool_result, self.console.width))
        if self.run.finish_reason == "cancelled":  # between rounds too, or at a question
            shown = (*shown[:2], replace(shown[2], finish_reason="cancelled"))
        return *shown, self.run.messages

    def stop(self) -> None:
        """Stop the reply in progress: its generation, and the tool loop's later calls and rounds."""
        if self.run is not None:
            self.run.cancel()
        self.model.cancel()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Ctrl+C during a reply: the first stops it at the next token, a second at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        asked = False

        def on_interrupt(signum: int, frame: Any) -> None:
            nonlocal asked
            if asked:
                raise KeyboardInterrupt
            asked = True
            self.stop()

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def read_message(session: Any, typed: str = "") -> tuple[str, bool]:
    """One message from the prompt (starting with `typed`), and whether it was a \"\"\" block (where a leading / is
    text, not a command)."""
    line = session.prompt(">>> ", default=typed)
    if not line.lstrip().startswith('"""'):
        return line.strip(), False
    text = line.lstrip()[3:]
    while not text.rstrip().endswith('"""'):
        text += "\n" + session.prompt("... ")
    return text.rstrip()[:-3].strip(), True


class PlainPrompt:
    """The prompt when stdin or stdout is not a terminal: lines from stdin, echoed to make the output a transcript."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def prompt(self, message: str, **kwargs: Any) -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        self.console.file.write(message + line)
        return line.rstrip("\n")


def chat_repl(model: Model | RemoteModel, settings: ChatSettings, *, input: Any = None, output: Any = None,
              tools: list[Tool] | None = None, approvals: Approvals | None = None) -> None:
    """The chat loop. `input`: a prompt_toolkit Input (default the terminal); `output`: a text stream for everything
    shown (default stdout; one that is not a terminal gets plain text); `tools`: what the model may call (asking)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, History, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.output import DummyOutput, create_output

    from localqwen.paths import home

    console = Console(file=output, highlight=False)
    chat = ChatSession(model, settings, console, tools, approvals)
    history: History = InMemoryHistory()
    with contextlib.suppress(OSError):
        home().mkdir(parents=True, exist_ok=True)
        (home() / "chat_history").touch()
        history = FileHistory(str(home() / "chat_history"))
    bindings = KeyBindings()
    bindings.add("escape", "enter")(lambda event: event.current_buffer.insert_text("\n"))
    session: Any = PlainPrompt(console) if input is None and output is None and not (
        sys.stdin.isatty() and sys.stdout.isatty()) else PromptSession(
        history=history, key_bindings=bindings, bottom_toolbar=chat.toolbar, prompt_continuation="... ",
        placeholder=[("#888888", "Send a message (/? for help)")], input=input,
        output=None if output is None else create_output(output) if output.isatty() else DummyOutput())
    chat.ask = session.prompt if isinstance(session, PlainPrompt) else PromptSession(  # approvals: no history
        input=session.input, output=session.output).prompt
    if input is None and isinstance(session, PromptSession):  # the terminal: keys while a reply streams too
        chat.keys_fd = sys.stdin.fileno()
    name = f"{model.model_id} at {model.url}" if isinstance(model, RemoteModel) else model.path.name
    chat.note(f"localqwen chat · {name} · context {model.n_ctx} tokens · /help for commands, Ctrl+D or /bye to leave")
    while True:
        try:
            typed, chat.typed = chat.typed, ""
            text, block = read_message(session, typed)
            if text.startswith("/") and not block:
                if not chat.command(text):
                    break
            elif text:
                chat.send(text)
        except KeyboardInterrupt:  # at the prompt: the line is cleared
            continue
        except EOFError:
            break
