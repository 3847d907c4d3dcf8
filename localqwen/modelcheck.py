"""What a GGUF must hold before llama.cpp may load it as a Qwen3 model.

llama.cpp asserts (and so aborts the whole process) on some inconsistent files, e.g. a tensor whose shape does not
match the hyperparameters. The structure is checked by gguf_header.read_header; this module checks the meaning:
the qwen3 hyperparameters are sane, every tensor the converter would write is there with the shape they imply, and
the vocabulary arrays agree. The expected tensors come from the converter's own table (one source of truth).
"""

from __future__ import annotations

from pathlib import Path

import gguf

from localqwen.constants import GGUF_ARCH
from localqwen.convert.checkpoint import Hparams, expected_shapes
from localqwen.errors import LocalqwenError
from localqwen.gguf_header import ArrayInfo, GGUFHeader

LIMITS = {"block_count": 1024, "embedding_length": 1 << 16, "feed_forward_length": 1 << 18,
          "attention.head_count": 1024, "attention.head_count_kv": 1024, "attention.key_length": 4096,
          "context_length": 1 << 24}


def hparams_from_gguf(header: GGUFHeader, path: Path) -> Hparams:
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch != GGUF_ARCH:
        raise LocalqwenError(f"is a {arch!r} model; localqwen runs {GGUF_ARCH} models", path)
    values: dict[str, int] = {}
    for key, limit in LIMITS.items():
        value = meta.get(f"{GGUF_ARCH}.{key}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise LocalqwenError(f"metadata {GGUF_ARCH}.{key} must be an integer in 1..{limit}, got {value!r}", path)
        values[key] = value
    if values["attention.head_count"] % values["attention.head_count_kv"]:
        raise LocalqwenError("head_count must be a multiple of head_count_kv", path)
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, ArrayInfo) or not isinstance(types, ArrayInfo) or tokens.count != types.count:
        raise LocalqwenError("tokenizer.ggml.tokens and token_type are missing or of different lengths", path)
    return Hparams(
        hidden_size=values["embedding_length"], intermediate_size=values["feed_forward_length"],
        num_hidden_layers=values["block_count"], num_attention_heads=values["attention.head_count"],
        num_key_value_heads=values["attention.head_count_kv"], head_dim=values["attention.key_length"],
        vocab_size=tokens.count, max_position_embeddings=values["context_length"],
        rms_norm_eps=float(meta.get(f"{GGUF_ARCH}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get(f"{GGUF_ARCH}.rope.freq_base", 1e4)),
        tie_word_embeddings="output.weight" not in header.tensors,
    )


def check_model(header: GGUFHeader, path: Path) -> Hparams:
    """Raise LocalqwenError unless `header` describes a complete, consistent Qwen3 model."""
    hp = hparams_from_gguf(header, path)
    if header.metadata.get(f"{GGUF_ARCH}.attention.value_length", hp.head_dim) != hp.head_dim:
        raise LocalqwenError("attention.value_length differs from key_length", path)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, hp.num_hidden_layers)
    for hf_name, shape in expected_shapes(hp).items():
        name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        info = header.tensors.get(name)
        if info is None:
            raise LocalqwenError(f"tensor {name} is missing", path)
        if info.shape != tuple(reversed(shape)):  # GGUF lists dimensions innermost first
            raise LocalqwenError(f"tensor {name} has shape {list(info.shape)}, the metadata implies "
                                 f"{list(reversed(shape))}", path)
    return hp
