"""The memory planner: arithmetic on the real 4B shapes, and plans checked against what llama.cpp really allocates."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType

from localqwen import plan as plan_module
from localqwen.backend import load_model, new_context, open_llama, quiet_llama_log, repacked_types
from localqwen.convert import convert
from localqwen.errors import LocalqwenError
from localqwen.plan import (
    ModelShape,
    auto_gpu_layers,
    available_memory,
    largest_context,
    plan_memory,
    read_shape,
)
from localqwen.synthetic import QwenShape, write_checkpoint

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

Q4_0, Q4_K, Q6_K = int(GGMLQuantizationType.Q4_0), int(GGMLQuantizationType.Q4_K), int(GGMLQuantizationType.Q6_K)
# Qwen3-4B-Thinking-2507 as a Q4_K_M GGUF would describe it (tensor bytes approximate: ~2.5 GB in all).
QWEN3_4B = ModelShape(
    n_layers=36, n_embd=2560, n_head=32, n_head_kv=8, head_dim_k=128, head_dim_v=128, n_vocab=151936,
    n_ctx_train=262144, weight_bytes=36 * 60_555_556 + 319_010_240, layer_bytes=[60_555_556] * 36,
    other_bytes=319_010_240, n_ff=9728, head_bytes=10_240, tied_type=Q6_K,  # token_embd, doubling as the output
)


# --- arithmetic on the 4B shapes (no file, no llama.cpp) ---

def test_kv_cache_is_144_kib_per_token_at_f16() -> None:
    plan = plan_memory(QWEN3_4B, 4096)
    assert plan.kv_cpu == 4096 * 144 * KiB
    assert plan.kv_gpu == 0


@pytest.mark.parametrize(("kv_type", "gib"), [("f16", 36), ("q8_0", 36 * 34 / 64), ("q4_0", 36 * 18 / 64)])
def test_full_native_context(kv_type: str, gib: float) -> None:
    plan = plan_memory(QWEN3_4B, 262_144, kv_type=kv_type, flash_attn=True)
    assert plan.kv_cpu == gib * GiB  # 36 GiB f16, 19.1 GiB q8_0, 10.1 GiB q4_0


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_quantized_kv_requires_flash_attention(kv_type: str) -> None:
    with pytest.raises(LocalqwenError, match="flash attention"):
        plan_memory(QWEN3_4B, 4096, kv_type=kv_type, flash_attn=False)
    assert plan_memory(QWEN3_4B, 4096, kv_type=kv_type, flash_attn=True).kv_type == kv_type


def test_bad_arguments() -> None:
    with pytest.raises(LocalqwenError, match="unknown KV cache type"):
        plan_memory(QWEN3_4B, 4096, kv_type="q5_1", flash_attn=True)
    with pytest.raises(LocalqwenError, match="positive"):
        plan_memory(QWEN3_4B, 0)


def test_context_padding_and_batch_clamping() -> None:
    plan = plan_memory(QWEN3_4B, 1000)
    assert plan.n_ctx == 1024  # llama.cpp pads n_ctx to 256
    assert plan.kv_cpu == 1024 * 144 * KiB
    small = plan_memory(QWEN3_4B, 100)  # n_batch is clamped by the context llama.cpp was asked for, before padding
    assert (small.n_ctx, small.n_batch, small.n_ubatch) == (256, 100, 100)


def test_compute_buffer_grows_with_context_only_without_flash_attention() -> None:
    plain = [plan_memory(QWEN3_4B, n).compute_cpu for n in (4096, 32768)]
    flash = [plan_memory(QWEN3_4B, n, flash_attn=True).compute_cpu for n in (4096, 32768)]
    assert plain[1] - plain[0] >= (32768 - 4096) * 512 * 32 * 4  # the f32 KQ scores: n_kv x n_ubatch x n_head
    assert flash[1] - flash[0] < 64 * MiB  # only the f16 mask grows
    assert flash[0] >= 151936 * 512 * 4  # logits for n_ubatch outputs


def test_gpu_split_moves_bytes_without_losing_any() -> None:
    n = QWEN3_4B.n_layers
    plans = [plan_memory(QWEN3_4B, 8192, gpu_layers=g) for g in range(n + 2)]
    copy = QWEN3_4B.embd_bytes  # the tied output on the GPU is a copy of token_embd, which stays on the CPU
    for g, p in enumerate(plans):
        assert p.weights_cpu + p.weights_gpu == plans[0].weights_cpu + (copy if g else 0)
        assert p.kv_cpu + p.kv_gpu == plans[0].kv_cpu
    assert plans[0].total_gpu == 0
    assert plans[0].weights_cpu == QWEN3_4B.weight_bytes  # on the CPU the tied output is token_embd itself
    assert plans[1].weights_gpu == QWEN3_4B.head_bytes + copy and plans[1].kv_gpu == 0  # n_gpu_layers=1: the output
    assert plans[n + 1].kv_cpu == 0 and plans[n + 1].weights_cpu == QWEN3_4B.embd_bytes  # token_embd stays on CPU
    assert [p.total_gpu for p in plans] == sorted(p.total_gpu for p in plans)
    assert plan_memory(QWEN3_4B, 8192, gpu_layers=99).gpu_layers == n + 1


def test_tied_output_is_copied_only_into_another_buffer_type() -> None:
    plain = plan_memory(QWEN3_4B, 4096)
    repacked = plan_memory(QWEN3_4B, 4096, repack_types={Q6_K})  # e.g. an ARM CPU with dot-product instructions
    other = plan_memory(QWEN3_4B, 4096, repack_types={Q4_0, Q4_K})  # x86 AVX2: the Q6_K output is not taken
    assert repacked.weights_cpu - plain.weights_cpu == QWEN3_4B.embd_bytes
    assert other.weights_cpu == plain.weights_cpu
    untied = dataclasses.replace(QWEN3_4B, tied_type=None, head_bytes=319_010_240, other_bytes=638_010_240,
                                 weight_bytes=QWEN3_4B.weight_bytes + 319_000_000)
    assert plan_memory(untied, 4096, repack_types={Q6_K}).weights_cpu == untied.weight_bytes


def test_to_dict_is_json_ready() -> None:
    plan = plan_memory(QWEN3_4B, 8192, kv_type="q8_0", flash_attn=True)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["total"] == plan.total == plan.total_cpu + plan.total_gpu
    assert data["kv_type"] == "q8_0" and data["flash_attn"] is True and data["n_ctx"] == 8192


@pytest.mark.parametrize(("kv_type", "flash_attn"), [("f16", False), ("f16", True), ("q4_0", True)])
def test_largest_context_is_monotonic_and_bounded(kv_type: str, flash_attn: bool) -> None:
    last = 0
    for budget_gib in (0, 2, 2.9, 3, 4, 6, 8, 12, 16, 24, 48, 96):
        budget = int(budget_gib * GiB)
        n = largest_context(QWEN3_4B, budget, kv_type=kv_type, flash_attn=flash_attn)
        assert n >= last and n % 256 == 0 and n <= QWEN3_4B.n_ctx_train
        as_loaded = {"kv_type": kv_type, "flash_attn": flash_attn, "n_outputs_max": 1}  # how Model.load sets it up
        if n:
            assert plan_memory(QWEN3_4B, n, **as_loaded).total <= budget
        if n < QWEN3_4B.n_ctx_train:
            assert plan_memory(QWEN3_4B, n + 256, **as_loaded).total > budget
        assert largest_context(QWEN3_4B, budget, kv_type=kv_type, flash_attn=flash_attn, limit=10_000) <= 10_000
        last = n
    assert last == QWEN3_4B.n_ctx_train  # 96 GiB holds the whole native context


def test_largest_context_edges() -> None:
    assert largest_context(QWEN3_4B, 0, kv_type="f16", flash_attn=False) == 0
    assert largest_context(QWEN3_4B, 100 * GiB, kv_type="f16", flash_attn=False, limit=100) == 100
    # 24 GiB machine, q4_0 + flash attention: the whole native context fits (KV 10.1 GiB).
    assert largest_context(QWEN3_4B, 20 * GiB, kv_type="q4_0", flash_attn=True) == 262_144


def test_auto_gpu_layers() -> None:
    n = QWEN3_4B.n_layers
    layers = [auto_gpu_layers(QWEN3_4B, vram * GiB, 32768, "q8_0", True) for vram in (0, 1, 2, 3, 4, 6, 8, 24)]
    assert layers == sorted(layers)
    assert layers[0] == 0 and layers[-1] == n + 1
    assert 0 < layers[3] < n + 1  # 3 GiB: some layers


def test_available_memory_on_this_build(monkeypatch: pytest.MonkeyPatch) -> None:
    from localqwen import backend

    ram, vram = available_memory()
    assert ram > 0
    if not backend.gpu_devices():
        assert vram is None
    monkeypatch.setattr(backend, "gpu_devices", lambda: ("CUDA0",))
    monkeypatch.setattr(plan_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(plan_module.sys, "platform", "linux")
    assert available_memory()[1] is None  # a GPU build without nvidia-smi: unknown


def test_read_shape_errors(tmp_path: Path) -> None:
    import gguf

    with pytest.raises(LocalqwenError, match="cannot read"):
        read_shape(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(LocalqwenError, match="not a GGUF file"):
        read_shape(tmp_path / "junk.gguf")
    writer = gguf.GGUFWriter(tmp_path / "partial.gguf", "qwen3")
    writer.add_embedding_length(256)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LocalqwenError, match="qwen3.block_count"):
        read_shape(tmp_path / "partial.gguf")


# --- plans against what llama.cpp really allocates ---

# Real attention shapes (32 query heads, 8 KV heads, head_dim 128, the full vocabulary), 2 small layers.
ATTENTION_SHAPE = QwenShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128)
GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
BUFFER_LINE = re.compile(r"^\w+:\s+(\S+)\s+(model|KV|compute|output) buffer size\s*=\s*([\d.]+) MiB", re.M)


@pytest.fixture(scope="module")
def attention_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plan-ckpt") / "Qwen3-Attn"
    write_checkpoint(folder, ATTENTION_SHAPE, shards=1)
    [path] = convert(str(folder), ["f16"], outdir=tmp_path_factory.mktemp("plan-gguf"), quiet=True)
    return Path(path)


def test_read_shape_of_a_converted_model(attention_gguf: Path) -> None:
    shape = read_shape(attention_gguf)
    assert (shape.n_layers, shape.n_embd, shape.n_ff, shape.n_head, shape.n_head_kv) == (2, 256, 512, 32, 8)
    assert (shape.head_dim_k, shape.head_dim_v, shape.n_vocab, shape.n_ctx_train) == (128, 128, 151936, 262144)
    assert shape.weight_bytes == sum(shape.layer_bytes) + shape.other_bytes
    embd = 151936 * 256 * 2  # f16 token_embd; tied, so no output.weight in the file
    assert shape.embd_bytes == embd and shape.other_bytes == embd + 256 * 4
    assert shape.head_bytes == 256 * 4 and shape.tied_type == 1  # output_norm only; token_embd (f16) is the output
    assert read_shape(str(attention_gguf)) is shape  # cached


@contextlib.contextmanager
def captured_llama_log() -> Iterator[list[str]]:
    """Everything llama.cpp logs meanwhile; localqwen's own callback is put back afterwards."""
    import llama_cpp
    import llama_cpp._logger

    from localqwen.backend import _quiet_once

    _quiet_once()  # the first load installs localqwen's callback: have it done, so that it does not replace this one
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        quiet_llama_log()


