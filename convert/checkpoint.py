"""Read and validate a Hugging Face Qwen3 checkpoint folder before anything is written.

Every problem is reported as one line that names the file at fault. Tensor data is not read here: shards are
only indexed (gguf-py's SafetensorsLocal parses the header), so validation is fast even for 8 GB checkpoints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.utility import LocalTensor, SafetensorsLocal

from localqwen.constants import SUPPORTED_ARCHITECTURES, Hparams, expected_shapes
from localqwen.errors import CheckpointError

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


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError("file not found", path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"not valid JSON ({exc})", path) from None


def read_hparams(config: dict[str, Any], path: Path) -> Hparams:
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [architectures]
    if not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures):
        found = ", ".join(map(str, architectures)) or "none"
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
        elif key in ("rms_norm_eps", "rope_theta"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise CheckpointError(f"{key} must be a positive number, got {value!r}", path)
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{key} must be a positive integer, got {value!r}", path)
    if values["num_attention_heads"] % values["num_key_value_heads"]:
        raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads", path)
    return Hparams(**values)


def shard_files(folder: Path) -> dict[Path, set[str]]:
    """The shards and the tensor names each should hold: from the index when there is one, else model.safetensors."""
    index_path = folder / INDEX_FILE
    if not index_path.exists():
        single = folder / SINGLE_FILE
        if not single.exists():
            raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE}: not a safetensors checkpoint", folder)
        return {single: set()}
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("has no weight_map", index_path)
    shards: dict[Path, set[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"weight_map entry {name!r} names an invalid shard {shard!r}", index_path)
        shards.setdefault(folder / shard, set()).add(name)
    for path in shards:
        if not path.is_file():
            raise CheckpointError(f"shard listed in {INDEX_FILE} is missing", path)
    return dict(sorted(shards.items()))


def read_shard(path: Path) -> dict[str, LocalTensor]:
    try:
        tensors = SafetensorsLocal(path).tensors
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
        # gguf-py's parser trusts the header's JSON layout; any surprise in it is a corrupt header.
        raise CheckpointError(f"corrupt safetensors header ({exc})", path) from None
    size = path.stat().st_size
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
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError("must hold a JSON object", config_path)
    hparams = read_hparams(config, config_path)
    for name in REQUIRED_TOKENIZER_FILES:
        if not (folder / name).is_file():
            raise CheckpointError("tokenizer file missing", folder / name)

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
