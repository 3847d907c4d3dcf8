"""What a model file holds (`localqwen info`) and what fits in this machine (`localqwen plan`), from the GGUF
header alone: fast, and safe on damaged files."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from localqwen.metadata import SAMPLING_KEYS, read_metadata
from localqwen.modelcheck import check_model
from localqwen.plan import KV_TYPES, choose_plan, largest_context, shape_of, shortfall
from localqwen.sampling import Sampling
from localqwen.template_check import check_template


def tensor_kind(name: str) -> str:
    """blk.7.attn_v.weight -> attn_v; token_embd.weight -> token_embd."""
    parts = name.removesuffix(".weight").split(".")
    return ".".join(parts[2:]) if parts[0] == "blk" and len(parts) > 2 else ".".join(parts)


def model_info(path: Path) -> dict[str, Any]:
    """What `localqwen info` shows, for a file that passes every check Model.load makes before llama.cpp sees it."""
    meta = read_metadata(path)
    check_model(meta)
    check_template(meta.chat_template, meta.path)
    mixture: dict[str, Counter[str]] = defaultdict(Counter)
    types: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    for name, tensor in meta.tensors.items():
        mixture[tensor_kind(name)][tensor.type.name] += 1
        types[tensor.type.name]["tensors"] += 1
        types[tensor.type.name]["bytes"] += tensor.n_bytes
    return {
        "path": str(path), "name": meta.name, "architecture": meta.architecture, "size": meta.header.file_size,
        "parameters": sum(math.prod(t.shape) for t in meta.tensors.values()), "quant": meta.quant,
        "context_length": meta.context_length, "layers": meta.block_count, "embedding": meta.embedding_length,
        "feed_forward": meta.feed_forward_length, "heads": meta.head_count, "kv_heads": meta.head_count_kv,
        "head_dim": meta.key_length, "rope_freq_base": meta.rope_freq_base, "vocab": meta.n_vocab,
        "chat_template": bool(meta.chat_template),
        "sampling": {k: v for k, v in Sampling.from_metadata(meta.sampling).to_dict().items() if k in SAMPLING_KEYS},
        "sampling_from_file": sorted(meta.sampling),
        "tensor_types": dict(sorted(types.items())),
        "mixture": {kind: dict(sorted(counts.items())) for kind, counts in sorted(mixture.items())},
    }


def plan_report(path: Path, n_ctx: int | str = "auto", *, kv_type: str = "f16", flash_attn: bool | None = None,
                gpu_layers: int | str = "auto", max_ctx: int | None = None, parallel: int | str = 1) -> dict[str, Any]:
    """The plan Model.load would make for these settings (plan.choose_plan, the same choice, without loading
    anything), whether it fits (plan.shortfall, the same rule), and the largest context each KV type allows here."""
    meta = read_metadata(path)
    check_model(meta)
    shape = shape_of(meta)
    plan, memory = choose_plan(shape, n_ctx, kv_type=kv_type, flash_attn=flash_attn, gpu_layers=gpu_layers,
                               max_ctx=max_ctx, parallel=parallel)

    def largest(kv: str, flash_on: bool) -> int:
        return largest_context(shape, memory.budget, kv_type=kv, flash_attn=flash_on, gpu_layers=plan.gpu_layers,
                               repack_types=memory.repack_types, n_seq=plan.n_seq)

    return {
        "model": str(path), "free_ram": memory.ram, "free_vram": memory.vram, "budget": memory.budget,
        "native_context": shape.n_ctx_train,
        "plan": plan.to_dict(), "fits": shortfall(plan, memory) is None,
        # f16 without flash attention (often faster on CPU); quantized caches need it.
        "largest_context": {kv: largest(kv, kv != "f16" or bool(flash_attn)) for kv in KV_TYPES},
    }