def measured_buffers(path: Path, n_ctx: int, kv_type: str, flash_attn: bool) -> dict[str, float]:
    """MiB per kind, summed over devices, as llama.cpp logs them while loading."""

    with captured_llama_log() as lines:
        # Loaded as Model.load loads it, but use_mmap=False: the weights are then plain allocations. With mmap,
        # llama.cpp logs the mapped file range *and* any repacked copies, counting those tensors twice.
        # op_offload=False keeps a GPU build from running big CPU-layer batches on the GPU (a GPU compute buffer).
        llama = open_llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_gpu_layers=0, flash_attn=flash_attn,
                           type_k=GGML_TYPES[kv_type], type_v=GGML_TYPES[kv_type], use_mmap=False, op_offload=False)
        assert llama.n_ctx() == plan_memory(read_shape(path), n_ctx, kv_type=kv_type, flash_attn=flash_attn).n_ctx
        llama.close()
    sizes = dict.fromkeys(("model", "KV", "compute", "output"), 0.0)
    for _, kind, mib in BUFFER_LINE.findall("".join(lines)):
        sizes[kind] += float(mib)
    return sizes


CONFIGS = [(n_ctx, kv_type, flash) for n_ctx in (512, 4096, 32768)
           for kv_type, flash in (("f16", False), ("f16", True), ("q8_0", True), ("q4_0", True))]


