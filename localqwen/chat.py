"""`localqwen chat`: an interactive terminal chat in the manner of Ollama's.

The thinking streams live and dimmed under a "Thinking..." header and collapses to a one-line summary when the answer
starts; the answer renders as Markdown (plain text when the output is not a terminal). Each turn sends the whole
conversation (llama.cpp reuses the cached prefix); turns that no longer fit the context are dropped, never silently.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.text import Text

from localqwen.conversation import (
    ChatSettings,
    Message,
    apply_set,
    fit_context,
    load_conversation,
    save_conversation,
    turns,
    validate,
)
from localqwen.errors import BadRequest, LocalqwenError
from localqwen.events import Event, Stats
from localqwen.model import Model
from localqwen.remote import RemoteModel

WARN_AT = 0.8  # share of the context in use after a reply that earns a warning
HELP = """\
/set KEY VALUE   temperature, top_p, top_k, min_p, presence_penalty, seed, max_tokens, thinking_budget
                 (a number, or "default"); system TEXT; thinking show|hide; verbose on|off
/show            model, quantization, context, memory plan and the current settings
/stats           timings and token counts of the last reply
/thinking        the last reply's thinking in full
/clear           forget the conversation (the system prompt stays)
/save FILE       save the conversation and settings as JSON; /load FILE restores them
/bye             leave (or Ctrl+D)
Alt+Enter (or Esc, Enter) starts a new line; \"\"\" opens and closes a multi-line message; Ctrl+C stops a reply."""



class Tail:
    """The last lines of a renderable that fit the screen (a live region taller than the screen cannot be redrawn).
    Long Markdown is cut at a blank line outside code fences first, so each refresh renders about a screenful."""

    def __init__(self, renderable: RenderableType | str, reserve: int = 1, keep: int = 6000) -> None:
        if isinstance(renderable, str):
            cut, fenced, pos = 0, False, 0
            for line in renderable.splitlines(keepends=True):
                pos += len(line)
                if pos > len(renderable) - keep:
                    break
                if line.lstrip().startswith(("```", "~~~")):
                    fenced = not fenced
                elif not fenced and not line.strip():
                    cut = pos
            renderable = Markdown(renderable[cut:])
        self.renderable, self.reserve = renderable, reserve

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in console.render_lines(self.renderable, options, pad=False)[-max(1, console.height - self.reserve):]:
            yield from line
            yield Segment.line()


class ReplyView:
    """Draws one streamed reply: the thinking apart (live, then a summary line), then the answer."""

    def __init__(self, console: Console, show_thinking: bool, count_tokens: Callable[[str], int]) -> None:
        self.console, self.show_thinking, self.count_tokens = console, show_thinking, count_tokens
        self.live = console.is_terminal  # else plain text, written as it comes
        self.thinking: list[str] = []
        self.content: list[str] = []
        self.started = time.perf_counter()
        self.region: Live | None = None
        self.summarized = False

    def run(self, events: Iterator[Event]) -> tuple[str, str, Stats]:
        stats = Stats(finish_reason="cancelled")
        self.show(self.thinking_view)
        try:
            for event in events:
                if event.kind == "thinking":
                    if not self.live and self.show_thinking:
                        self.write(("" if self.thinking else "Thinking...\n") + event.text)
                    self.thinking.append(event.text)
                elif event.kind == "content":
                    if not self.content:
                        self.end_thinking(None)
                        self.show(lambda: Tail("".join(self.content)))
                    self.content.append(event.text)
                    if not self.live:
                        self.write(event.text)
                elif event.tool_call is not None:
                    self.console.print(f"[tool call] {event.tool_call.raw}", style="dim", markup=False)
                elif event.stats is not None:
                    stats = event.stats
        except KeyboardInterrupt:  # a second Ctrl+C: stop now rather than at the next token
            events.close()  # type: ignore[attr-defined]
        finally:
            if not self.content:
                self.end_thinking(stats)
            elif self.live:
                self.show(None)
                self.console.print(Markdown("".join(self.content)))
            else:
                self.write("\n")
        return "".join(self.thinking), "".join(self.content), stats

    def show(self, view: Callable[[], RenderableType] | None) -> None:
        """Replace the live region (transient: it vanishes when replaced) with `view`, or with nothing."""
        if self.region is not None:
            self.region.stop()
            self.region = None
        if view is not None and self.live:
            self.region = Live(get_renderable=view, console=self.console, transient=True, refresh_per_second=8,
                               redirect_stdout=False, redirect_stderr=False)
            self.region.start()

    def thinking_view(self) -> RenderableType:
        header = Text.assemble(("Thinking...", "bold"), (f" {time.perf_counter() - self.started:.0f} s", "dim"))
        if not self.show_thinking:
            return header
        tail = "".join(self.thinking)[-self.console.width * self.console.height:].strip()
        return Group(header, Tail(Text(tail, style="dim"), reserve=2))

    def end_thinking(self, stats: Stats | None) -> None:
        """The one-line summary; `stats` when the reply ended inside the thinking (its token count is exact)."""
        self.show(None)
        if self.thinking and not self.summarized:
            if not self.live and self.show_thinking:
                self.write("\n")
            text = "".join(self.thinking)
            tokens = stats.thinking_tokens if stats and stats.thinking_tokens else self.count_tokens(text)
            note = {"cancelled": " (stopped)", "length": " (token limit)"}.get(stats.finish_reason, "") if stats else ""
            seconds = time.perf_counter() - self.started
            self.console.print(f"Thought for {tokens} tokens, {seconds:.1f} s{note}", style="dim", highlight=False,
                               soft_wrap=True)
        self.summarized = True

    def write(self, text: str) -> None:
        self.console.file.write(text)
        self.console.file.flush()


