"""Reading the files of an untrusted checkpoint folder: only regular files, each size-capped, decoded strictly, and
parsed with limits on nesting and numbers, so no file can block, exhaust memory or end in a traceback.

A FIFO, device, folder or symlink to one where a file belongs is refused before it is opened (and opened
non-blocking, then checked again, in case it was swapped in between); a file over its cap is refused before it is
read. JSON is parsed with duplicate keys, NaN/Infinity, overlong numbers and lone surrogates refused, and nesting
bounded by Python's recursion limit. The README's front matter, which gguf-py reads for the model's name and
licence, is checked with YAML aliases refused and the values gguf-py copies into the GGUF typed. gguf-py re-reads
some of these files itself: `check_side_files` validates each one it may read before it does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from localqwen.errors import BadRequest, CheckpointError
from localqwen.sampling import OPTION
from localqwen.template_check import MAX_TEMPLATE

KiB, MiB = 1 << 10, 1 << 20
# Caps far above the real files (Qwen3: config.json 0.7 kB, tokenizer.json 11 MB, tokenizer_config.json 10 kB,
# index 30 kB, README 20 kB), far below what could hurt.
CONFIG_LIMIT = 1 * MiB
TOKENIZER_LIMIT = 64 * MiB
TOKENIZER_CONFIG_LIMIT = 16 * MiB
INDEX_LIMIT = 16 * MiB
README_LIMIT = 1 * MiB
SAFETENSORS_HEADER_LIMIT = 100_000_000  # the safetensors format's own limit
MAX_NUMBER_DIGITS = 40
MAX_CARD_EVENTS, MAX_CARD_DEPTH = 100_000, 32
MAX_EXTRA_TEMPLATES = 16

# Model-card keys gguf-py copies into the GGUF (gguf.Metadata.apply_metadata_heuristic): strings, or lists of them.
CARD_STRINGS = ("name", "author", "version", "organization", "description", "finetune", "basename", "size_label",
                "url", "doi", "uuid", "repo_url", "model_name", "model_author", "model_version", "model_organization",
                "model_description", "model_finetune", "model_basename", "model_size_label", "model_url", "model_doi",
                "model_uuid", "model_repo_url", "model_creator", "model_type", "license", "license_name",
                "license_link")
CARD_LISTS = ("tags", "pipeline_tag", "languages", "language", "base_model", "base_models", "base_model_sources",
              "datasets", "dataset", "dataset_sources")
MULTILINE_CARD_STRINGS = ("description", "model_description")
# generation_config.json fields gguf-py (and the converter) copy into general.sampling.*: their types. Those that are
# localqwen's own options must also be in the option's range, as the GGUF check demands of the file they end up in.
GENERATION_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
                     "penalty_repeat": float, "penalty_last_n": int, "xtc_probability": float, "xtc_threshold": float,
                     "mirostat": int, "mirostat_tau": float, "mirostat_eta": float, "sequence": str}
INT32_MAX = 2**31 - 1
ESCAPED_SURROGATE = re.compile(r"\\u[dD][89abAB]", re.ASCII)


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is (or links to) a regular file; CheckpointError otherwise."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CheckpointError("is not a regular file (a folder, FIFO or device where a file belongs)", path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise CheckpointError("file not found", path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot open ({exc.strerror or exc})", path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else since the first look
        os.close(fd)
        raise CheckpointError("is not a regular file", path)
    return os.fdopen(fd, "rb")


def read_bytes(path: Path, limit: int) -> bytes:
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise CheckpointError(f"is {size} bytes, more than the {limit} allowed for this file", path)
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise CheckpointError(f"cannot read ({exc.strerror or exc})", path) from None
    if len(data) > limit:
        raise CheckpointError(f"is more than the {limit} bytes allowed for this file", path)
    return data


def read_text(path: Path, limit: int) -> str:
    try:
        return read_bytes(path, limit).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"is not valid UTF-8 (at byte {exc.start})", path) from None


class _Refused(ValueError):
    pass


def _pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in items:
        if key in out:
            raise _Refused(f"duplicate key {key[:60]!r}")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if len(text) > MAX_NUMBER_DIGITS * 2 or not math.isfinite(value):
        raise _Refused(f"number {text[:40]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:
        raise _Refused(f"number {text[:40]}... has more than {MAX_NUMBER_DIGITS} digits")
    return int(text)


def parse_json(text: str, path: Path) -> Any:
    """Strict JSON: no duplicate keys, NaN, Infinity, overlong numbers or lone surrogates; bounded nesting."""
    if text.startswith("\ufeff"):
        raise CheckpointError("not valid JSON (starts with a byte order mark)", path)
    try:
        value = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float,
                           parse_int=_int)
    except RecursionError:
        raise CheckpointError("not valid JSON (nested too deeply)", path) from None
    except ValueError as exc:  # JSONDecodeError and _Refused are ValueErrors
        raise CheckpointError(f"not valid JSON ({' '.join(str(exc).split())[:160]})", path) from None
    if ESCAPED_SURROGATE.search(text):  # "\ud83d\ude00" pairs are fine; a lone half cannot be written as UTF-8
        _check_encodable(value, path)
    return value


def _check_encodable(value: Any, path: Path) -> None:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending += list(item)
            pending += item.values()
        elif isinstance(item, list):
            pending += item
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise CheckpointError("not valid JSON text (a lone UTF-16 surrogate escape)", path) from None


def read_json(path: Path, limit: int = CONFIG_LIMIT) -> Any:
    return parse_json(read_text(path, limit), path)


def read_json_object(path: Path, limit: int = CONFIG_LIMIT) -> dict[str, Any]:
    value = read_json(path, limit)
    if not isinstance(value, dict):
        raise CheckpointError("must hold a JSON object", path)
    return value


def check_model_card(folder: Path) -> None:
    """README.md's YAML front matter, as gguf-py extracts it: no aliases, bounded size and depth, and the values gguf-py
    copies into the GGUF are printable strings (or lists of them)."""
    path = folder / "README.md"
    if not os.path.lexists(path):
        return
    lines = read_text(path, README_LIMIT).splitlines()
    if not lines or lines[0] != "---":
        return
    body = []
    for line in lines[1:]:
        if line == "---":
            break
        body.append(line)
    text = ("\n".join(body) + "\n").replace("- no\n", '- "no"\n').replace("\t", "  ")  # as gguf-py does
    try:
        depth = 0
        for count, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader)):
            if count > MAX_CARD_EVENTS or isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise CheckpointError("front matter uses YAML aliases or is too large", path)
            depth += isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
            depth -= isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent))
            if depth > MAX_CARD_DEPTH:
                raise CheckpointError("front matter is nested too deeply", path)
        card = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise CheckpointError(f"front matter is not valid YAML ({' '.join(str(exc).split())[:160]})", path) from None
    if not isinstance(card, dict):
        return  # gguf-py ignores it
    for key in CARD_STRINGS:
        if key in card and not _card_string(card[key], multiline=key in MULTILINE_CARD_STRINGS):
            raise CheckpointError(f"front matter {key!r} must be a line of text", path)
    for key in CARD_LISTS:
        value = card.get(key)
        if value is not None and not (_card_string(value) or isinstance(value, list)
                                      and all(_card_string(v) for v in value)):
            raise CheckpointError(f"front matter {key!r} must be text or a list of text", path)


def _card_string(value: Any, *, multiline: bool = False) -> bool:
    if not isinstance(value, str) or len(value) > 4096:
        return False
    return (value.replace("\n", " ").replace("\t", " ") if multiline else value).isprintable()


def generation_config(folder: Path) -> dict[str, Any]:
    """generation_config.json (or {} without one), its sampling fields typed and in range."""
    path = folder / "generation_config.json"
    if not os.path.lexists(path):
        return {}
    config = read_json_object(path)
    for field, kind in GENERATION_FIELDS.items():
        value = config.get(field)
        if value is None:
            continue
        if kind is str:
            fine = isinstance(value, str) and len(value) <= 4096
        elif kind is int:
            fine = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= INT32_MAX
        else:
            fine = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e6
        if fine and field in OPTION:
            try:
                OPTION[field].check(value)
            except BadRequest:
                fine = False
        if not fine:
            raise CheckpointError(f"{field} = {str(value)[:40]!r} is not a usable value", path)
    return config


def check_side_files(folder: Path, chat_template_limit: int = MAX_TEMPLATE) -> None:
    """Every other file the converter or gguf-py may read, if present: a regular file within its cap, strictly
    decoded (and parsed, for JSON)."""
    check_model_card(folder)
    generation_config(folder)
    if os.path.lexists(folder / "chat_template.json"):
        read_json_object(folder / "chat_template.json", chat_template_limit * 2)  # JSON escapes: room to spare
    if os.path.lexists(folder / "chat_template.jinja"):
        read_text(folder / "chat_template.jinja", chat_template_limit)
    if os.path.lexists(folder / "merges.txt"):
        read_text(folder / "merges.txt", TOKENIZER_LIMIT)
    extra = folder / "additional_chat_templates"
    if os.path.lexists(extra):
        if not extra.is_dir():
            raise CheckpointError("is not a folder", extra)
        templates = sorted(extra.glob("*.jinja"))
        if len(templates) > MAX_EXTRA_TEMPLATES:
            raise CheckpointError(f"holds more than {MAX_EXTRA_TEMPLATES} templates", extra)
        for template in templates:
            read_text(template, chat_template_limit)


@contextlib.contextmanager
def quiet_gguf() -> Iterator[None]:
    """gguf-py logs a warning for each field it ignores; with the files validated first, those are noise that would
    break the one-line error."""
    loggers = [logging.getLogger(name) for name in ("gguf", "metadata")]  # gguf-py's metadata module logs as "metadata"
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
