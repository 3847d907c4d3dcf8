"""What llama.cpp's loader, vocabulary and graph code assert on, checked before llama.cpp sees a GGUF.

A failed GGML_ASSERT aborts the whole process (chat, server), an unsupported tensor type segfaults it; neither can
be caught. Each rule here closes one class of those (the conditions and where llama.cpp checks them are listed in
docs/hostile-files.md):

- metadata: every key llama.cpp reads for a qwen3 model, and every key localqwen reads, has exactly the GGUF type
  llama.cpp's getters demand and a value in the range it accepts (RMS epsilon, rope dimensions, rope scaling, token
  ids, sampling defaults). Keys in the namespaces llama.cpp interprets (`qwen3.`, `tokenizer.`, `split.`) that this
  model does not use are refused: each one switches on code (experts, pooling, sliding windows, split files) that a
  qwen3 file never exercises. Other namespaces (`general.`, `quantize.`) are descriptive and pass when well typed.
- tensors: exactly the tensors a Qwen3 model has (llama.cpp would pick up extra ones as optional biases or scales),
  norms as F32 and weight matrices only in the types llama.cpp's own quantizer produces for them.
- vocabulary: GPT-2 byte-level BPE with the qwen2 pre-tokenizer, every token non-empty and unique (llama.cpp asserts
  on duplicates), Qwen3's added tokens at their ids with their types, special-token ids naming control tokens.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType, TokenType

from localqwen import verdicts
from localqwen.constants import ENDOFTEXT_ID
from localqwen.errors import BadRequest, ModelFileError
from localqwen.gguf_header import ArrayInfo
from localqwen.metadata import SAMPLING_KEYS, ModelMetadata
from localqwen.sampling import OPTION
from localqwen.tokenizer_data import ADDED_TOKENS, NOT_SPECIAL

LLAMA_MAX_LAYERS = 512  # llama.cpp asserts block_count <= LLAMA_MAX_LAYERS (llama-hparams.h)
TOKENIZER_MODEL, TOKENIZER_PRE = "gpt2", "qwen2"
ROPE_SCALING_TYPES = ("none", "linear", "yarn")  # llama.cpp asserts on any other name; longrope needs extra tensors

T = GGMLQuantizationType
NORM_TYPES = frozenset({T.F32})  # 1-D tensors are never quantized; ggml's CPU MUL aborts on any other type
# Weight matrices: the default type of every llama_ftype, the per-tensor bumps of the mixtures and the fallbacks for
# odd row lengths (llama-quant.cpp). Not I8..I64/F64 (no matmul kernel: segfault), Q8_1/Q8_K (dot-product helper
# types, never stored: abort), MXFP4 (produced for MoE experts only).
MATRIX_TYPES = frozenset({
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
    T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0,
    T.NVFP4, T.Q1_0,
})

V = GGUFValueType
VOCABULARY_CHECK_FORMAT = 1  # part of the remembered verdict's key: bump when the vocabulary rules change
Check = Callable[[Any, ModelMetadata], str | None]  # None when fine, else what is wrong


@dataclass(frozen=True)
class Rule:
    """The GGUF type a key must have (element type for arrays) and, optionally, a check of its value."""

    vtype: GGUFValueType
    item: GGUFValueType | None = None
    check: Check | None = None
    required: bool = False


def _in_range(low: float, high: float, *, low_open: bool = False) -> Check:
    def check(value: Any, meta: ModelMetadata) -> str | None:
        fine = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        return None if fine else f"must be {'above' if low_open else 'at least'} {low:g} and at most {high:g}"
    return check


def _equals(*allowed: str) -> Check:
    def check(value: Any, meta: ModelMetadata) -> str | None:
        return None if value in allowed else f"must be {' or '.join(map(repr, allowed))} for this model"
    return check


def _rope_dimensions(value: int, meta: ModelMetadata) -> str | None:
    # The qwen3 graph asserts n_embd_head == n_rot (llama.cpp src/models/qwen3.cpp).
    return None if value == meta.key_length else f"must equal attention.key_length ({meta.key_length})"


def _original_context(value: int, meta: ModelMetadata) -> str | None:
    ctx = meta.context_length or 0
    return None if 0 < value <= ctx else f"must be in 1..context_length ({ctx})"


def _token_id(value: int, meta: ModelMetadata) -> str | None:
    return None if value < meta.n_vocab else f"is outside the vocabulary of {meta.n_vocab} tokens"


def _file_type(value: int, meta: ModelMetadata) -> str | None:
    known = {int(t) for t in LlamaFileType if t != LlamaFileType.GUESSED}
    return None if value in known else "is not a llama.cpp file type"


def _printable(value: str, meta: ModelMetadata) -> str | None:
    # Shown by `localqwen info`: no terminal escape sequences, no line breaks.
    return None if value.isprintable() else "holds control characters"


def _sampling(option: str) -> Check:
    def check(value: Any, meta: ModelMetadata) -> str | None:
        try:
            OPTION[option].check(value)
        except BadRequest:
            return f"is out of range for {option} ({OPTION[option].accepted})"
        return None
    return check


# Keys under the architecture's prefix ("qwen3."): what the converter writes, and the rope keys llama.cpp honours.
ARCH_RULES = {
    Keys.LLM.CONTEXT_LENGTH: Rule(V.UINT32, required=True), Keys.LLM.EMBEDDING_LENGTH: Rule(V.UINT32, required=True),
    Keys.LLM.BLOCK_COUNT: Rule(V.UINT32, required=True), Keys.LLM.FEED_FORWARD_LENGTH: Rule(V.UINT32, required=True),
    Keys.Attention.HEAD_COUNT: Rule(V.UINT32, required=True), Keys.Attention.HEAD_COUNT_KV: Rule(V.UINT32),
    Keys.Attention.KEY_LENGTH: Rule(V.UINT32), Keys.Attention.VALUE_LENGTH: Rule(V.UINT32),
    # ggml asserts eps >= 0 (NaN fails it too) in its RMS norm.
    Keys.Attention.LAYERNORM_RMS_EPS: Rule(V.FLOAT32, check=_in_range(0, 1, low_open=True), required=True),
    Keys.Rope.FREQ_BASE: Rule(V.FLOAT32, check=_in_range(0, 1e12, low_open=True)),
    Keys.Rope.DIMENSION_COUNT: Rule(V.UINT32, check=_rope_dimensions),
    Keys.Rope.SCALING_TYPE: Rule(V.STRING, check=_equals(*ROPE_SCALING_TYPES)),
    Keys.Rope.SCALING_FACTOR: Rule(V.FLOAT32, check=_in_range(1, 1024)),
    Keys.Rope.SCALING_ORIG_CTX_LEN: Rule(V.UINT32, check=_original_context),
    Keys.Rope.SCALING_FINETUNED: Rule(V.BOOL),
}
ARCH_RULES = {key.removeprefix("{arch}."): rule for key, rule in ARCH_RULES.items()}

SPECIAL_TOKEN_KEYS = (Keys.Tokenizer.BOS_ID, Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID,
                      Keys.Tokenizer.UNK_ID, Keys.Tokenizer.SEP_ID, Keys.Tokenizer.PAD_ID, Keys.Tokenizer.MASK_ID)
TOKENIZER_RULES = {
    Keys.Tokenizer.MODEL: Rule(V.STRING, check=_equals(TOKENIZER_MODEL), required=True),
    Keys.Tokenizer.PRE: Rule(V.STRING, check=_equals(TOKENIZER_PRE), required=True),
    Keys.Tokenizer.LIST: Rule(V.ARRAY, V.STRING, required=True),
    Keys.Tokenizer.TOKEN_TYPE: Rule(V.ARRAY, V.INT32, required=True),
    Keys.Tokenizer.MERGES: Rule(V.ARRAY, V.STRING, required=True),
    Keys.Tokenizer.SCORES: Rule(V.ARRAY, V.FLOAT32),
    **{key: Rule(V.UINT32, check=_token_id) for key in SPECIAL_TOKEN_KEYS},
    Keys.Tokenizer.ADD_BOS: Rule(V.BOOL), Keys.Tokenizer.ADD_EOS: Rule(V.BOOL), Keys.Tokenizer.ADD_SEP: Rule(V.BOOL),
    Keys.Tokenizer.ADD_PREFIX: Rule(V.BOOL), Keys.Tokenizer.REMOVE_EXTRA_WS: Rule(V.BOOL),
    Keys.Tokenizer.CHAT_TEMPLATE: Rule(V.STRING), Keys.Tokenizer.CHAT_TEMPLATES: Rule(V.ARRAY, V.STRING),
    Keys.Tokenizer.HF_JSON: Rule(V.STRING),
}
GENERAL_RULES = {
    Keys.General.ARCHITECTURE: Rule(V.STRING, required=True), Keys.General.ALIGNMENT: Rule(V.UINT32),
    Keys.General.FILE_TYPE: Rule(V.UINT32, check=_file_type), Keys.General.QUANTIZATION_VERSION: Rule(V.UINT32),
    Keys.General.NAME: Rule(V.STRING, check=_printable),
    **{key: Rule(V.STRING) for key in (
        Keys.General.TYPE, Keys.General.AUTHOR, Keys.General.VERSION, Keys.General.ORGANIZATION,
        Keys.General.FINETUNE, Keys.General.BASENAME, Keys.General.DESCRIPTION, Keys.General.QUANTIZED_BY,
        Keys.General.SIZE_LABEL, Keys.General.LICENSE, Keys.General.LICENSE_NAME, Keys.General.LICENSE_LINK,
        Keys.General.URL, Keys.General.DOI, Keys.General.UUID, Keys.General.REPO_URL)},
    **{key: Rule(V.ARRAY, V.STRING) for key in (Keys.General.TAGS, Keys.General.LANGUAGES)},
    # The sampling defaults localqwen takes from the file: the types gguf-py writes, the ranges Sampling accepts.
    **{key: Rule(V.INT32 if option == "top_k" else V.FLOAT32, check=_sampling(option))
       for option, key in SAMPLING_KEYS.items()},
}
# Namespaces llama.cpp interprets: a key there that no rule names is refused. (Split files make llama.cpp open
# sibling files by a name pattern; localqwen loads single files.)
STRICT_PREFIXES = ("tokenizer.", "split.")
NAMED_TEMPLATE_PREFIX = Keys.Tokenizer.CHAT_TEMPLATE + "."


def check_metadata(meta: ModelMetadata) -> None:
    """Raise ModelFileError for a key of the wrong type, a value out of llama.cpp's range, or a key this model must
    not have. `meta.architecture` is the expected one (the caller checked it)."""
    header, arch_prefix = meta.header, f"{meta.architecture}."
    rules = {**GENERAL_RULES, **TOKENIZER_RULES, **{arch_prefix + key: rule for key, rule in ARCH_RULES.items()}}
    # Named chat templates (gguf-py writes tokenizer.chat_template.<name> beside the default one).
    rules |= {key: Rule(V.STRING) for key in header.metadata if key.startswith(NAMED_TEMPLATE_PREFIX)}
    for key in header.metadata:
        if key not in rules and key.startswith((arch_prefix, *STRICT_PREFIXES)):
            raise ModelFileError(f"metadata {key} is not used by a {meta.architecture} model; llama.cpp would act on "
                                 "it: refusing the file", meta.path)
    for key, rule in rules.items():
        if key not in header.metadata:
            if rule.required:
                raise ModelFileError(f"metadata {key} is missing", meta.path)
            continue
        vtype, item = header.types[key]
        if (vtype, item) != (rule.vtype, rule.item):
            raise ModelFileError(f"metadata {key} must be of type {_type_name(rule.vtype, rule.item)}, got "
                                 f"{_type_name(vtype, item)}", meta.path)
        if rule.check is not None and (problem := rule.check(header.metadata[key], meta)) is not None:
            shown = repr(header.metadata[key])[:60]
            raise ModelFileError(f"metadata {key} = {shown} {problem}", meta.path)


def _type_name(vtype: GGUFValueType, item: GGUFValueType | None) -> str:
    return f"array of {item.name.lower()}" if vtype == V.ARRAY and item is not None else vtype.name.lower()


def check_tensors(meta: ModelMetadata, expected: set[str]) -> None:
    """Exactly the `expected` tensors, each in a type llama.cpp runs for its kind."""
    for name, info in meta.tensors.items():
        if name not in expected:
            raise ModelFileError(f"unexpected tensor {name[:80]!r}: not part of a {meta.architecture} model", meta.path)
        allowed = NORM_TYPES if len(info.shape) == 1 else MATRIX_TYPES
        if info.type not in allowed:
            kinds = "a norm (F32 only)" if len(info.shape) == 1 else "a weight matrix"
            raise ModelFileError(f"tensor {name} is stored as {info.type.name}, which llama.cpp cannot run for "
                                 f"{kinds}", meta.path)


def check_vocabulary(meta: ModelMetadata) -> None:
    """Every token non-empty, valid UTF-8 and unique; known token types; Qwen3's added tokens where they belong; every
    merge joins two tokens into a third; special-token ids naming control tokens."""
    values = meta.header.metadata
    tokens, types, merges = (values[k] for k in (Keys.Tokenizer.LIST, Keys.Tokenizer.TOKEN_TYPE, Keys.Tokenizer.MERGES))
    first_added, n_added = ENDOFTEXT_ID, len(ADDED_TOKENS)
    if meta.n_vocab < first_added + n_added:
        raise ModelFileError(f"the vocabulary has {meta.n_vocab} tokens; Qwen3's has {first_added + n_added} or more",
                             meta.path)
    kinds = _read_int32s(meta, types)
    # Decoding 300k strings takes ~0.2 s: a vocabulary that passed once (every GGUF of this model has the same one)
    # is remembered by the hash of its bytes.
    key = _arrays_hash(meta, (tokens, types, merges))
    if key is None or verdicts.recall("vocabulary", key) is None:
        _check_texts(meta, tokens, kinds, merges)
        if key is not None:
            verdicts.remember("vocabulary", key, ok=True)
    for key_name in SPECIAL_TOKEN_KEYS:
        token_id = values.get(key_name)
        if token_id is not None and kinds[token_id] != TokenType.CONTROL:
            raise ModelFileError(f"metadata {key_name} = {token_id} names a token of type {int(kinds[token_id])}, not "
                                 "a control token", meta.path)
    scores = values.get(Keys.Tokenizer.SCORES)
    if scores is not None and _length(scores) != meta.n_vocab:
        raise ModelFileError(f"tokenizer.ggml.scores has {_length(scores)} entries for {meta.n_vocab} tokens",
                             meta.path)


def _check_texts(meta: ModelMetadata, tokens: ArrayInfo | list[str], kinds: np.ndarray,
                 merges: ArrayInfo | list[str]) -> None:
    # Compared as bytes (equal bytes, equal texts for valid UTF-8): decoding 300k strings one by one is the slow part.
    first_added, n_added = ENDOFTEXT_ID, len(ADDED_TOKENS)
    texts = _read_raw_strings(meta, tokens, "token")
    seen = set(texts)
    if len(seen) != len(texts) or b"" in seen:
        first: dict[bytes, int] = {}  # one pass (list.index per token would be quadratic: 150k squared)
        bad = next(i for i, text in enumerate(texts) if not text or first.setdefault(text, i) != i)
        what = "empty" if not texts[bad] else f"a duplicate of another ({texts[bad][:40].decode()!r})"
        raise ModelFileError(f"token {bad} is {what}; llama.cpp needs every token text unique", meta.path)
    if np.any(kinds[:first_added] != TokenType.NORMAL):
        bad = int(np.argmax(kinds[:first_added] != TokenType.NORMAL))
        raise ModelFileError(f"token {bad} of the base vocabulary has type {int(kinds[bad])}, not NORMAL", meta.path)
    for offset, text in enumerate(ADDED_TOKENS):
        token_id = first_added + offset
        want = TokenType.USER_DEFINED if text in NOT_SPECIAL else TokenType.CONTROL
        if texts[token_id] != text.encode() or kinds[token_id] != want:
            raise ModelFileError(f"token {token_id} must be {text!r} of type {want.name}, got "
                                 f"{texts[token_id][:40].decode()!r} of type {int(kinds[token_id])}", meta.path)
    tail = kinds[first_added + n_added:]
    if np.any(tail != TokenType.UNUSED):
        bad = first_added + n_added + int(np.argmax(tail != TokenType.UNUSED))
        raise ModelFileError(f"token {bad} after the added tokens has type {int(kinds[bad])}, not UNUSED (padding)",
                             meta.path)
    merge_texts = _read_raw_strings(meta, merges, "merge")
    if not merge_texts:
        raise ModelFileError("tokenizer.ggml.merges is empty", meta.path)
    # llama.cpp splits a merge at its first space after the first character; a byte-level vocabulary has no literal
    # spaces, so that is the first space. BPE merges two tokens of the vocabulary into a third. (Set operations in C:
    # a Python loop over 150k merges is most of the check's time.)
    parts = [merge.partition(b" ") for merge in merge_texts]
    if not (all(space for _, space, _ in parts) and {left for left, _, _ in parts} <= seen
            and {right for _, _, right in parts} <= seen and {left + right for left, _, right in parts} <= seen):
        bad = next(i for i, (left, space, right) in enumerate(parts)
                   if not space or left not in seen or right not in seen or left + right not in seen)
        raise ModelFileError(f"merge {bad} ({merge_texts[bad][:40].decode()!r}) does not join two tokens of the "
                             "vocabulary into a third", meta.path)


def _arrays_hash(meta: ModelMetadata, arrays: tuple[ArrayInfo | list[Any], ...]) -> str | None:
    if not all(isinstance(a, ArrayInfo) for a in arrays):
        return None  # small arrays (not a real vocabulary): checked every time
    digest = hashlib.sha256(f"{VOCABULARY_CHECK_FORMAT} {meta.n_vocab}".encode())
    with _mapped(meta) as buf:
        for array in arrays:
            assert isinstance(array, ArrayInfo)
            digest.update(buf[array.offset:array.offset + array.size])
    return digest.hexdigest()


def _length(value: ArrayInfo | list[Any]) -> int:
    return value.count if isinstance(value, ArrayInfo) else len(value)


def _mapped(meta: ModelMetadata) -> mmap.mmap:
    try:
        with open(meta.path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file ({exc.strerror or exc})", meta.path) from None


def _read_raw_strings(meta: ModelMetadata, value: ArrayInfo | list[str], what: str) -> list[bytes]:
    """An array's strings as bytes, each valid UTF-8 (bounds were checked by the header reader)."""
    if isinstance(value, list):
        return [text.encode() for text in value]
    out: list[bytes] = []
    append, length_at = out.append, struct.Struct("<Q").unpack_from
    with _mapped(meta) as buf:
        pos = value.offset
        for _ in range(value.count):
            length = length_at(buf, pos)[0]
            append(buf[pos + 8:pos + 8 + length])
            pos += 8 + length
    try:  # all at once: a newline between them keeps a broken sequence from pairing with the next string
        b"\n".join(out).decode("utf-8")
    except UnicodeDecodeError:
        bad = next(i for i, raw in enumerate(out) if not _is_utf8(raw))
        raise ModelFileError(f"{what} {bad} is not valid UTF-8", meta.path) from None
    return out


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_int32s(meta: ModelMetadata, value: ArrayInfo | list[int]) -> np.ndarray:
    if isinstance(value, list):
        return np.asarray(value, dtype=np.int64)
    with _mapped(meta) as buf:
        return np.frombuffer(buf, dtype="<i4", count=value.count, offset=value.offset).astype(np.int64)
