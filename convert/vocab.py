"""The tokenizer half of the GGUF metadata, read from tokenizer.json the way llama.cpp's converter writes it.

llama.cpp's converter loads the tokenizer through transformers; we read tokenizer.json directly (no torch, no
transformers) and apply the same rules: byte-level BPE tokens as stored, added tokens typed CONTROL when they
are special or look special (`<|...|>`), USER_DEFINED otherwise, and `[PAD{i}]` (UNUSED) up to vocab_size.
Merges, special token ids and the chat template come from gguf-py's SpecialVocab, exactly as upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from localqwen.errors import CheckpointError
from localqwen.template_check import check_template

from .checkpoint import Checkpoint
from .source_files import TOKENIZER_CONFIG_LIMIT, TOKENIZER_LIMIT, quiet_gguf, read_json_object

# The pre-tokenizer regex of Qwen2/Qwen3; llama.cpp implements it under the name "qwen2".
QWEN2_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PRE = "qwen2"


def looks_special(token: str) -> bool:
    """Added tokens that are control tokens in spirit even when tokenizer.json says special: false."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def pretokenizer_regexes(tokenizer: dict) -> list[str]:
    pre = tokenizer.get("pre_tokenizer") or {}
    if not isinstance(pre, dict):
        return []
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list):
        return []
    return [step["pattern"]["Regex"] for step in steps
            if isinstance(step, dict) and step.get("type") == "Split" and isinstance(step.get("pattern"), dict)
            and "Regex" in step["pattern"]]


def read_vocab(checkpoint: Checkpoint, tokenizer: Any) -> tuple[list[str], list[gguf.TokenType]]:
    path = checkpoint.folder / "tokenizer.json"
    model = tokenizer.get("model") if isinstance(tokenizer, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError("not a byte-level BPE tokenizer (expected Qwen's)", path)
    if pretokenizer_regexes(tokenizer) != [QWEN2_PRETOKENIZER_REGEX]:
        raise CheckpointError("pre-tokenizer differs from Qwen2/Qwen3's; llama.cpp would tokenize it wrongly", path)

    vocab_size = checkpoint.hparams.vocab_size
    by_id: dict[int, tuple[str, gguf.TokenType]] = {}
    for token, token_id in model["vocab"].items():
        if not token or not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab_size:
            raise CheckpointError(f"vocabulary entry {token[:40]!r}: {repr(token_id)[:20]} is not a token id under "
                                  f"vocab_size {vocab_size} of config.json", path)
        by_id[token_id] = (token, gguf.TokenType.NORMAL)
    added_tokens = tokenizer.get("added_tokens", [])
    if not isinstance(added_tokens, list):
        raise CheckpointError("added_tokens must be a list", path)
    for added in added_tokens:
        token = added.get("content") if isinstance(added, dict) else None
        token_id = added.get("id") if isinstance(added, dict) else None
        if (not isinstance(token, str) or not token or not isinstance(token_id, int) or isinstance(token_id, bool)
                or not 0 <= token_id < vocab_size or not isinstance(added.get("special", False), bool)):
            raise CheckpointError(f"added token {str(added)[:60]} is malformed or outside vocab_size {vocab_size}",
                                  path)
        special = added.get("special") or looks_special(token)
        by_id[token_id] = (token, gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    if not by_id:
        raise CheckpointError("holds no tokens", path)
    tokens, types = [], []
    for i in range(vocab_size):
        token, token_type = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(token)
        types.append(token_type)
    return tokens, types


def add_tokenizer(writer: gguf.GGUFWriter, checkpoint: Checkpoint) -> None:
    tokenizer_path = checkpoint.folder / "tokenizer.json"
    tokenizer = read_json_object(tokenizer_path, TOKENIZER_LIMIT)
    config_path = checkpoint.folder / "tokenizer_config.json"
    template = read_json_object(config_path, TOKENIZER_CONFIG_LIMIT).get("chat_template")  # gguf-py reads it next
    if template is not None and not (isinstance(template, str) or isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template)):
        raise CheckpointError("chat_template must be text or a list of named templates", config_path)
    tokens, types = read_vocab(checkpoint, tokenizer)
    if len(set(tokens)) != len(tokens):  # llama.cpp asserts every token text is unique
        raise CheckpointError("holds the same token text under two ids", tokenizer_path)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(QWEN2_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    try:
        special = _special_vocab(writer, checkpoint, tokenizer)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        # gguf-py trusts the layout of tokenizer.json and tokenizer_config.json; any surprise is a malformed file.
        raise CheckpointError(f"tokenizer files hold something gguf-py cannot use ({' '.join(str(exc).split())[:120]})",
                              tokenizer_path) from None
    template: Any = special.chat_template
    if isinstance(template, list):  # named templates: the default one is what localqwen renders
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    check_template(template if isinstance(template, str) else None, config_path)


def _special_vocab(writer: gguf.GGUFWriter, checkpoint: Checkpoint, tokenizer: dict) -> gguf.SpecialVocab:
    with quiet_gguf():
        special = gguf.SpecialVocab(Path(checkpoint.folder), load_merges=True)
    # llama.cpp's own gguf-py (newer than the 0.19.0 release) says a ByteLevel post-processor adds neither BOS nor
    # EOS, so its converter writes add_bos_token and add_eos_token = false; do the same.
    post = tokenizer.get("post_processor") or {}
    if any(p.get("type") == "ByteLevel" for p in post.get("processors", [post])):
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)
    if not special.merges or not all(isinstance(m, str) for m in special.merges):
        raise CheckpointError("holds no BPE merges (a list of strings)", checkpoint.folder / "tokenizer.json")
    if not special.chat_template:
        raise CheckpointError("holds no chat_template", checkpoint.folder / "tokenizer_config.json")
    special.add_to_gguf(writer, quiet=True)
    return special