def measured_context_buffers(path: Path, n_ctx: int, n_seq: int, kv_type: str, flash_attn: bool) -> dict[str, float]:
    """MiB per kind as llama.cpp logs them, for the context Model.load makes: n_seq sequences of n_ctx tokens in one
    unified KV cache, one logits row per sequence (backend.new_context). Loaded without mmap, as above."""
    with captured_llama_log() as lines:
        model = load_model(path, gpu_layers=0, use_mmap=False)
        plan = plan_memory(read_shape(path), n_ctx, kv_type=kv_type, flash_attn=flash_attn, n_seq=n_seq,
                           n_outputs_max=n_seq)
        context = new_context(model, n_ctx=plan.n_ctx, n_batch=plan.n_batch, n_ubatch=plan.n_ubatch, n_seq_max=n_seq,
                              flash_attn=flash_attn, kv_type=GGML_TYPES[kv_type], n_threads=1, op_offload=False)
        context.close()
        model.close()
    sizes = dict.fromkeys(("model", "KV", "compute", "output"), 0.0)
    for _, kind, mib in BUFFER_LINE.findall("".join(lines)):
        sizes[kind] += float(mib)
    return sizes


@pytest.mark.parametrize(("n_ctx", "n_seq", "kv_type", "flash_attn"), [
    (512, 1, "f16", False), (4096, 2, "f16", False), (1000, 4, "f16", True), (8192, 4, "q8_0", True),
    (16384, 8, "q4_0", True)])
