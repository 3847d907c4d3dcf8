"""The `localqwen` command: thin click wrappers over the library functions apps call too."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from localqwen.constants import DEFAULT_REPO
from localqwen.convert import DEFAULT_QUANT, OUTPUT_TYPES, convert


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="localqwen")
def cli() -> None:
    """Run Qwen3-4B-Thinking-2507 on this machine, offline, through llama.cpp."""


@cli.command("convert")
@click.argument("source", default=DEFAULT_REPO)
@click.option("--quant", "-q", "quants", multiple=True, metavar="TYPE",
              help=f"Output type, repeatable: {', '.join(OUTPUT_TYPES)} (default {DEFAULT_QUANT}).")
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), help="Folder for the outputs (default: .).")
@click.option("--outfile", type=click.Path(dir_okay=False, path_type=Path), help="Exact output path (one --quant).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--keep-intermediate", is_flag=True, help="Keep the f16/bf16 file the quants were made from.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def convert_command(source: str, quants: tuple[str, ...], outdir: Path | None, outfile: Path | None, force: bool,
                    keep_intermediate: bool, quiet: bool) -> None:
    """Convert a Hugging Face checkpoint (folder or repo id) to GGUF files."""
    paths = convert(source, quants or (DEFAULT_QUANT,), outdir=outdir, outfile=outfile, force=force,
                    keep_intermediate=keep_intermediate, quiet=quiet)
    for path in paths:
        click.echo(str(path))


def main() -> None:
    # SIGTERM unwinds like Ctrl+C, so temporary files are removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cli()
