"""Read and validate a Hugging Face Qwen3 checkpoint folder before anything is written.

Every problem is reported as one line that names the file at fault. Tensor data is not read here: shards are
only indexed (their JSON headers parsed), so validation is fast even for 8 GB checkpoints. Every file is read through
source_files (regular files only, size caps, strict parsing), and the hyperparameters are bounded by the same limits
as the GGUF check before anything is sized from them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.utility import LocalTensor, LocalTensorRange

from localqwen.constants import SUPPORTED_ARCHITECTURES, Hparams, expected_shapes
from localqwen.errors import CheckpointError
from localqwen.gguf_header import MAX_ARRAY, MAX_TENSORS
from localqwen.modelcheck import LIMITS

from .source_files import (
    INDEX_LIMIT,
    SAFETENSORS_HEADER_LIMIT,
    check_side_files,
    open_regular,
    parse_json,
    read_json,
    read_json_object,
)

SAFETENSORS_DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    config: dict[str, Any]
    hparams: Hparams
    tensors: dict[str, LocalTensor]  # in the order llama.cpp's converter reads them: shard by shard, sorted names


# config.json field -> its upper bound (modelcheck.LIMITS, keyed by the GGUF field it becomes).
CONFIG_LIMITS = {"hidden_size": LIMITS["embedding_length"], "intermediate_size": LIMITS["feed_forward_length"],
                 "num_hidden_layers": LIMITS["block_count"], "num_attention_heads": LIMITS["head_count"],
                 "num_key_value_heads": LIMITS["head_count_kv"], "head_dim": LIMITS["key_length"],
                 "max_position_embeddings": LIMITS["context_length"], "vocab_size": MAX_ARRAY}
FLOAT_LIMITS = {"rms_norm_eps": 1.0, "rope_theta": 1e12}  # exclusive of 0, as loadcheck's ranges
MAX_TENSOR_NAME = 256


def read_hparams(config: dict[str, Any], path: Path) -> Hparams:
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [architectures]
    if not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures):
        found = ", ".join(a if isinstance(a, str) and a.isprintable() else repr(a) for a in architectures)[:120]
        found = found or "none"
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise CheckpointError(f"architecture {found} is not supported (supported: {supported})", path)
    # transformers 5.x moved rope_theta under rope_parameters; accept both styles.
    rope_parameters = config.get("rope_parameters")
    if not isinstance(rope_parameters, dict):
        rope_parameters = {}
    rope_theta = config.get("rope_theta", rope_parameters.get("rope_theta"))
    values = {
        "rope_theta": rope_theta,
        "head_dim": config.get("head_dim"),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
    }
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "rms_norm_eps"):
        values[key] = config.get(key)
    if values["head_dim"] is None and isinstance(values["hidden_size"], int) and values["num_attention_heads"]:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    for key, value in values.items():
        if key == "tie_word_embeddings":
            if not isinstance(value, bool):
                raise CheckpointError(f"{key} must be true or false, got {value!r}", path)
        elif key in FLOAT_LIMITS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= FLOAT_LIMITS[key]:
                raise CheckpointError(f"{key} must be a number above 0 and at most {FLOAT_LIMITS[key]:g}, got "
                                      f"{value!r}", path)
        elif isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= CONFIG_LIMITS[key]:
            raise CheckpointError(f"{key} must be an integer in 1..{CONFIG_LIMITS[key]}, got {value!r}", path)
    if values["num_attention_heads"] % values["num_key_value_heads"]:
        raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads", path)
    if values["head_dim"] % 2:
        raise CheckpointError(f"head_dim {values['head_dim']} must be even (RoPE rotates pairs)", path)
    for key in ("_name_or_path", "text_config"):  # read by gguf-py: a string, an object
        if key in config and not isinstance(config[key], str if key == "_name_or_path" else dict):
            raise CheckpointError(f"{key} has the wrong type", path)
    return Hparams(**values)


def shard_files(folder: Path) -> dict[Path, set[str]]:
    """The shards and the tensor names each should hold: from the index when there is one, else model.safetensors."""
    index_path = folder / INDEX_FILE
    if not index_path.exists():
        single = folder / SINGLE_FILE
        if not single.exists():
            raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE}: not a safetensors checkpoint", folder)
        return {single: set()}
    index = read_json(index_path, INDEX_LIMIT)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("has no weight_map", index_path)
    if len(weight_map) > MAX_TENSORS:
        raise CheckpointError(f"lists {len(weight_map)} tensors, more than {MAX_TENSORS}", index_path)
    shards: dict[Path, set[str]] = {}
    for name, shard in weight_map.items():
        if not name.isprintable() or len(name) > MAX_TENSOR_NAME:
            raise CheckpointError(f"weight_map holds an invalid tensor name {name[:80]!r}", index_path)
        if not isinstance(shard, str) or not shard.isprintable() or Path(shard).name != shard:
            raise CheckpointError(f"weight_map entry {name!r} names an invalid shard {shard!r}", index_path)
        shards.setdefault(folder / shard, set()).add(name)
    for path in shards:
        if not os.path.lexists(path):
            raise CheckpointError(f"shard listed in {INDEX_FILE} is missing", path)
    return dict(sorted(shards.items()))


def read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """A shard's JSON header (strictly parsed, at most the format's 100 MB), where its data starts, the file's size."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < length <= min(SAFETENSORS_HEADER_LIMIT, size - 8):
            raise CheckpointError(f"corrupt safetensors header (length {length} for a file of {size} bytes)", path)
        raw = f.read(length)
    try:
        header = parse_json(raw.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise CheckpointError("corrupt safetensors header (not UTF-8)", path) from None
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header (not a JSON object)", path)
    if len(header) > MAX_TENSORS + 1:
        raise CheckpointError(f"holds more than {MAX_TENSORS} tensors", path)
    return header, 8 + length, size


def read_shard(path: Path) -> dict[str, LocalTensor]:
    header, data_start, size = read_header(path)
    tensors: dict[str, LocalTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not name.isprintable() or len(name) > MAX_TENSOR_NAME:  # names end up in one-line errors
            raise CheckpointError(f"corrupt safetensors header (tensor name {name[:80]!r})", path)
        fields = entry if isinstance(entry, dict) else {}
        shape, offsets = fields.get("shape"), fields.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) <= 8 and isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in offsets) and 0 <= offsets[0]
                <= offsets[1]):
            raise CheckpointError(f"corrupt safetensors header (tensor {name[:80]!r})", path)
        tensors[name] = LocalTensor(fields.get("dtype"), tuple(shape),
                                    LocalTensorRange(path, data_start + offsets[0], offsets[1] - offsets[0]))
    tensors = dict(sorted(tensors.items()))
    for name, tensor in tensors.items():
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in tensor.shape):
            raise CheckpointError(f"tensor {name} has an invalid shape {list(tensor.shape)}", path)
        if not isinstance(tensor.data_range.size, int) or tensor.data_range.offset < 8:
            raise CheckpointError(f"tensor {name} has invalid data_offsets", path)
        if not isinstance(tensor.dtype, str) or tensor.dtype not in SAFETENSORS_DTYPE_SIZES:
            raise CheckpointError(f"tensor {name} has dtype {tensor.dtype} (supported: BF16, F16, F32)", path)
        want = math.prod(tensor.shape) * SAFETENSORS_DTYPE_SIZES[tensor.dtype]
        if tensor.data_range.size != want:
            raise CheckpointError(f"tensor {name} holds {tensor.data_range.size} bytes, its shape needs {want}", path)
        if tensor.data_range.offset + tensor.data_range.size > size:
            raise CheckpointError(f"truncated: tensor {name} ends past the end of the file", path)
    return tensors


