"""Conversion correctness: logits against an independent float64 forward pass, metadata, tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from tokenizers import Tokenizer

from localqwen.backend import open_llama
from localqwen.convert import convert
from localqwen.gguf_header import read_header
from localqwen.synthetic import write_checkpoint

from .conftest import QUANT_SHAPE
from .reference import forward

PROMPT_TEXT = ("<|im_start|>system\nYou are a careful assistant. 你好，世界 🚀<|im_end|>\n<|im_start|>user\n"
               "Write a Python function that returns the n-th Fibonacci number, and explain its complexity.<|im_end|>\n"
               "<|im_start|>assistant\n<think>\nThe user wants fib(n). def fib(n):\n    a, b = 0, 1\n")


def load(path: Path, **kwargs) -> llama_cpp.Llama:
    return open_llama(path, n_ctx=128, n_threads=2, **kwargs)


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = load(path, logits_all=True)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def prompt_ids(checkpoint: Path) -> list[int]:
    return Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(PROMPT_TEXT).ids


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_f32_logits_match_float64_reference(checkpoint: Path, gguf_files: dict[str, Path]) -> None:
    ids = prompt_ids(checkpoint)
    want = forward(checkpoint, ids)
    got = llama_logits(gguf_files["f32"], ids)
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"f32 max relative error {rel:.2e}")
    assert rel < 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()


# Random weights are the worst case for quantization (no structure to preserve), so the bounds are loose; a broken
# conversion gives KL of several nats and chance-level agreement. The ordering bf16 < q8_0 < q4_k_m must hold too.
QUANT_BOUNDS = {"bf16": (1e-3, 0.97), "q8_0": (0.02, 0.75), "q4_k_m": (0.6, 0.4)}


def test_quantized_logits_stay_close(checkpoint: Path, gguf_files: dict[str, Path]) -> None:
    ids = prompt_ids(checkpoint)
    ref = log_softmax(forward(checkpoint, ids))
    kls = {}
    for quant, (max_kl, min_top1) in QUANT_BOUNDS.items():
        got = log_softmax(llama_logits(gguf_files[quant], ids))
        kls[quant] = float((np.exp(ref) * (ref - got)).sum(-1).mean())
        top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
        print(f"{quant}: mean KL {kls[quant]:.2e}, top-1 agreement {top1:.3f} over {len(ids)} positions")
        assert kls[quant] < max_kl and top1 >= min_top1, quant
    assert kls["bf16"] < kls["q8_0"] < kls["q4_k_m"]


def reader_fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def test_metadata_is_what_llama_cpp_writes(checkpoint: Path, gguf_files: dict[str, Path]) -> None:
    fields = reader_fields(gguf_files["bf16"])
    config = json.loads((checkpoint / "config.json").read_text())
    expected = {
        "general.architecture": "qwen3",
        "general.type": "model",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_BF16),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "general.sampling.temp": pytest.approx(0.6),
        "general.sampling.top_k": 20,
        "general.sampling.top_p": pytest.approx(0.95),
        "qwen3.context_length": config["max_position_embeddings"],
        "qwen3.embedding_length": QUANT_SHAPE.hidden_size,
        "qwen3.block_count": QUANT_SHAPE.num_hidden_layers,
        "qwen3.feed_forward_length": QUANT_SHAPE.intermediate_size,
        "qwen3.attention.head_count": QUANT_SHAPE.num_attention_heads,
        "qwen3.attention.head_count_kv": QUANT_SHAPE.num_key_value_heads,
        "qwen3.attention.key_length": QUANT_SHAPE.head_dim,
        "qwen3.attention.value_length": QUANT_SHAPE.head_dim,
        "qwen3.attention.layer_norm_rms_epsilon": pytest.approx(1e-6),
        "qwen3.rope.freq_base": pytest.approx(5_000_000.0),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.bos_token_id": 151643,
        "tokenizer.ggml.eos_token_id": 151645,
        "tokenizer.ggml.padding_token_id": 151643,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": json.loads((checkpoint / "tokenizer_config.json").read_text())["chat_template"],
    }
    for key, value in expected.items():
        assert fields.get(key) == value, key
    assert fields["general.name"] and fields["general.size_label"]
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 151936
    assert (tokens[151644], types[151644]) == ("<|im_start|>", gguf.TokenType.CONTROL)
    assert (tokens[151668], types[151668]) == ("</think>", gguf.TokenType.USER_DEFINED)
    assert (tokens[151657], types[151657]) == ("<tool_call>", gguf.TokenType.USER_DEFINED)
    assert (tokens[151660], types[151660]) == ("<|fim_middle|>", gguf.TokenType.CONTROL)  # looks special
    assert (tokens[151700], types[151700]) == ("[PAD151700]", gguf.TokenType.UNUSED)
    assert (tokens[220], types[220]) == ("Ġ", gguf.TokenType.NORMAL)
    merges = json.loads((checkpoint / "tokenizer.json").read_text())["model"]["merges"]
    assert len(fields["tokenizer.ggml.merges"]) == len(merges)


def tensor_types(path: Path) -> dict[str, str]:
    return {name: t.type.name for name, t in read_header(path).tensors.items()}


def test_tensor_names_and_types(gguf_files: dict[str, Path]) -> None:
    bf16 = tensor_types(gguf_files["bf16"])
    n = QUANT_SHAPE.num_hidden_layers
    assert len(bf16) == 2 + 11 * n  # tied embeddings: no output tensor
    assert "output.weight" not in bf16
    for name, kind in bf16.items():
        assert kind == ("F32" if "norm" in name else "BF16"), name
    q4 = tensor_types(gguf_files["q4_k_m"])
    assert q4["token_embd.weight"] == "Q6_K"  # tied embeddings also serve as output: llama.cpp keeps them at Q6_K
    for i in range(n):
        # llama.cpp's use_more_bits(), in integer arithmetic: the first and last eighth of layers, and every third.
        more_bits = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
        assert q4[f"blk.{i}.attn_v.weight"] == q4[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if more_bits else "Q4_K")
        assert q4[f"blk.{i}.attn_q.weight"] == q4[f"blk.{i}.ffn_up.weight"] == "Q4_K"
        assert q4[f"blk.{i}.attn_norm.weight"] == "F32"
    assert {q4["blk.0.attn_v.weight"], q4["blk.1.attn_v.weight"]} == {"Q4_K", "Q6_K"}  # both branches exercised
    assert set(tensor_types(gguf_files["q8_0"]).values()) == {"Q8_0", "F32"}


def test_output_file_names_follow_the_convention(gguf_files: dict[str, Path]) -> None:
    names = {q: p.name for q, p in gguf_files.items()}
    assert names["q4_k_m"].endswith("-Q4_K_M.gguf") and names["q4_k_m"].startswith("Qwen3-Tiny-Thinking")
    assert names["bf16"].endswith("-BF16.gguf")
    leftovers = [p.name for p in gguf_files["f32"].parent.iterdir() if p.name not in names.values()]
    assert leftovers == []  # the intermediate and temporary files are gone


TOKENIZER_SAMPLES = [
    "Hello world", "  leading and   inner   spaces\t\ttabs\n\n\nnewlines  ", "你好，世界！这是一个测试。",
    "こんにちは 世界", "emoji 🚀🦙 and ZWJ 👩‍👩‍👧 family", "def f(x):\n    return x**2  # square\n",
    "I've been 'told' he's there; we'll see. 3.14159 12345678", "<|im_start|>user\nhi<|im_end|>\n<think>\nok\n</think>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>", "ÀÉÎÕÜ ñ ç ß",
]
# Not compared: text that is not in NFC. tokenizer.json normalizes to NFC, llama.cpp's qwen2 tokenizer does not;
# localqwen normalizes user text itself before tokenizing (tests/test_model.py).


def test_tokenization_matches_tokenizers_library(checkpoint: Path, gguf_files: dict[str, Path]) -> None:
    reference = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    llm = load(gguf_files["q8_0"], vocab_only=True)
    template = json.loads((checkpoint / "tokenizer_config.json").read_text())["chat_template"]
    rendered = __import__("jinja2").Template(template).render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? 中文 🙂"}],
        add_generation_prompt=True)
    for text in [*TOKENIZER_SAMPLES, rendered]:
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert got == reference.encode(text).ids, text


def test_transformers5_rope_parameters_config(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt", QUANT_SHAPE, seed=2, shards=1, rope_style="parameters")
    [path] = convert(str(folder), ["q8_0"], outdir=tmp_path, quiet=True)
    assert reader_fields(path)["qwen3.rope.freq_base"] == pytest.approx(5_000_000.0)
