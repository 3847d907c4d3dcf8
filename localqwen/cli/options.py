"""Option groups shared by several commands, each defined once: the model and how it is loaded (run, chat, serve),
the memory settings (those and plan), and the generation options, which come from sampling.OPTIONS."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from localqwen.cli.edge import note
from localqwen.constants import DEFAULT_CONTEXT
from localqwen.plan import KV_TYPES
from localqwen.sampling import OPTIONS

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
QUIET_OPTION = click.option("--quiet", is_flag=True, help="No progress bars.")


def apply(options: list[Decorator], command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(options):
        command = option(command)
    return command


def context_size(value: str) -> int | str:
    """--ctx: a number of tokens (8192, 32k) or "auto"."""
    if value == "auto":
        return value
    try:
        return int(value.lower().removesuffix("k")) * (1024 if value.lower().endswith("k") else 1)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of tokens (e.g. 8192, 32k) or 'auto'") from None


def parse_parallel(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of generations or 'auto'") from None


PARALLEL_OPTION = click.option(
    "--parallel", default="auto", show_default=True, metavar="N|auto", callback=parse_parallel,
    help="Generations that run together (continuous batching), each with --ctx tokens of one shared KV cache; auto: "
         "as many as fit with 8K tokens each, at most 4 on the CPU.")


def parse_gpu_layers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of layers or 'auto'") from None


MODEL_OPTION = click.option(
    "-m", "--model", "model_spec", metavar="MODEL",
    help="A GGUF file, a model in the store (`localqwen models`) or a quant of the default model (q8_0); default: "
         "the store's Q4_K_M.")


def memory_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """--kv-cache, --flash-attn, --gpu-layers: how the context is held."""
    return apply([
        click.option("--kv-cache", "kv_type", type=click.Choice(KV_TYPES), default="f16", show_default=True,
                     help="KV cache type; q8_0/q4_0 reach long contexts (and turn on flash attention)."),
        click.option("--flash-attn/--no-flash-attn", default=None,
                     help="Default: on for a quantized KV cache or parallel sequences."),
        click.option("--gpu-layers", default="auto", show_default=True, metavar="N|auto",
                     help="Layers to offload to the GPU (CUDA/Metal builds)."),
    ], command)


def memory_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--ctx and the memory flags: what the planner needs."""
    return apply([
        click.option("--ctx", "n_ctx", default="auto", show_default=True, metavar="N|auto",
                     help=f"Context in tokens; auto: the largest that fits free memory, at most {DEFAULT_CONTEXT}."),
        memory_flags,
    ], command)


def generation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One flag per generation option (sampling.OPTIONS); unset ones fall back to the GGUF's (the model card's)
    defaults. Also --system."""
    flags = [click.option(f"--{option.name.replace('_', '-')}", option.name, help=option.help,
                          type=click.IntRange(int(option.minimum)) if option.kind is int and not option.sampler
                          else option.kind)
             for option in OPTIONS]
    return apply([*flags, click.option("--system", help="System prompt.")], command)


@dataclass(frozen=True)
class RemoteFlags:
    """How a command names the remote endpoint it may use instead of a local model, and the key for it."""

    url: str
    key: str
    envvar: str
    help: str


CLIENT = RemoteFlags("--url", "--api-key", "LOCALQWEN_API_KEY",
                     "Use the model served at URL (an OpenAI-compatible endpoint: localqwen serve, llama-server, "
                     "vLLM) instead of a local one; -m then picks among the models it serves.")
UPSTREAM = RemoteFlags("--upstream", "--upstream-key", "LOCALQWEN_UPSTREAM_KEY",
                       "Serve, in front of it, the model of the engine at URL (an OpenAI-compatible endpoint: "
                       "vLLM, llama-server, localqwen serve) instead of a local one; -m then picks among its models.")
LOCAL_ONLY = ("n_ctx", "kv_type", "flash_attn", "gpu_layers", "threads", "prompt_cache", "parallel")


def with_model(command: Callable[..., Any] | None = None, *, remote: RemoteFlags = CLIENT) -> Any:
    """-m, the memory options, --threads and the remote endpoint's flags: the model is loaded (or connected to) and
    passed on as `model`. Used bare (@with_model) or with the flags a command names its endpoint by."""
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(model_spec: str | None, n_ctx: str, kv_type: str, flash_attn: bool | None, gpu_layers: str,
                    threads: int | None, prompt_cache: str, url: str | None, remote_key: str | None,
                    parallel: int | str = 1, **kwargs: Any) -> Any:
            if url is None:
                cache = {"store": True, "off": False}.get(prompt_cache, prompt_cache)
                return command(load_model(model_spec, n_ctx, kv_type, flash_attn, gpu_layers, threads, parallel,
                                          cache), **kwargs)
            context = click.get_current_context()
            given = [name for name in LOCAL_ONLY  # the command's own flags that were given
                     if context.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]
            if given:
                flag = next(p.opts[0] for p in context.command.params if p.name == given[0])
                raise click.UsageError(f"{flag} applies to a local model; the engine at {url} decides it")
            from localqwen.remote import RemoteModel

            return command(RemoteModel.connect(url, api_key=remote_key, model=model_spec), **kwargs)

        flags = [click.option("--threads", type=click.IntRange(1), help="CPU threads (default: physical cores)."),
                 click.option("--prompt-cache", default="store", show_default=True, metavar="DIR|store|off",
                              help="Keep long prompts' KV cache on disk, so a conversation re-opened later starts "
                                   "at once."),
                 click.option(remote.url, "url", metavar="URL", help=remote.help),
                 click.option(remote.key, "remote_key", envvar=remote.envvar, metavar="KEY",
                              help=f"The key {remote.url} requires (env {remote.envvar}).")]
        return apply([MODEL_OPTION, memory_options, *flags], wrapper)

    return decorate if command is None else decorate(command)


def model_path(model_spec: str | None) -> Path:
    """-m as a path; without -m the default model, offered for download when it is missing and a person is there."""
    from localqwen.store import ensure_default_model, resolve_model

    if model_spec is not None:
        return resolve_model(model_spec)
    def ask(question: str) -> bool:
        return click.confirm(question, default=True, err=True)

    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    return ensure_default_model(confirm=ask if interactive else None, echo=note)


def load_model(model_spec: str | None, n_ctx: str, kv_type: str, flash_attn: bool | None, layers: str,
               threads: int | None, parallel: int | str = 1, prompt_cache: str | bool = False) -> Any:
    from localqwen.model import Model

    ctx = context_size(n_ctx)
    return Model.load(model_path(model_spec), n_ctx=ctx, kv_type=kv_type, flash_attn=flash_attn,
                      gpu_layers=parse_gpu_layers(layers), threads=threads, parallel=parallel,
                      prompt_cache=prompt_cache, max_ctx=DEFAULT_CONTEXT if ctx == "auto" else None)