def test_plan_for_parallel_sequences_matches_llama_cpp(attention_gguf: Path, n_ctx: int, n_seq: int, kv_type: str,
                                                       flash_attn: bool) -> None:
    shape = read_shape(attention_gguf)
    plan = plan_memory(shape, n_ctx, kv_type=kv_type, flash_attn=flash_attn, repack_types=repacked_types(),
                       n_seq=n_seq, n_outputs_max=n_seq)
    assert plan.n_ctx_seq >= n_ctx and plan.n_ctx == plan.n_ctx_seq * n_seq
    got = measured_context_buffers(attention_gguf, n_ctx, n_seq, kv_type, flash_attn)
    pairs = {"model": plan.weights_cpu, "KV": plan.kv_cpu, "compute": plan.compute_cpu, "output": plan.output}
    for kind, planned in pairs.items():
        assert planned / MiB == pytest.approx(got[kind], abs=max(1.0, 0.03 * got[kind])), kind


@pytest.mark.parametrize(("n_ctx", "kv_type", "flash_attn"), [*CONFIGS, (262_144, "q4_0", True)])
def test_plan_matches_llama_cpp(attention_gguf: Path, n_ctx: int, kv_type: str, flash_attn: bool) -> None:
    shape = read_shape(attention_gguf)
    plan = plan_memory(shape, n_ctx, kv_type=kv_type, flash_attn=flash_attn, repack_types=repacked_types())
    got = measured_buffers(attention_gguf, n_ctx, kv_type, flash_attn)
    pairs = {"model": plan.weights_cpu, "KV": plan.kv_cpu, "compute": plan.compute_cpu, "output": plan.output}
    for kind, planned in pairs.items():
        planned_mib = planned / MiB
        assert planned_mib == pytest.approx(got[kind], abs=max(1.0, 0.03 * got[kind])), kind
    assert plan.total / MiB == pytest.approx(sum(got.values()), rel=0.03)
    assert plan.total_gpu == 0


def test_gpu_devices_are_ggmls_own() -> None:
    """The devices come from ggml's registry (libggml, through ctypes): this build's CPU device is there, and only
    devices of a GPU type count for offload (llama_supports_gpu_offload would also count an RPC-only build)."""
    import llama_cpp

    from localqwen.backend import GGML_DEVICE_GPU, GGML_DEVICE_IGPU, ggml_devices, gpu_devices

    devices = ggml_devices()
    assert ("CPU", 0) in devices
    assert gpu_devices() == tuple(name for name, kind in devices if kind in (GGML_DEVICE_GPU, GGML_DEVICE_IGPU))
    if not llama_cpp.llama_supports_rpc():  # without RPC, llama.cpp's own answer agrees
        assert bool(gpu_devices()) == llama_cpp.llama_supports_gpu_offload()
