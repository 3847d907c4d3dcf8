"""The one typed reader of GGUF metadata: every key localqwen uses, named by gguf-py's constants, its type checked.

`read_metadata(path)` parses the header with the bounded reader (gguf_header.py) once; the planner, the model
check, `localqwen info`, the store and the runtime all read their values from the `ModelMetadata` it returns. A key
of the wrong type is a ModelFileError naming the key; a missing key is None, for the caller to require or default.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import Keys, LlamaFileType

from localqwen.constants import Hparams
from localqwen.errors import ModelFileError
from localqwen.gguf_header import ArrayInfo, GGUFHeader, TensorInfo, read_header

# Sampling defaults the converter writes from generation_config.json, by localqwen's option names.
SAMPLING_KEYS = {"temperature": Keys.General.SAMPLING_TEMP, "top_p": Keys.General.SAMPLING_TOP_P,
                 "top_k": Keys.General.SAMPLING_TOP_K, "min_p": Keys.General.SAMPLING_MIN_P}
TIED_OUTPUT = "output.weight"  # absent when the output layer reuses token_embd (tied embeddings)


@dataclass(frozen=True, eq=False)  # compared (and hashed) by identity: one object per file read, cached
class ModelMetadata:
    """What a GGUF says about its model, typed. Hyperparameters are None where the file does not say."""

    path: Path
    header: GGUFHeader
    architecture: str
    name: str | None
    file_type: int | None
    chat_template: str | None
    sampling: dict[str, float]  # the general.sampling.* values present, by option name (top_k as an int)
    n_vocab: int  # entries of tokenizer.ggml.tokens (0 when absent)
    n_token_types: int  # entries of tokenizer.ggml.token_type
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    feed_forward_length: int | None
    head_count: int | None
    head_count_kv: int | None
    key_length: int | None
    value_length: int | None
    rms_norm_eps: float | None
    rope_freq_base: float | None

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    @property
    def tied_output(self) -> bool:
        return TIED_OUTPUT not in self.header.tensors

    @property
    def quant(self) -> str:
        """general.file_type as the --quant name it came from ("q4_k_m"), or "" when the file does not say."""
        try:
            name = LlamaFileType(self.file_type).name if self.file_type is not None else ""
        except ValueError:
            return ""
        return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()

    def key(self, field: str) -> str:
        """The GGUF key a hyperparameter field comes from, e.g. "qwen3.attention.head_count"."""
        return f"{self.architecture}.{_KEY_OF[field]}"

    def require(self, field: str) -> Any:
        """A hyperparameter the caller cannot do without: its value, or a ModelFileError naming its key."""
        value = getattr(self, field)
        if value is None:
            raise ModelFileError(f"not a usable model: GGUF metadata key {self.key(field)} is missing", self.path)
        return value

    def hparams(self) -> Hparams:
        """The hyperparameters as config.json names them; every one must be present."""
        return Hparams(
            hidden_size=self.require("embedding_length"), intermediate_size=self.require("feed_forward_length"),
            num_hidden_layers=self.require("block_count"), num_attention_heads=self.require("head_count"),
            num_key_value_heads=self.require("head_count_kv"), head_dim=self.require("key_length"),
            vocab_size=self.n_vocab, max_position_embeddings=self.require("context_length"),
            rms_norm_eps=self.rms_norm_eps if self.rms_norm_eps is not None else 1e-6,
            rope_theta=self.rope_freq_base if self.rope_freq_base is not None else 1e4,
            tie_word_embeddings=self.tied_output,
        )


# ModelMetadata field -> its key under the architecture's prefix.
_KEY_OF = {
    "context_length": Keys.LLM.CONTEXT_LENGTH, "block_count": Keys.LLM.BLOCK_COUNT,
    "embedding_length": Keys.LLM.EMBEDDING_LENGTH, "feed_forward_length": Keys.LLM.FEED_FORWARD_LENGTH,
    "head_count": Keys.Attention.HEAD_COUNT, "head_count_kv": Keys.Attention.HEAD_COUNT_KV,
    "key_length": Keys.Attention.KEY_LENGTH, "value_length": Keys.Attention.VALUE_LENGTH,
    "rms_norm_eps": Keys.Attention.LAYERNORM_RMS_EPS, "rope_freq_base": Keys.Rope.FREQ_BASE,
}
_KEY_OF = {field: key.removeprefix("{arch}.") for field, key in _KEY_OF.items()}
_FLOAT_FIELDS = ("rms_norm_eps", "rope_freq_base")


class _Reader:
    """Typed access to a header's metadata; a value of the wrong type is an error naming its key."""

    def __init__(self, header: GGUFHeader, path: Path) -> None:
        self.values, self.path = header.metadata, path

    def _wrong(self, key: str, expected: str) -> ModelFileError:
        shown = repr(self.values[key])
        return ModelFileError(f"metadata {key} must be {expected}, got {shown[:60]}", self.path)

    def integer(self, key: str) -> int | None:
        value = self.values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self._wrong(key, "an integer")
        return value

    def number(self, key: str) -> float | None:
        value = self.values.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._wrong(key, "a finite number")
        return float(value)

    def text(self, key: str) -> str | None:
        value = self.values.get(key)
        if value is not None and not isinstance(value, str):
            raise self._wrong(key, "a string")
        return value

    def array_length(self, key: str) -> int:
        value = self.values.get(key)
        if value is None:
            return 0
        if isinstance(value, ArrayInfo):
            return value.count
        if not isinstance(value, list):
            raise self._wrong(key, "an array")
        return len(value)


def metadata_from_header(header: GGUFHeader, path: Path) -> ModelMetadata:
    read = _Reader(header, path)
    arch = read.text(Keys.General.ARCHITECTURE) or ""
    hparams: dict[str, Any] = {}
    for field, key in _KEY_OF.items():
        full = f"{arch}.{key}"
        hparams[field] = read.number(full) if field in _FLOAT_FIELDS else read.integer(full)
    sampling: dict[str, float] = {}
    for option, key in SAMPLING_KEYS.items():
        value = read.integer(key) if option == "top_k" else read.number(key)
        if value is not None:
            sampling[option] = value
    return ModelMetadata(
        path=path, header=header, architecture=arch, name=read.text(Keys.General.NAME),
        file_type=read.integer(Keys.General.FILE_TYPE), chat_template=read.text(Keys.Tokenizer.CHAT_TEMPLATE),
        sampling=sampling, n_vocab=read.array_length(Keys.Tokenizer.LIST),
        n_token_types=read.array_length(Keys.Tokenizer.TOKEN_TYPE), **hparams,
    )


@functools.lru_cache(maxsize=8)
def _cached(path: Path, mtime_ns: int, size: int) -> ModelMetadata:
    return metadata_from_header(read_header(path), path)


def read_metadata(path: Path | str) -> ModelMetadata:
    """The typed metadata of a GGUF (cached per path, size and modification time)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file ({exc.strerror})", path) from None
    if not path.is_file():
        raise ModelFileError("not a file", path)
    return _cached(path, stat.st_mtime_ns, stat.st_size)
