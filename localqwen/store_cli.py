"""The store's commands (pull, lock, verify, models, rm, info, plan, doctor): thin click wrappers over store.py,
doctor.py and lock.py. `register(cli)` adds them to the `localqwen` group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from localqwen.constants import DEFAULT_CONTEXT, DEFAULT_REPO
from localqwen.convert import DEFAULT_QUANT, OUTPUT_TYPES
from localqwen.errors import LocalqwenError
from localqwen.plan import KV_TYPES

LOCK_OPTION = click.option("--lock", "lock_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                           help="The lock file to verify against and record into (default: models.lock in the store).")
QUIET_OPTION = click.option("--quiet", is_flag=True, help="No progress bars.")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _note(line: str) -> None:
    click.echo(line, err=True)


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@click.command("pull")
@click.argument("repo", required=False)
@click.option("--quant", "-q", "quants", multiple=True, metavar="TYPE",
              help=f"Output type, repeatable: {', '.join(OUTPUT_TYPES)} (default {DEFAULT_QUANT}).")
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
                                 echo=_note)))
        return
    for path in pull(repo or DEFAULT_REPO, quants or (DEFAULT_QUANT,), revision=revision, lock_file=lock_file,
                     force=force, quiet=quiet, echo=_note):
        click.echo(str(path))


@click.command("lock")
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
        relock(repo, gguf_file=filename, revision=revision, lock_file=lock_file, quiet=quiet, echo=_note)
    else:
        relock(repo or DEFAULT_REPO, revision=revision, lock_file=lock_file, quiet=quiet, echo=_note)


@click.command("verify")
@LOCK_OPTION
@JSON_OPTION
@QUIET_OPTION
def verify_command(lock_file: Path | None, as_json: bool, quiet: bool) -> None:
    """Re-hash every GGUF in the store against the lock; exits non-zero if one differs."""
    from localqwen.store import verify_store

    results = verify_store(lock_file, quiet=quiet)
    if as_json:
        _print_json([{"path": r.path, "status": r.status, "detail": r.detail} for r in results])
    else:
        for r in results:
            click.echo(f"{r.status:<9} {r.path}" + (f"  ({r.detail})" if r.detail else ""))
        if not results:
            click.echo("the store holds no models")
    bad = [r for r in results if r.status == "mismatch"]
    if bad:
        raise LocalqwenError(f"{len(bad)} file(s) in the store do not match the lock: {bad[0].path} first")


@click.command("models")
@JSON_OPTION
def models_command(as_json: bool) -> None:
    """List the models in the store: name, quant, size, context, path."""
    from localqwen.store import list_models, models_dir

    found = list_models()
    if as_json:
        _print_json([m.to_dict() for m in found])
        return
    if not found:
        click.echo(f"no models in {models_dir()}: `localqwen pull` gets the default one")
        return
    width = max(len(m.name) for m in found)
    click.echo(f"{'NAME':<{width}}  {'QUANT':<8} {'SIZE':>10} {'CONTEXT':>8}  PATH")
    for m in found:
        click.echo(f"{m.name:<{width}}  {m.quant:<8} {human_size(m.size):>10} {m.context:>8}  {m.path}")


@click.command("rm")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def rm_command(names: tuple[str, ...]) -> None:
    """Delete models from the store, by name (see `localqwen models`)."""
    from localqwen.store import remove_model

    for name in names:
        click.echo(f"removed {remove_model(name)}")


@click.command("info")
@click.argument("model")
@JSON_OPTION
def info_command(model: str, as_json: bool) -> None:
    """Show what a GGUF (a FILE or a NAME in the store) holds: architecture, parameters, quant mixture, context,
    chat template, sampling defaults."""
    from localqwen.doctor import model_info
    from localqwen.store import resolve_model

    info = model_info(resolve_model(model))
    if as_json:
        _print_json(info)
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


@click.command("plan")
@click.option("-m", "--model", "model_spec", metavar="MODEL", help="A GGUF file or a model in the store.")
@click.option("--ctx", "n_ctx", default="auto", show_default=True, metavar="N|auto",
              help=f"Context in tokens; auto: the largest that fits free memory, at most {DEFAULT_CONTEXT}.")
@click.option("--kv-cache", "kv_type", type=click.Choice(KV_TYPES), default="f16", show_default=True)
@click.option("--flash-attn/--no-flash-attn", default=None, help="Default: on for a quantized KV cache.")
@click.option("--gpu-layers", default="auto", show_default=True, metavar="N|auto")
@JSON_OPTION
def plan_command(model_spec: str | None, n_ctx: str, kv_type: str, flash_attn: bool | None, gpu_layers: str,
                 as_json: bool) -> None:
    """Print the memory plan for a model and settings, and the largest context that fits this machine."""
    from localqwen.cli import context_size
    from localqwen.doctor import plan_report
    from localqwen.store import resolve_model

    ctx = context_size(n_ctx)
    layers = gpu_layers if gpu_layers == "auto" else int(gpu_layers)
    report = plan_report(resolve_model(model_spec), ctx, kv_type=kv_type, flash_attn=flash_attn, gpu_layers=layers,
                         max_ctx=DEFAULT_CONTEXT if ctx == "auto" else None)
    if as_json:
        _print_json(report)
        return
    plan = report["plan"]
    click.echo(f"model        {report['model']}")
    click.echo(f"context      {plan['n_ctx']} tokens, KV cache {plan['kv_type']}, flash attention "
               f"{'on' if plan['flash_attn'] else 'off'}, {plan['gpu_layers']} layers on the GPU")
    for part in ("weights", "kv", "compute"):
        click.echo(f"{part:<12} CPU {human_size(plan[part + '_cpu']):>10}   GPU {human_size(plan[part + '_gpu']):>10}")
    click.echo(f"total        CPU {human_size(plan['total_cpu']):>10}   GPU {human_size(plan['total_gpu']):>10}   "
               f"({'fits' if report['fits'] else 'does NOT fit'}: {human_size(report['free_ram'])} RAM free"
               + (f", {human_size(report['free_vram'])} VRAM free)" if report["free_vram"] else ")"))
    click.echo(f"largest context that fits here (native {report['native_context']}): "
               + ", ".join(f"{n} tokens with KV cache {kv}" for kv, n in report["largest_context"].items()))


@click.command("doctor")
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
        _print_json({**report, "self_test": result})
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
    click.echo(f"backend      {', '.join(backend['names'])}; GPU offload {'yes' if backend['gpu_offload'] else 'no'}; "
               f"{backend['cpu_count']} CPUs")
    click.echo(f"memory       {human_size(memory['available'])} of {human_size(memory['total'])} free"
               + (f"; {human_size(memory['free_vram'])} VRAM free" if memory["free_vram"] else ""))
    click.echo(f"store        {store['home']}: {store['models']} model(s), default model "
               f"{'present' if store['default_model'] else 'missing (localqwen pull)'}, "
               f"{human_size(store['free_disk'])} disk free")
    click.echo(f"hub          {hub['endpoint']}{' (offline mode)' if hub['offline'] else ''}; token "
               f"{'set' if hub['token_set'] else 'not set'}; cache {hub['cache']}")


COMMANDS = (pull_command, lock_command, verify_command, models_command, rm_command, info_command, plan_command,
            doctor_command)


def register(cli: click.Group) -> None:
    """Add the store's commands to the `localqwen` group."""
    for command in COMMANDS:
        cli.add_command(command)
