"""Where library exceptions become click errors: every localqwen command runs through `Command.invoke`, so a
LocalqwenError from anywhere below prints `Error: <one line>` and exits 1, with no traceback."""

from __future__ import annotations

import json
from typing import Any

import click

from localqwen.errors import LocalqwenError


class Command(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LocalqwenError as exc:
            raise click.ClickException(one_line(exc.message)) from None


def one_line(message: str) -> str:
    """Messages quote what came from files and requests (keys, names, values): whatever those hold, the user gets
    one printable line (no forged second line, no terminal escape sequences)."""
    return "".join(ch if ch.isprintable() else " " if ch in "\n\r\t" else "?" for ch in message)


class Group(click.Group):
    command_class = Command


def note(line: str) -> None:
    """A progress or status line for the user, on stderr (stdout carries results)."""
    click.echo(line, err=True)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
