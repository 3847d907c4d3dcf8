"""The `localqwen` command: thin click wrappers over the library functions apps call too.

    generate.py    run, chat, serve
    models.py      convert, pull, lock, verify, models, rm
    inspection.py  info, plan, doctor
    handoff.py     handoff llama-server|vllm (the command that serves this model on a serving engine)
    options.py     option groups shared by several commands (model, memory, generation options)
    edge.py        library exceptions become one-line click errors
"""

from __future__ import annotations

import signal
import sys

import click

from localqwen.cli import generate, handoff, inspection, models
from localqwen.cli.edge import Group

__all__ = ["cli", "main"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="localqwen")
def cli() -> None:
    """Run Qwen3-4B-Thinking-2507 on this machine, offline, through llama.cpp."""


for command in (*generate.COMMANDS, *models.COMMANDS, *inspection.COMMANDS, *handoff.COMMANDS):
    cli.add_command(command)


def main() -> None:
    # SIGTERM unwinds like Ctrl+C, so temporary files are removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cli()