def load_checkpoint(folder: Path) -> Checkpoint:
    """Index and validate a checkpoint folder; raise LocalqwenError naming the file for the first problem found."""
    if not folder.is_dir():
        raise CheckpointError("not a folder", folder)
    config_path = folder / "config.json"
    config = read_json_object(config_path)
    hparams = read_hparams(config, config_path)
    for name in REQUIRED_TOKENIZER_FILES:
        if not os.path.lexists(folder / name):
            raise CheckpointError("tokenizer file missing", folder / name)
        open_regular(folder / name).close()
    check_side_files(folder)

    tensors: dict[str, LocalTensor] = {}
    for shard, listed in shard_files(folder).items():
        found = read_shard(shard)
        if listed and set(found) != listed:
            missing = sorted(listed - set(found))
            detail = f"lacks {missing[0]}" if missing else f"holds {sorted(set(found) - listed)[0]} not in the index"
            raise CheckpointError(f"does not match {INDEX_FILE}: {detail}", shard)
        for name in found:
            if name in tensors:
                raise CheckpointError(f"tensor {name} appears in more than one shard", shard)
        tensors |= found

    expected = expected_shapes(hparams)
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint", folder)
        if tensors[name].shape != shape:
            raise CheckpointError(f"tensor {name} has shape {list(tensors[name].shape)}, config.json implies "
                                 f"{list(shape)}", tensors[name].data_range.filename)
    for name in tensors:
        # Old exports carry rotary inverse frequencies; llama.cpp recomputes them and skips these too.
        if name not in expected and not name.endswith(".rotary_emb.inv_freq"):
            raise CheckpointError(f"unexpected tensor {name}", tensors[name].data_range.filename)
    return Checkpoint(folder, config, hparams, {k: v for k, v in tensors.items() if k in expected})
