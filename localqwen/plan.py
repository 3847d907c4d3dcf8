"""The memory planner: what llama.cpp will allocate for a GGUF and settings, and the largest context that fits.

Every formula mirrors the llama.cpp code vendored in llama-cpp-python 0.3.36 (functions cited where used) and was
checked against the buffer sizes it logs (tests/test_plan.py). No llama.cpp import at module level: planning must
work, and stay fast, before anything is loaded.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from localqwen.errors import BadRequest, LocalqwenError, ModelFileError
from localqwen.metadata import TIED_OUTPUT, ModelMetadata, read_metadata

KV_TYPES = ("f16", "q8_0", "q4_0")
MAX_PARALLEL = 64  # sequences in one context (llama.cpp allows 256; beyond this, batches only slow each other)
# parallel="auto" (what `serve` uses): as many sequences as fit with at least AUTO_MIN_CONTEXT tokens each, at most
# 4 on the CPU (where decode is bound by memory bandwidth and a batch of 4 costs little more than 1) or 8 on a GPU.
AUTO_PARALLEL = {"cpu": 4, "gpu": 8}
AUTO_MIN_CONTEXT = 8192
# Free memory `n_ctx="auto"` leaves to the rest of the machine.
MEMORY_MARGIN = 0.15
MIN_MEMORY_MARGIN = 1 << 30
# ggml block layout (bytes per block, elements per block), as ggml_row_size() computes it.
KV_BLOCKS = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}
CTX_PAD = 256  # llama_context::llama_context: cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)
F32 = 4
# VRAM that auto_gpu_layers leaves free for the CUDA context, cuBLAS workspaces and other processes.
VRAM_RESERVE = 768 << 20
VRAM_RESERVE_FRACTION = 0.05


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a GGUF: hyperparameters and tensor bytes (read_shape reads them)."""

    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_ctx_train: int
    weight_bytes: int  # all tensor data in the file
    layer_bytes: list[int]  # tensor data of blk.{i}.*
    other_bytes: int  # non-layer tensors in the file: token_embd, output_norm, output (absent when tied)
    n_ff: int = 0  # feed_forward_length; 0: unknown (4 * n_embd is assumed)
    head_bytes: int = 0  # output_norm + output as stored in the file (no output tensor when tied)
    tied_type: int | None = None  # ggml type of token_embd when it doubles as the output (tied embeddings)

    @property
    def embd_bytes(self) -> int:
        """token_embd: get_rows on it always runs on the CPU."""
        return self.other_bytes - self.head_bytes

    def head_copy(self, head_on_gpu: bool, repack_types: Collection[int]) -> int:
        """Bytes of the second copy of token_embd llama.cpp makes to serve as a tied output.

        create_tensor(..., TENSOR_DUPLICATED) reuses token_embd when the output lands in the same buffer type (the
        plain CPU one); a GPU, or a CPU repack/AMX buffer type that takes the tensor's type, holds a real copy.
        """
        if self.tied_type is None:
            return 0
        return self.embd_bytes if head_on_gpu or self.tied_type in repack_types else 0

    @property
    def ff(self) -> int:
        return self.n_ff or 4 * self.n_embd


@functools.lru_cache(maxsize=8)
def shape_of(meta: ModelMetadata) -> ModelShape:
    """The ModelShape of a GGUF's metadata; a missing hyperparameter is a ModelFileError."""
    path, tensors = meta.path, meta.tensors
    n_layers, n_embd, n_head = meta.require("block_count"), meta.require("embedding_length"), meta.require("head_count")
    if "token_embd.weight" not in tensors:
        raise ModelFileError("not a usable model: tensor token_embd.weight is missing", path)
    layer_bytes = [0] * n_layers
    for name, tensor in tensors.items():
        if name.startswith("blk."):
            il = int(name.split(".")[1])
            if il >= n_layers:
                raise ModelFileError(f"not a usable model: tensor {name} is beyond block_count {n_layers}", path)
            layer_bytes[il] += tensor.n_bytes
    weight_bytes = sum(t.n_bytes for t in tensors.values())
    head_dim_k = meta.key_length or n_embd // max(n_head, 1)
    sizes = {name: t.n_bytes for name, t in tensors.items() if name in ("output_norm.weight", TIED_OUTPUT)}
    return ModelShape(
        n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_head_kv=meta.head_count_kv or n_head,
        head_dim_k=head_dim_k, head_dim_v=meta.value_length or head_dim_k,
        n_vocab=meta.n_vocab or int(tensors["token_embd.weight"].shape[1]),
        n_ctx_train=meta.require("context_length"),
        weight_bytes=weight_bytes, layer_bytes=layer_bytes, other_bytes=weight_bytes - sum(layer_bytes),
        n_ff=meta.feed_forward_length or 0, head_bytes=sum(sizes.values()),
        tied_type=int(tensors["token_embd.weight"].type) if meta.tied_output else None,
    )


