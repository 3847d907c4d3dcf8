"""Commands that fill and keep the store: `convert`, `pull`, `lock`, `verify`, `models`, `rm` (thin click wrappers
over localqwen.convert, localqwen.store and localqwen.lock)."""

from __future__ import annotations

from pathlib import Path

import click

from localqwen.cli.edge import Command, human_size, note, print_json
from localqwen.cli.options import JSON_OPTION, QUIET_OPTION
from localqwen.constants import DEFAULT_QUANT, DEFAULT_REPO
from localqwen.convert import OUTPUT_TYPES
from localqwen.errors import HubError

LOCK_OPTION = click.option("--lock", "lock_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                           help="The lock file to verify against and record into (default: models.lock in the store).")
QUANT_OPTION = click.option("--quant", "-q", "quants", multiple=True, metavar="TYPE",
                            help=f"Output type, repeatable: {', '.join(OUTPUT_TYPES)} (default {DEFAULT_QUANT}).")


@click.command("convert", cls=Command)
@click.argument("source", default=DEFAULT_REPO)
@QUANT_OPTION
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), help="Folder for the outputs (default: .).")
@click.option("--outfile", type=click.Path(dir_okay=False, path_type=Path), help="Exact output path (one --quant).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--keep-intermediate", is_flag=True, help="Keep the f16/bf16 file the quants were made from.")
@QUIET_OPTION
def convert_command(source: str, quants: tuple[str, ...], outdir: Path | None, outfile: Path | None, force: bool,
                    keep_intermediate: bool, quiet: bool) -> None:
    """Convert a Hugging Face checkpoint (folder or repo id) to GGUF files."""
    from localqwen.convert import convert

    paths = convert(source, quants or (DEFAULT_QUANT,), outdir=outdir, outfile=outfile, force=force,
                    keep_intermediate=keep_intermediate, quiet=quiet)
    for path in paths:
        click.echo(str(path))


@click.command("pull", cls=Command)
@click.argument("repo", required=False)
@QUANT_OPTION
@click.option("--revision", metavar="REV", help="Branch, tag or commit (default: the lock's pin, else main).")
@click.option("--gguf", "gguf_spec", metavar="REPO:FILE", help="Pull a ready GGUF file from a GGUF repository instead.")
@LOCK_OPTION
@click.option("--force", is_flag=True, help="Rebuild and replace GGUFs already in the store.")
@QUIET_OPTION
def pull_command(repo: str | None, quants: tuple[str, ...], revision: str | None, gguf_spec: str | None,
                 lock_file: Path | None, force: bool, quiet: bool) -> None:
    """Download REPO (default Qwen/Qwen3-4B-Thinking-2507) from the Hugging Face hub, verify it against the lock and
    convert it into the store. Downloads go to the shared Hugging Face cache; HF_TOKEN, HF_ENDPOINT and
    HF_HUB_OFFLINE are respected."""
    from localqwen.store import pull, pull_gguf

    if gguf_spec is not None:
        if repo or quants:
            raise click.UsageError("--gguf REPO:FILE pulls one ready file: give no REPO and no --quant with it")
        click.echo(str(pull_gguf(gguf_spec, revision=revision, lock_file=lock_file, force=force, quiet=quiet,
                                 echo=note)))
        return
    for path in pull(repo or DEFAULT_REPO, quants or (DEFAULT_QUANT,), revision=revision, lock_file=lock_file,
                     force=force, quiet=quiet, echo=note):
        click.echo(str(path))


@click.command("lock", cls=Command)
@click.argument("repo", required=False)
@click.option("--revision", metavar="REV", help="Branch, tag or commit to pin (default: main).")
@click.option("--gguf", "gguf_spec", metavar="REPO:FILE", help="Pin one file of a GGUF repository.")
@LOCK_OPTION
@QUIET_OPTION
def lock_command(repo: str | None, revision: str | None, gguf_spec: str | None, lock_file: Path | None,
                 quiet: bool) -> None:
    """Record or update REPO's pins (its revision's commit, every file's size and sha256) from the real bytes."""
    from localqwen.store import parse_gguf_spec, relock

    if gguf_spec is not None:
        if repo:
            raise click.UsageError("give either REPO or --gguf REPO:FILE")
        repo, filename = parse_gguf_spec(gguf_spec)
        relock(repo, gguf_file=filename, revision=revision, lock_file=lock_file, quiet=quiet, echo=note)
    else:
        relock(repo or DEFAULT_REPO, revision=revision, lock_file=lock_file, quiet=quiet, echo=note)


@click.command("verify", cls=Command)
@LOCK_OPTION
@JSON_OPTION
@QUIET_OPTION
def verify_command(lock_file: Path | None, as_json: bool, quiet: bool) -> None:
    """Re-hash every GGUF in the store against the lock; exits non-zero if one differs."""
    from localqwen.store import verify_store

    results = verify_store(lock_file, quiet=quiet)
    if as_json:
        print_json([{"path": r.path, "status": r.status, "detail": r.detail} for r in results])
    else:
        for r in results:
            click.echo(f"{r.status:<9} {r.path}" + (f"  ({r.detail})" if r.detail else ""))
        if not results:
            click.echo("the store holds no models")
    bad = [r for r in results if r.status == "mismatch"]
    if bad:
        raise HubError(f"{len(bad)} file(s) in the store do not match the lock: {bad[0].path} first")


@click.command("models", cls=Command)
@JSON_OPTION
def models_command(as_json: bool) -> None:
    """List the models in the store: name, quant, size, context, path."""
    from localqwen.store import list_models, models_dir

    found = list_models()
    if as_json:
        print_json([m.to_dict() for m in found])
        return
    if not found:
        click.echo(f"no models in {models_dir()}: `localqwen pull` gets the default one")
        return
    width = max(len(m.name) for m in found)
    click.echo(f"{'NAME':<{width}}  {'QUANT':<8} {'SIZE':>10} {'CONTEXT':>8}  PATH")
    for m in found:
        click.echo(f"{m.name:<{width}}  {m.quant:<8} {human_size(m.size):>10} {m.context:>8}  {m.path}")


@click.command("rm", cls=Command)
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def rm_command(names: tuple[str, ...]) -> None:
    """Delete models from the store, by name (see `localqwen models`)."""
    from localqwen.store import remove_model

    for name in names:
        click.echo(f"removed {remove_model(name)}")


COMMANDS = (convert_command, pull_command, lock_command, verify_command, models_command, rm_command)
