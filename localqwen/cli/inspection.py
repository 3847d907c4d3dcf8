"""Commands that look without changing anything: `info` (what a model file holds), `plan` (what fits this machine)
and `doctor` (what this install can do)."""

from __future__ import annotations

from typing import Any

import click

from localqwen.cli.edge import Command, human_size, print_json
from localqwen.cli.options import (
    JSON_OPTION,
    MODEL_OPTION,
    context_size,
    memory_options,
    parse_gpu_layers,
    parse_parallel,
)
from localqwen.constants import DEFAULT_CONTEXT
from localqwen.errors import LocalqwenError


@click.command("info", cls=Command)
@click.argument("model")
@JSON_OPTION
def info_command(model: str, as_json: bool) -> None:
    """Show what a GGUF (a FILE or a NAME in the store) holds: architecture, parameters, quant mixture, context,
    chat template, sampling defaults."""
    from localqwen.info import model_info
    from localqwen.store import resolve_model

    info = model_info(resolve_model(model))
    if as_json:
        print_json(info)
        return
    rows = [("file", info["path"]), ("name", info["name"]), ("architecture", info["architecture"]),
            ("parameters", f"{info['parameters']:,}"), ("quant", info["quant"]), ("size", human_size(info["size"])),
            ("context length", info["context_length"]),
            ("shape", f"{info['layers']} layers, embedding {info['embedding']}, {info['heads']} heads "
                      f"({info['kv_heads']} KV) of {info['head_dim']}"),
            ("vocabulary", info["vocab"]), ("chat template", "yes" if info["chat_template"] else "no"),
            ("sampling", ", ".join(f"{k} {v}" for k, v in info["sampling"].items())
             + f"  (from the file: {', '.join(info['sampling_from_file']) or 'none'})")]
    for label, value in rows:
        click.echo(f"{label:<15} {value}")
    click.echo("tensor types    " + ", ".join(f"{t} x{v['tensors']} ({human_size(v['bytes'])})"
                                              for t, v in info["tensor_types"].items()))
    for kind, counts in info["mixture"].items():
        click.echo(f"  {kind:<13} " + ", ".join(f"{t} x{n}" for t, n in counts.items()))


@click.command("plan", cls=Command)
@MODEL_OPTION
@memory_options
@click.option("--parallel", default="1", show_default=True, metavar="N|auto", callback=parse_parallel,
              help="Generations that run together, each with --ctx tokens of one shared KV cache.")
@JSON_OPTION
def plan_command(model_spec: str | None, n_ctx: str, kv_type: str, flash_attn: bool | None, gpu_layers: str,
                 parallel: int | str, as_json: bool) -> None:
    """Print the memory plan for a model and settings, and the largest context that fits this machine."""
    from localqwen.info import plan_report
    from localqwen.store import resolve_model

    ctx = context_size(n_ctx)
    report = plan_report(resolve_model(model_spec), ctx, kv_type=kv_type, flash_attn=flash_attn,
                         gpu_layers=parse_gpu_layers(gpu_layers), parallel=parallel,
                         max_ctx=DEFAULT_CONTEXT if ctx == "auto" else None)
    if as_json:
        print_json(report)
        return
    plan = report["plan"]
    click.echo(f"model        {report['model']}")
    shared = (f" ({plan['n_seq']} generations at once, {plan['n_ctx_seq']} tokens each, in one unified KV cache)"
              if plan["n_seq"] > 1 else "")
    click.echo(f"context      {plan['n_ctx']} tokens{shared}, KV cache {plan['kv_type']}, flash attention "
               f"{'on' if plan['flash_attn'] else 'off'}, {plan['gpu_layers']} layers on the GPU")
    for part in ("weights", "kv", "compute"):
        click.echo(f"{part:<12} CPU {human_size(plan[part + '_cpu']):>10}   GPU {human_size(plan[part + '_gpu']):>10}")
    click.echo(f"total        CPU {human_size(plan['total_cpu']):>10}   GPU {human_size(plan['total_gpu']):>10}   "
               f"({'fits' if report['fits'] else 'does NOT fit'}: {human_size(report['free_ram'])} RAM free"
               + (f", {human_size(report['free_vram'])} VRAM free)" if report["free_vram"] else ")"))
    click.echo(f"largest context that fits here (native {report['native_context']}): "
               + ", ".join(f"{n} tokens with KV cache {kv}" for kv, n in report["largest_context"].items()))


@click.command("doctor", cls=Command)
@click.option("--no-self-test", "skip_self_test", is_flag=True, help="Skip building and running the tiny model.")
@JSON_OPTION
def doctor_command(skip_self_test: bool, as_json: bool) -> None:
    """Check this install: backend (CPU/CUDA/Metal), memory, store, hub settings, and a self-test that converts,
    quantizes, loads and runs a tiny synthetic model (no download)."""
    from localqwen.doctor import self_test, system_report

    report = system_report()
    if not as_json:
        _print_system(report)
    result = None if skip_self_test else self_test()
    if as_json:
        print_json({**report, "self_test": result})
    elif result is not None:
        for step in result["steps"]:
            click.echo(f"self-test    {step['step']:<10} {step['seconds']:>6.2f} s  {step['detail']}")
        click.echo(f"self-test    {'passed' if result['ok'] else 'FAILED'} in {result['seconds']:.1f} s")
    if result is not None and not result["ok"]:
        why = result["error"] or f"expected {result['expected']!r}, got {result['got']!r}"
        raise LocalqwenError(f"the self-test failed: {why}")


def _print_system(report: dict[str, Any]) -> None:
    versions, backend, memory = report["versions"], report["backend"], report["memory"]
    store, hub = report["store"], report["hub"]
    click.echo("versions     " + ", ".join(f"{name} {v}" for name, v in versions.items()))
    gpus = ", ".join(backend["gpu_devices"]) or "none"
    click.echo(f"backend      {', '.join(backend['names'])}; GPU offload {'yes' if backend['gpu_offload'] else 'no'} "
               f"(GPUs: {gpus}); {backend['cpu_count']} CPUs")
    click.echo(f"memory       {human_size(memory['available'])} of {human_size(memory['total'])} free"
               + (f"; {human_size(memory['free_vram'])} VRAM free" if memory["free_vram"] else ""))
    click.echo(f"store        {store['home']}: {store['models']} model(s), default model "
               f"{'present' if store['default_model'] else 'missing (localqwen pull)'}, "
               f"{human_size(store['free_disk'])} disk free")
    click.echo(f"hub          {hub['endpoint']}{' (offline mode)' if hub['offline'] else ''}; token "
               f"{'set' if hub['token_set'] else 'not set'}; cache {hub['cache']}")


COMMANDS = (info_command, plan_command, doctor_command)