def read_shape(path: Path | str) -> ModelShape:
    """The ModelShape of a GGUF file (cached, as its metadata is, per path, size and modification time)."""
    return shape_of(read_metadata(path))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes llama.cpp allocates, by kind and device. n_ctx/n_batch/n_ubatch are the values llama.cpp ends up with."""

    n_ctx: int
    kv_type: str
    flash_attn: bool
    gpu_layers: int
    n_batch: int
    n_ubatch: int
    weights_cpu: int
    weights_gpu: int
    kv_cpu: int
    kv_gpu: int
    compute_cpu: int
    compute_gpu: int
    output: int  # logits buffer in host memory (pinned when a GPU holds the output layer)
    n_seq: int = 1  # sequences sharing the (unified) KV cache; each may use n_ctx_seq of its n_ctx cells

    @property
    def n_ctx_seq(self) -> int:
        return self.n_ctx // self.n_seq

    @property
    def total_cpu(self) -> int:
        return self.weights_cpu + self.kv_cpu + self.compute_cpu + self.output

    @property
    def total_gpu(self) -> int:
        return self.weights_gpu + self.kv_gpu + self.compute_gpu

    @property
    def total(self) -> int:
        return self.total_cpu + self.total_gpu

    def to_dict(self) -> dict[str, int | str | bool]:
        return {**asdict(self), "n_ctx_seq": self.n_ctx_seq, "total_cpu": self.total_cpu, "total_gpu": self.total_gpu,
                "total": self.total}


def _row_bytes(kv_type: str, n: int) -> int:
    block_bytes, block_elems = KV_BLOCKS[kv_type]
    return n // block_elems * block_bytes


def _compute_peaks(shape: ModelShape, n_kv: int, n_tokens: int, n_outputs: int, flash_attn: bool) -> tuple[int, int]:
    """(repeating-layer peak, output-head peak) of the worst-case graph llama_context::sched_reserve allocates.

    ggml-alloc frees each intermediate after its last use, so the buffer is the largest set of tensors alive at one
    time. Terms were derived from build_attn_mha / the qwen3 graph and fitted to measured buffers; the constants
    per token (3 x n_embd, 3 x n_ff, ...) are the residual, norm and FFN activations alive at the same time.
    """
    q_out = shape.n_head * (shape.head_dim_k + shape.head_dim_v)  # Q and the attention output
    # build_attn_inp_kq_mask: [n_kv, n_tokens], f16 for flash attention, f32 otherwise; alive across all layers.
    mask = n_kv * n_tokens * (2 if flash_attn else F32)
    if flash_attn:  # ggml_flash_attn_ext never materialises the scores
        attn = mask + n_tokens * F32 * (q_out + 3 * shape.n_embd)
    else:  # kq = ggml_mul_mat(k, q): f32 [n_kv, n_tokens, n_head]; softmax runs in place; K, V views copied
        kv_copies = shape.n_head_kv * (shape.head_dim_k + shape.head_dim_v)
        attn = mask + n_kv * n_tokens * shape.n_head * F32 + n_tokens * F32 * (q_out + kv_copies + 3 * shape.n_embd)
    ffn = mask + n_tokens * F32 * (3 * shape.ff + 3 * shape.n_embd + shape.n_head * shape.head_dim_v)
    # The head runs on n_outputs = min(n_tokens, n_outputs_max) rows: logits f32 [n_vocab, n_outputs].
    head = min(n_tokens, n_outputs) * F32 * (shape.n_vocab + 2 * shape.n_embd)
    return max(attn, ffn), head


def plan_memory(shape: ModelShape, n_ctx: int, *, kv_type: str = "f16", flash_attn: bool = False, gpu_layers: int = 0,
                n_batch: int = 512, n_ubatch: int = 512, repack_types: Collection[int] = (), n_seq: int = 1,
                n_outputs_max: int | None = None) -> MemoryPlan:
    """Predict llama.cpp's buffers for one context. gpu_layers counts like n_gpu_layers (output layer first);
    repack_types: the ggml types this CPU's extra buffer types take (backend.repacked_types()).

    n_seq > 1: that many sequences share one unified KV cache and each gets n_ctx tokens of it (n_ctx rounded up
    to whole blocks of 256 cells): the cache holds n_seq x n_ctx cells. n_outputs_max: the most logits rows a batch
    may ask for (what backend.new_context sets: one per sequence); None is llama.cpp's default, n_batch.
    """
    if kv_type not in KV_TYPES:
        raise BadRequest(f"unknown KV cache type {kv_type!r} (choose from {', '.join(KV_TYPES)})")
    if kv_type != "f16" and not flash_attn:  # llama_context: "quantized V cache ... requires Flash Attention"
        raise BadRequest(f"a {kv_type} KV cache needs flash attention")
    if n_ctx < 1 or n_batch < 1 or n_ubatch < 1 or n_seq < 1:
        raise BadRequest(f"context {n_ctx}, batch {n_batch}, ubatch {n_ubatch} and sequences {n_seq} must be positive")
    if n_seq > 1:
        n_ctx = -(-n_ctx // CTX_PAD) * CTX_PAD * n_seq
    # llama_context::llama_context: n_batch is clamped by the requested n_ctx *before* n_ctx is padded to 256.
    n_batch = min(n_ctx, n_batch)
    n_ubatch = min(n_batch, n_ubatch)
    n_ctx = -(-n_ctx // CTX_PAD) * CTX_PAD
    # llama_model::load_tensors: layers il >= n_layer + 1 - n_gpu_layers go to the GPU, il == n_layer is the output.
    gpu_layers = max(0, min(gpu_layers, shape.n_layers + 1))
    first_gpu = shape.n_layers + 1 - gpu_layers
    head_on_gpu = gpu_layers > 0
    on_gpu = [il >= first_gpu for il in range(shape.n_layers)]

    # llama_kv_cache::llama_kv_cache: per layer K [n_embd_k_gqa, kv_size] and V, on the layer's device (offload_kqv).
    kv_layer = n_ctx * (_row_bytes(kv_type, shape.n_head_kv * shape.head_dim_k)
                        + _row_bytes(kv_type, shape.n_head_kv * shape.head_dim_v))
    n_on_gpu = sum(on_gpu)

    layer_peak, head_peak = _compute_peaks(shape, n_ctx, n_ubatch, n_outputs_max or n_batch, flash_attn)
    # The scheduler runs each op where its weights live; token_embd (get_rows) always stays on the CPU.
    cpu_parts = [n_ubatch * shape.n_embd * F32, layer_peak if n_on_gpu < shape.n_layers else 0]
    gpu_parts = [layer_peak if n_on_gpu else 0]
    (gpu_parts if head_on_gpu else cpu_parts).append(head_peak)

    head = shape.head_bytes + shape.head_copy(head_on_gpu, repack_types)
    layers_gpu = sum(shape.layer_bytes[il] for il in range(shape.n_layers) if on_gpu[il])
    return MemoryPlan(
        n_ctx=n_ctx, n_seq=n_seq, kv_type=kv_type, flash_attn=flash_attn, gpu_layers=gpu_layers, n_batch=n_batch,
        n_ubatch=n_ubatch,
        weights_cpu=shape.embd_bytes + sum(shape.layer_bytes) - layers_gpu + (0 if head_on_gpu else head),
        weights_gpu=layers_gpu + (head if head_on_gpu else 0),
        kv_cpu=kv_layer * (shape.n_layers - n_on_gpu), kv_gpu=kv_layer * n_on_gpu,
        compute_cpu=max(cpu_parts), compute_gpu=max(gpu_parts),
        # llama_context::output_reserve(n_seq_max): a row of f32 logits per sequence; it grows only when a batch
        # asks for more outputs, which localqwen never does (one per sequence at most).
        output=shape.n_vocab * F32 * n_seq,
    )


def _free_vram() -> int | None:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            # llama.cpp splits layers over all visible GPUs (LLAMA_SPLIT_MODE_LAYER): their free memory adds up.
            return sum(int(line) for line in out.split()) << 20 or None
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
    if sys.platform == "darwin":  # Metal on unified memory: the GPU may use about 2/3 of RAM (working-set limit)
        mem = psutil.virtual_memory()
        return min(mem.available, mem.total * 2 // 3)
    return None


def available_memory() -> tuple[int, int | None]:
    """(free RAM, free VRAM or None when llama.cpp sees no GPU or no GPU memory can be measured)."""
    from localqwen import backend

    ram = psutil.virtual_memory().available
    return ram, (_free_vram() if backend.gpu_offload_supported() else None)


def largest_context(shape: ModelShape, budget_bytes: int, *, kv_type: str, flash_attn: bool, gpu_layers: int = 0,
                    limit: int | None = None, repack_types: Collection[int] = (), n_seq: int = 1) -> int:
    """The largest n_ctx per sequence (a multiple of 256, at most limit and n_ctx_train) whose plan for n_seq
    sequences fits budget_bytes; 0 if none."""
    cap = min(limit or shape.n_ctx_train, shape.n_ctx_train)

    def fits(n: int) -> bool:
        plan = plan_memory(shape, n, kv_type=kv_type, flash_attn=flash_attn, gpu_layers=gpu_layers,
                           repack_types=repack_types, n_seq=n_seq, n_outputs_max=n_seq)
        return plan.total <= budget_bytes

    if cap < CTX_PAD:  # a tiny limit: llama.cpp pads it to 256 cells anyway
        return cap if cap > 0 and fits(cap) else 0
    lo, hi = 0, cap // CTX_PAD  # lo: blocks of 256 known to fit (0: none); the plan grows with n_ctx
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * CTX_PAD) else (lo, mid - 1)
    return lo * CTX_PAD


def auto_gpu_layers(shape: ModelShape, vram_bytes: int, n_ctx: int, kv_type: str, flash_attn: bool,
                    repack_types: Collection[int] = (), n_seq: int = 1) -> int:
    """As many layers (n_gpu_layers: output layer first, up to n_layers + 1) as fit in VRAM with a reserve."""
    usable = vram_bytes - VRAM_RESERVE - int(vram_bytes * VRAM_RESERVE_FRACTION)
    for layers in range(shape.n_layers + 1, 0, -1):
        plan = plan_memory(shape, n_ctx, kv_type=kv_type, flash_attn=flash_attn, gpu_layers=layers,
                           repack_types=repack_types, n_seq=n_seq, n_outputs_max=n_seq)
        if plan.total_gpu <= usable:
            return layers
    return 0


@dataclass(frozen=True)
class Memory:
    """Free memory now, and the part of it a plan may use."""

    ram: int
    vram: int | None
    budget: int  # free VRAM when offloading, else free RAM, less a margin for the rest of the machine
    offload: bool
    repack_types: frozenset[int] = frozenset()  # ggml types the CPU's extra buffer types take a copy of


def choose_plan(shape: ModelShape, n_ctx: int | str = "auto", *, kv_type: str = "f16", flash_attn: bool | None = None,
                gpu_layers: int | str = "auto", max_ctx: int | None = None, parallel: int | str = 1,
                ) -> tuple[MemoryPlan, Memory]:
    """The settings Model.load uses, for `parallel` sequences with n_ctx tokens each: n_ctx "auto" is the largest
    context that fits (at most max_ctx), gpu_layers "auto" as many layers as fit in VRAM, parallel "auto" as many
    sequences as fit (AUTO_PARALLEL), flash attention on for a quantized KV cache or several sequences unless told
    otherwise."""
    from localqwen.backend import gpu_offload_supported, repacked_types

    if kv_type not in KV_TYPES:
        raise BadRequest(f"unknown KV cache type {kv_type!r} (choose from {', '.join(KV_TYPES)})")
    if parallel != "auto" and (isinstance(parallel, bool) or not isinstance(parallel, int)
                               or not 1 <= parallel <= MAX_PARALLEL):
        raise BadRequest(f"parallel must be a whole number from 1 to {MAX_PARALLEL} or 'auto', got {parallel!r}")
    # Flash attention: a quantized V cache needs it. With several sequences in the shared (unified) cache, ordinary
    # attention reads every cell for every token, while llama.cpp's flash-attention kernel skips the other
    # sequences' cells (4B, 8 streams, 2 AMD EPYC cores: 23.7-24.1 tok/s decode against 20.8-21.2). One stream
    # with an f16 cache keeps it off: there it decoded slower on the same CPU (12.5-13.1 tok/s against 13.8-14.2).
    flash = (kv_type != "f16" or parallel != 1) if flash_attn is None else flash_attn
    ram, vram = available_memory()
    offload = gpu_offload_supported() and bool(vram)
    budget = vram if offload and vram else ram
    memory = Memory(ram, vram, budget - max(MIN_MEMORY_MARGIN, int(budget * MEMORY_MARGIN)), offload, repacked_types())
    repack = memory.repack_types
    # llama.cpp counts the output layer as one more layer to offload.
    layers = (shape.n_layers + 1 if offload else 0) if gpu_layers == "auto" else int(gpu_layers)
    if parallel == "auto":
        wanted = n_ctx if isinstance(n_ctx, int) else AUTO_MIN_CONTEXT
        parallel = next((n for n in range(AUTO_PARALLEL["gpu" if offload else "cpu"], 1, -1)
                         if largest_context(shape, memory.budget, kv_type=kv_type, flash_attn=flash, gpu_layers=layers,
                                            limit=wanted, repack_types=repack, n_seq=n) >= wanted), 1)
    if n_ctx == "auto":
        limit = min(max_ctx or shape.n_ctx_train, shape.n_ctx_train)
        n_ctx = largest_context(shape, memory.budget, kv_type=kv_type, flash_attn=flash, gpu_layers=layers,
                                limit=limit, repack_types=repack, n_seq=parallel)
        if n_ctx == 0:
            raise LocalqwenError("not enough free memory for even a small context")
    elif isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 0 < n_ctx <= shape.n_ctx_train:
        raise BadRequest(f"context {n_ctx} must be between 1 and {shape.n_ctx_train}")
    if gpu_layers == "auto" and offload and vram:  # what does not fit stays on the CPU
        layers = auto_gpu_layers(shape, vram, n_ctx, kv_type, flash, repack, n_seq=parallel)
    return plan_memory(shape, n_ctx, kv_type=kv_type, flash_attn=flash, gpu_layers=layers, repack_types=repack,
                       n_seq=parallel, n_outputs_max=parallel), memory


def shortfall(plan: MemoryPlan, memory: Memory) -> str | None:
    """Why `plan` does not fit the free memory, or None when it fits: the one rule for Model.load and `plan`."""
    if plan.total_cpu > memory.ram:
        return (f"a context of {plan.n_ctx} tokens{_slots(plan)} needs {plan.total_cpu / 2**30:.1f} GiB of memory, "
                f"{memory.ram / 2**30:.1f} GiB is free")
    if plan.total_gpu > (memory.vram or 0):
        return (f"a context of {plan.n_ctx} tokens{_slots(plan)} with {plan.gpu_layers} layers offloaded needs "
                f"{plan.total_gpu / 2**30:.1f} GiB of GPU memory, {(memory.vram or 0) / 2**30:.1f} GiB is free")
    return None


def _slots(plan: MemoryPlan) -> str:
    return f" ({plan.n_seq} x {plan.n_ctx_seq})" if plan.n_seq > 1 else ""
