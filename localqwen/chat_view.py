"""How the terminal chat draws a streamed reply: the thinking live and dimmed under a "Thinking..." header (with the
key that ends it, on a terminal), then a one-line summary when the answer starts; the answer as Markdown (plain text
when the output is not a terminal)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.text import Text

from localqwen.events import Event, Stats


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

    def __init__(self, console: Console, show_thinking: bool, count_tokens: Callable[[str], int],
                 hint: Callable[[], str] | None = None) -> None:
        """`hint`: what the thinking header says about the keys (answer now), asked at each refresh."""
        self.console, self.show_thinking, self.count_tokens, self.hint = console, show_thinking, count_tokens, hint
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
                    if not self.content:
                        self.end_thinking(None)  # a call ends the thinking as an answer does
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
        header = Text.assemble(("Thinking...", "bold"), (f" {time.perf_counter() - self.started:.0f} s", "dim"),
                               (f" · {self.hint()}" if self.hint else "", "dim"))
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
