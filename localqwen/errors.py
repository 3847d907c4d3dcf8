"""The one exception type for expected failures: a one-line message, a non-zero exit, no traceback."""

from __future__ import annotations

from pathlib import Path

import click


class LocalqwenError(click.ClickException):
    """An expected failure (bad input, missing file, full disk). Apps catch it; the CLI prints `Error: <message>`."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path is not None else message)