class ChatSession:
    """The conversation and the slash commands, apart from the prompt."""

    def __init__(self, model: Model | RemoteModel, settings: ChatSettings, console: Console) -> None:
        self.model, self.settings, self.console = model, validate(settings, model.sampling), console
        self.messages: list[Message] = []
        self.last: Stats | None = None
        self.last_thinking = ""
        self.used = 0  # context tokens the conversation takes

    def prompt_of(self, messages: list[Message]) -> list[Message]:
        return ([{"role": "system", "content": self.settings.system}] if self.settings.system else []) + messages

    def count(self, messages: list[Message]) -> int:
        if not messages:
            return 0
        if isinstance(self.model, RemoteModel) and not self.model.can_tokenize:  # what the last reply took
            return self.last.prompt_tokens + self.last.completion_tokens if self.last and self.messages else 0
        return len(self.model.tokenize_chat(self.prompt_of(messages)))

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
                   "save": self.save, "load": self.load}.get(name)
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
                  f"  finish      {st.finish_reason}; context {self.used}/{self.model.n_ctx} tokens")

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
        view = ReplyView(self.console, not s.hide_thinking, self.tokens_in)
        try:
            with self.interruptible():
                events = self.model.chat(self.prompt_of(messages), max_tokens=s.max_tokens,
                                         thinking_budget=s.thinking_budget, wait=0, **s.sampling)
                thinking, content, stats = view.run(events)
        except LocalqwenError as exc:
            self.note(f"Error: {exc.message}", style="red")
            return
        self.last, self.last_thinking = stats, thinking
        if stats.finish_reason == "cancelled":
            self.note("stopped: this exchange is not kept (Up recalls your message)", style="yellow")
        elif not content.strip():
            self.note("stopped at the token limit while thinking: no answer, the exchange is not kept "
                      "(raise /set max_tokens, or set /set thinking_budget)", style="yellow")
        else:
            if stats.finish_reason == "length":
                self.note(f"stopped at the token limit ({stats.completion_tokens} tokens): the answer is cut short",
                          style="yellow")
            reasoning = {"reasoning_content": thinking} if thinking else {}
            self.messages = [*messages, {"role": "assistant", "content": content, **reasoning}]
            self.used = self.count(self.messages)
        if s.verbose:
            self.stats()
        if self.used > WARN_AT * n_ctx:
            self.note(f"context {100 * self.used // n_ctx}% full ({self.used}/{n_ctx} tokens): the oldest turns will "
                      "be dropped to make room for new ones; /clear starts afresh", style="yellow")
        self.console.print()

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
            self.model.cancel()

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)




def read_message(session: Any) -> tuple[str, bool]:
    """One message from the prompt, and whether it was a \"\"\" block (where a leading / is text, not a command)."""
    line = session.prompt(">>> ")
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


def chat_repl(model: Model | RemoteModel, settings: ChatSettings, *, input: Any = None, output: Any = None) -> None:
    """The chat loop. `input`: a prompt_toolkit Input (default the terminal); `output`: a text stream for everything
    shown (default stdout; one that is not a terminal gets plain text)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, History, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.output import DummyOutput, create_output

    from localqwen.paths import home

    console = Console(file=output, highlight=False)
    chat = ChatSession(model, settings, console)
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
    name = f"{model.model_id} at {model.url}" if isinstance(model, RemoteModel) else model.path.name
    chat.note(f"localqwen chat · {name} · context {model.n_ctx} tokens · /help for commands, Ctrl+D or /bye to leave")
    while True:
        try:
            text, block = read_message(session)
            if text.startswith("/") and not block:
                if not chat.command(text):
                    break
            elif text:
                chat.send(text)
        except KeyboardInterrupt:  # at the prompt: the line is cleared
            continue
        except EOFError:
            break
