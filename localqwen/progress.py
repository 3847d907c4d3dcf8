"""Progress bars for long steps (conversion, quantization, downloads): on stderr, and only on a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

stderr_console = Console(stderr=True)


class AmountColumn(ProgressColumn):
    """Bytes and speed for byte bars, "12/398" for step bars."""

    def render(self, task: Task) -> Text:
        if task.fields.get("unit") == "bytes":
            return Text.assemble(DownloadColumn().render(task), " ", TransferSpeedColumn().render(task))
        return MofNCompleteColumn().render(task)


class Bars:
    """Hands out bars of one rich Progress; a disabled one (quiet, or not a terminal) draws nothing."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def bytes(self, description: str, total: int) -> Callable[[int], None]:
        """A bar counting bytes; returns the callback that advances it."""
        task = self.progress.add_task(description, total=total, unit="bytes")
        return lambda n: self.progress.advance(task, n)

    def steps(self, description: str) -> Callable[[int, int], None]:
        """A bar counting steps whose total is learnt on the way; returns update(done, total)."""
        task = self.progress.add_task(description, total=None, unit="steps")
        return lambda done, total: self.progress.update(task, completed=done, total=total)


@contextlib.contextmanager
def progress_bars(quiet: bool = False) -> Iterator[Bars]:
    columns = (TextColumn("{task.description}"), BarColumn(), AmountColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console, disable=quiet or not stderr_console.is_terminal,
                  transient=False) as progress:
        yield Bars(progress)
