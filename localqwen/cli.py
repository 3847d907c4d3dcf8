"""The `localqwen` command: thin click wrappers over the library functions apps call too."""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from localqwen.constants import DEFAULT_CONTEXT, DEFAULT_REPO
from localqwen.convert import DEFAULT_QUANT, OUTPUT_TYPES, convert
from localqwen.plan import KV_TYPES
from localqwen.store_cli import register as register_store_commands


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


def context_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value.lower().removesuffix("k")) * (1024 if value.lower().endswith("k") else 1)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of tokens (e.g. 8192, 32k) or 'auto'") from None


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """-m and the options that shape how a model is loaded, shared by run, chat and serve."""
    options = [
        click.option("-m", "--model", "model_spec", metavar="MODEL",
                     help="A GGUF file, a model in the store (`localqwen models`) or a quant of the default model "
                          "(q8_0); default: the store's Q4_K_M."),
        click.option("--ctx", "n_ctx", default="auto", show_default=True, metavar="N|auto",
                     help=f"Context in tokens; auto: the largest that fits free memory, at most {DEFAULT_CONTEXT}."),
        click.option("--kv-cache", "kv_type", type=click.Choice(KV_TYPES), default="f16", show_default=True,
                     help="KV cache type; q8_0/q4_0 reach long contexts (and turn on flash attention)."),
        click.option("--flash-attn/--no-flash-attn", default=None, help="Default: on for a quantized KV cache."),
        click.option("--gpu-layers", default="auto", show_default=True, metavar="N|auto",
                     help="Layers to offload to the GPU (CUDA/Metal builds)."),
        click.option("--threads", type=click.IntRange(1), help="CPU threads (default: physical cores)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def sampling_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Generation options; unset ones fall back to the GGUF's (the model card's) defaults."""
    options = [
        click.option("--max-tokens", type=click.IntRange(1), help="Most tokens to generate (thinking + answer)."),
        click.option("--thinking-budget", type=click.IntRange(0), help="Most thinking tokens before answering."),
        click.option("--temperature", type=float), click.option("--top-p", type=float),
        click.option("--top-k", type=int), click.option("--min-p", type=float),
        click.option("--presence-penalty", type=float), click.option("--seed", type=int),
        click.option("--system", help="System prompt."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_model(model_spec: str | None, n_ctx: str, kv_type: str, flash_attn: bool | None, gpu_layers: str,
               threads: int | None) -> Any:
    from localqwen.model import Model
    from localqwen.store import ensure_default_model, resolve_model

    layers = gpu_layers if gpu_layers == "auto" else int(gpu_layers)
    ctx = context_size(n_ctx)
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    path = resolve_model(model_spec) if model_spec else ensure_default_model(interactive)
    return Model.load(path, n_ctx=ctx, kv_type=kv_type, flash_attn=flash_attn,
                      gpu_layers=layers, threads=threads, max_ctx=DEFAULT_CONTEXT if ctx == "auto" else None)


def with_model(command: Callable[..., Any]) -> Callable[..., Any]:
    """Load the model from the model options and pass it on as `model`."""
    @functools.wraps(command)
    def wrapper(model_spec: str | None, n_ctx: str, kv_type: str, flash_attn: bool | None, gpu_layers: str,
                threads: int | None, **kwargs: Any) -> Any:
        return command(load_model(model_spec, n_ctx, kv_type, flash_attn, gpu_layers, threads), **kwargs)
    return model_options(wrapper)


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one in (PROMPT '-' reads stdin)")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    return prompt


@cli.command("run")
@click.argument("prompt", required=False)
@with_model
@sampling_options
@click.option("--show-thinking", is_flag=True, help="Stream the thinking to stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with thinking, content and stats.")
def run_command(model: Any, prompt: str | None, system: str | None, max_tokens: int | None,
                thinking_budget: int | None, show_thinking: bool, as_json: bool, **sampling: Any) -> None:
    """Answer one PROMPT (or stdin) and exit: the answer on stdout, thinking on stderr if asked."""
    from localqwen.events import Reply

    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": read_prompt(prompt)}]
    events = model.chat(messages, max_tokens=max_tokens, thinking_budget=thinking_budget, **sampling)
    if as_json:
        click.echo(json.dumps(Reply.collect(events).to_dict(), ensure_ascii=False))
        return
    for event in events:
        if event.kind == "thinking" and show_thinking:
            click.secho(event.text, err=True, dim=True, nl=False)
        elif event.kind == "content":
            click.echo(event.text, nl=False)
        elif event.kind == "tool_call":
            click.echo(json.dumps({"tool_call": event.tool_call.raw}, ensure_ascii=False))
        elif event.kind == "done":
            click.echo()
            if event.stats.finish_reason == "length":
                where = " while thinking" if event.stats.truncated_thinking else ""
                click.secho(f"[stopped at the token limit{where}]", err=True, dim=True)


@cli.command("chat")
@with_model
@sampling_options
@click.option("--hide-thinking", is_flag=True, help="Show only a one-line summary of the thinking.")
@click.option("--verbose", is_flag=True, help="Print timing stats after each reply.")
def chat_command(model: Any, system: str | None, max_tokens: int | None, thinking_budget: int | None,
                 hide_thinking: bool, verbose: bool, **sampling: Any) -> None:
    """Chat in the terminal: thinking shown apart, /help for commands, Ctrl+D or /bye to leave."""
    from localqwen.chat import chat_repl
    from localqwen.conversation import ChatSettings

    chat_repl(model, ChatSettings(system=system, hide_thinking=hide_thinking, verbose=verbose, max_tokens=max_tokens,
                                  thinking_budget=thinking_budget,
                                  sampling={k: v for k, v in sampling.items() if v is not None}))


def check_origins(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    from localqwen.web.guard import parse_origin

    try:
        return tuple(parse_origin(value) for value in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command("serve")
@with_model
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="LOCALQWEN_API_KEY", help="Require this bearer key (env LOCALQWEN_API_KEY).")
@click.option("--reasoning-format", type=click.Choice(["deepseek", "none"]), default="deepseek", show_default=True,
              help="deepseek: thinking in reasoning_content; none: <think>...</think> left in content.")
@click.option("--cors", "cors_origins", multiple=True, metavar="ORIGIN", callback=check_origins,
              help="Let pages from ORIGIN (e.g. http://localhost:5173) call the API from a browser; repeatable.")
def serve_command(model: Any, host: str, port: int, api_key: str | None, reasoning_format: str,
                  cors_origins: tuple[str, ...]) -> None:
    """Serve the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and the chat page (/)."""
    from localqwen.server import serve

    serve(model, host=host, port=port, api_key=api_key, reasoning_format=reasoning_format, cors_origins=cors_origins)


register_store_commands(cli)


def main() -> None:
    # SIGTERM unwinds like Ctrl+C, so temporary files are removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cli()
