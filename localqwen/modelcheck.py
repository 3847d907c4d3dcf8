"""What a GGUF must hold before llama.cpp may load it as a Qwen3 model.

llama.cpp asserts (and so aborts the whole process) on some inconsistent files, e.g. a tensor whose shape does not
match the hyperparameters. The structure is checked by gguf_header.read_header and the metadata types by
metadata.read_metadata; this module checks the meaning: the qwen3 hyperparameters are sane, every tensor the
converter would write is there with the shape they imply, and the vocabulary arrays agree. The expected tensors
come from constants.expected_shapes, the table the converter checks checkpoints against. What llama.cpp itself
asserts on (types and ranges of every key it reads, tensor storage types, vocabulary invariants) is loadcheck's.
"""

from __future__ import annotations

import gguf

from localqwen.constants import GGUF_ARCH, Hparams, expected_shapes
from localqwen.errors import ModelFileError
from localqwen.loadcheck import LLAMA_MAX_LAYERS, check_metadata, check_tensors, check_vocabulary
from localqwen.metadata import ModelMetadata

# Upper bounds far above any real Qwen3, low enough that nothing sized from them can exhaust memory.
LIMITS = {"block_count": LLAMA_MAX_LAYERS, "embedding_length": 1 << 16, "feed_forward_length": 1 << 18,
          "head_count": 1024, "head_count_kv": 1024, "key_length": 4096, "context_length": 1 << 24}


def check_model(meta: ModelMetadata) -> Hparams:
    """Raise ModelFileError unless `meta` describes a complete, consistent Qwen3 model; return its hyperparameters."""
    path = meta.path
    if meta.architecture != GGUF_ARCH:
        raise ModelFileError(f"is a {meta.architecture!r} model; localqwen runs {GGUF_ARCH} models", path)
    check_metadata(meta)
    for field, limit in LIMITS.items():
        value = meta.require(field)
        if not 0 < value <= limit:
            raise ModelFileError(f"metadata {meta.key(field)} must be an integer in 1..{limit}, got {value!r}", path)
    if meta.head_count % meta.head_count_kv:
        raise ModelFileError("head_count must be a multiple of head_count_kv", path)
    if not meta.n_vocab or meta.n_vocab != meta.n_token_types:
        raise ModelFileError("tokenizer.ggml.tokens and token_type are missing or of different lengths", path)
    if meta.value_length is not None and meta.value_length != meta.key_length:
        raise ModelFileError("attention.value_length differs from key_length", path)
    if meta.key_length % 2:  # RoPE rotates pairs: ggml asserts an even dimension count
        raise ModelFileError(f"attention.key_length {meta.key_length} must be even", path)
    hp = meta.hparams()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, hp.num_hidden_layers)
    expected: set[str] = set()
    for hf_name, shape in expected_shapes(hp).items():
        name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        expected.add(name)
        info = meta.tensors.get(name)
        if info is None:
            raise ModelFileError(f"tensor {name} is missing", path)
        if info.shape != tuple(reversed(shape)):  # GGUF lists dimensions innermost first
            raise ModelFileError(f"tensor {name} has shape {list(info.shape)}, the metadata implies "
                                 f"{list(reversed(shape))}", path)
    check_tensors(meta, expected)
    check_vocabulary(meta)
    return hp
