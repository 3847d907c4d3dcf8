"""Hostile checkpoint folders by class: named damages to a good tiny checkpoint, each either refused or really fine.

A case copies the good folder (shards hard-linked; a damaged file is always replaced, never edited in place) and
damages it in one way. Classes:

    special_files  a FIFO, device, folder or symlink to one where a file belongs (must not block or read forever)
    sizes          files and safetensors headers beyond their caps, sparse giants, huge indexes
    json           nesting, duplicate keys, NaN/Infinity, giant numbers, lone surrogates, encodings, wrong shapes
    hparams        config.json values out of range or of the wrong type (a layer count of 10**8 must not allocate)
    tokenizer      tokenizer.json / tokenizer_config.json / generation_config.json content gguf-py would trip on
    model_card     README.md front matter: aliases, nesting, wrong types, control characters, path tricks
    shards         safetensors headers: offsets, shapes, dtypes, extra and missing tensors
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tests.robustness import case_sample
from tests.robustness.case_sample import class_of, unique

CLASSES = ("special_files", "sizes", "json", "hparams", "tokenizer", "model_card", "shards")
Damage = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    name: str
    fine: bool
    damage: Damage

    @property
    def klass(self) -> str:
        return class_of(self)

    def make(self, pristine: Path, dest: Path) -> Path:
        shutil.copytree(pristine, dest, copy_function=os.link)
        self.damage(dest)
        return dest


def replace(path: Path, data: bytes | str) -> None:
    """Write `path` anew (breaking a hard link to the pristine copy)."""
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def edit_json(name: str, change: Callable[[Any], Any]) -> Damage:
    def damage(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        result = change(data)
        replace(folder / name, json.dumps(data if result is None else result))
    return damage


def set_key(name: str, key: str, value: Any) -> Damage:
    return edit_json(name, lambda d: d.__setitem__(key, value))


def raw(name: str, data: bytes | str) -> Damage:
    return lambda folder: replace(folder / name, data)


def fifo(name: str) -> Damage:
    def damage(folder: Path) -> None:
        if (folder / name).exists():
            (folder / name).unlink()
        os.mkfifo(folder / name)
    return damage


def symlink(name: str, target: str) -> Damage:
    def damage(folder: Path) -> None:
        if (folder / name).exists() or (folder / name).is_symlink():
            (folder / name).unlink()
        (folder / name).symlink_to(target)
    return damage


def directory(name: str) -> Damage:
    def damage(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()
    return damage


def sparse(name: str, size: int) -> Damage:
    def damage(folder: Path) -> None:
        replace(folder / name, b"{}")
        os.truncate(folder / name, size)
    return damage


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def edit_header(change: Callable[[dict], Any], length: Callable[[int, int], int] | None = None) -> Damage:
    """Rewrite the first shard's JSON header (and optionally its declared length: f(real length, file size))."""
    def damage(folder: Path) -> None:
        shard = first_shard(folder)
        data = shard.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        result = change(header)
        encoded = json.dumps(header if result is None else result).encode() if not isinstance(result, bytes) else result
        declared = len(encoded) if length is None else length(len(encoded), len(data))
        replace(shard, declared.to_bytes(8, "little") + encoded + data[8 + n:])
    return damage


def tensor_entry(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def special_file_cases() -> list[Case]:
    c = []
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "generation_config.json",
                 "chat_template.jinja", "model.safetensors.index.json", "merges.txt"):
        c.append(Case(f"special_files/fifo {name}", False, fifo(name)))
    c.append(Case("special_files/fifo shard", False, lambda f: fifo(first_shard(f).name)(f)))
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        c.append(Case(f"special_files/dir {name}", False, directory(name)))
    c.append(Case("special_files/dir shard", False, lambda f: directory(first_shard(f).name)(f)))
    for name, target in (("tokenizer.json", "/dev/zero"), ("config.json", "/dev/urandom"), ("README.md", "/dev/zero"),
                         ("tokenizer_config.json", "/dev/null"), ("config.json", "/nonexistent/dangling"),
                         ("generation_config.json", "/dev/zero")):
        c.append(Case(f"special_files/{name} -> {target}", False, symlink(name, target)))
    c.append(Case("special_files/shard -> /dev/zero", False, lambda f: symlink(first_shard(f).name, "/dev/zero")(f)))

    def linked_elsewhere(folder: Path) -> None:  # as the Hugging Face cache lays a snapshot out: a fine folder
        blobs = folder.parent / f"{folder.name}-blobs"
        blobs.mkdir()
        shutil.copy(folder / "config.json", blobs / "config")
        symlink("config.json", str(blobs / "config"))(folder)
    c.append(Case("special_files/config symlinked to a blob", True, linked_elsewhere))

    def fifo_template(folder: Path) -> None:
        (folder / "additional_chat_templates").mkdir()
        os.mkfifo(folder / "additional_chat_templates" / "tool_use.jinja")
    c.append(Case("special_files/fifo additional template", False, fifo_template))
    return c


def size_cases() -> list[Case]:
    return [
        Case("sizes/config 2MB", False, edit_json("config.json", lambda d: d.__setitem__("pad", "x" * (2 << 20)))),
        Case("sizes/tokenizer_config 20MB", False, sparse("tokenizer_config.json", 20 << 20)),
        Case("sizes/tokenizer 70MB", False, sparse("tokenizer.json", 70 << 20)),
        Case("sizes/README 2MB", False, raw("README.md", "---\nlicense: x\n---\n" + "x" * (2 << 20))),
        Case("sizes/index 20MB", False, sparse("model.safetensors.index.json", 20 << 20)),
        Case("sizes/chat_template.jinja 300kB", False, raw("chat_template.jinja", "{# " + "x" * (300 << 10) + " #}")),
        Case("sizes/index of 100k entries", False, edit_json("model.safetensors.index.json", lambda d: d[
            "weight_map"].update({f"model.extra.{i}": "x.safetensors" for i in range(100_000)}))),
        Case("sizes/header length 2**63", False, edit_header(lambda h: None, lambda n, size: 2**63)),
        Case("sizes/header length 0", False, edit_header(lambda h: None, lambda n, size: 0)),
        Case("sizes/header length past the end", False, edit_header(lambda h: None, lambda n, size: size)),
        Case("sizes/header of 150MB", False, _sparse_header(150_000_000)),
    ]


def _sparse_header(length: int) -> Damage:
    def damage(folder: Path) -> None:
        shard = first_shard(folder)
        replace(shard, length.to_bytes(8, "little") + b"{")
        os.truncate(shard, length + 1024)
    return damage


NESTED = "[" * 100_000 + "]" * 100_000


def json_cases() -> list[Case]:
    c = []
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json",
                 "generation_config.json"):
        for what, text in (("deep nesting", NESTED), ("duplicate keys", '{"a": 1, "a": 2}'), ("NaN", '{"a": NaN}'),
                           ("Infinity", '{"a": -Infinity}'), ("1e999", '{"a": 1e999}'),
                           ("100k digits", '{"a": ' + "9" * 100_000 + "}"), ("lone surrogate", '{"a": "\\ud800"}'),
                           ("BOM", '\ufeff{"a": 1}'), ("invalid UTF-8", b'{"a": "\xff\xfe"}'),
                           ("trailing garbage", '{"a": 1} x'), ("empty", ""), ("array", "[1, 2]")):
            c.append(Case(f"json/{name}: {what}", False, raw(name, text)))
    c.append(Case("json/surrogate in a vocabulary token", False, _vocab_token("\ud800")))
    c.append(Case("json/emoji escapes are fine", True, edit_json("generation_config.json",
                                                                  lambda d: d.__setitem__("note", "🙂"))))
    return c


def _vocab_token(text: str) -> Damage:
    def damage(folder: Path) -> None:
        data = json.loads((folder / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        token = next(iter(vocab))
        vocab[text] = vocab.pop(token)
        replace(folder / "tokenizer.json", json.dumps(data))  # json.dumps escapes the surrogate as \\ud800
    return damage


def hparam_cases() -> list[Case]:
    c = []
    for key, value in (("num_hidden_layers", 10**8), ("hidden_size", 10**9), ("vocab_size", 10**12),
                       ("intermediate_size", 10**7), ("num_attention_heads", 0), ("num_key_value_heads", 3),
                       ("head_dim", 33), ("head_dim", 10**6), ("max_position_embeddings", 10**10),
                       ("rms_norm_eps", 0), ("rms_norm_eps", -1), ("rms_norm_eps", 1e9), ("rope_theta", 0),
                       ("rope_theta", 1e30), ("num_hidden_layers", True), ("num_hidden_layers", 2.0),
                       ("num_hidden_layers", "2"), ("tie_word_embeddings", "yes"),
                       ("architectures", ["LlamaForCausalLM"]), ("architectures", 5), ("_name_or_path", 5),
                       ("text_config", [])):
        c.append(Case(f"hparams/{key}={str(value)[:12]}", False, set_key("config.json", key, value)))
    c.append(Case("hparams/rope_parameters list", False, edit_json("config.json", lambda d: (
        d.pop("rope_theta"), d.__setitem__("rope_parameters", [5000000])))))

    def transformers5(d: dict) -> None:
        d["rope_parameters"] = {"rope_theta": d.pop("rope_theta"), "rope_type": "default"}
    c.append(Case("hparams/transformers 5 rope_parameters", True, edit_json("config.json", transformers5)))
    return c


def tokenizer_cases() -> list[Case]:
    tok, cfg, gen = "tokenizer.json", "tokenizer_config.json", "generation_config.json"

    def model(change: Callable[[dict], Any]) -> Damage:
        return edit_json(tok, lambda d: change(d["model"]))

    c = [
        Case("tokenizer/type WordPiece", False, model(lambda m: m.__setitem__("type", "WordPiece"))),
        Case("tokenizer/vocab as list", False, model(lambda m: m.__setitem__("vocab", list(m["vocab"])))),
        Case("tokenizer/vocab id -1", False, model(lambda m: m["vocab"].__setitem__("a", -1))),
        Case("tokenizer/vocab id string", False, model(lambda m: m["vocab"].__setitem__("a", "5"))),
        Case("tokenizer/vocab id 10**9", False, model(lambda m: m["vocab"].__setitem__("a", 10**9))),
        Case("tokenizer/vocab id true", False, model(lambda m: m["vocab"].__setitem__("a", True))),
        Case("tokenizer/merges as pairs (transformers 4.45)", True, model(lambda m: m.__setitem__(
            "merges", [merge.split(" ", 1) for merge in m["merges"]]))),
        Case("tokenizer/merges as pairs of ints", False, model(lambda m: m.__setitem__("merges", [[1, 2]]))),
        Case("tokenizer/merges ints", False, model(lambda m: m.__setitem__("merges", [1, 2]))),
        Case("tokenizer/merges empty", False, model(lambda m: m.__setitem__("merges", []))),
        Case("tokenizer/added token content 5", False, edit_json(tok, lambda d: d["added_tokens"][0].__setitem__(
            "content", 5))),
        Case("tokenizer/added token id -1", False, edit_json(tok, lambda d: d["added_tokens"][0].__setitem__(
            "id", -1))),
        Case("tokenizer/added token special 'yes'", False, edit_json(tok, lambda d: d["added_tokens"][0].__setitem__(
            "special", "yes"))),
        Case("tokenizer/added_tokens not a list", False, set_key(tok, "added_tokens", {"a": 1})),
        Case("tokenizer/added token duplicates a base token", False, edit_json(tok, lambda d: d["added_tokens"][
            3].__setitem__("content", "a"))),
        Case("tokenizer/pre_tokenizer list", False, set_key(tok, "pre_tokenizer", [1])),
        Case("tokenizer/pre_tokenizer int", False, set_key(tok, "pre_tokenizer", 5)),
        Case("tokenizer/post_processor int", False, set_key(tok, "post_processor", 5)),
        Case("tokenizer/post_processor processors int", False, set_key(tok, "post_processor",
                                                                       {"type": "Sequence", "processors": 5})),
        Case("tokenizer/chat_template int", False, set_key(cfg, "chat_template", 5)),
        Case("tokenizer/chat_template list of ints", False, set_key(cfg, "chat_template", [1, 2])),
        Case("tokenizer/chat_template divides by zero", False, set_key(cfg, "chat_template", "{{ 1/0 }}")),
        Case("tokenizer/chat_template loops forever", False, set_key(
            cfg, "chat_template", "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}")),
        Case("tokenizer/chat_template missing", False, edit_json(cfg, lambda d: d.pop("chat_template"))),
        Case("tokenizer/bos_token int", True, set_key(cfg, "bos_token", 5)),
        Case("tokenizer/generation temperature 'hot'", False, set_key(gen, "temperature", "hot")),
        Case("tokenizer/generation temperature -1", False, set_key(gen, "temperature", -1)),
        Case("tokenizer/generation top_k 1.5", False, set_key(gen, "top_k", 1.5)),
        Case("tokenizer/generation top_k 2**40", False, set_key(gen, "top_k", 2**40)),
        Case("tokenizer/generation top_p 2", False, set_key(gen, "top_p", 2)),
        Case("tokenizer/generation repetition_penalty 'x'", False, set_key(gen, "repetition_penalty", "x")),
        Case("tokenizer/generation config missing", True, lambda f: (f / gen).unlink()),
        Case("tokenizer/generation min_p 0.1", True, set_key(gen, "min_p", 0.1)),
    ]
    return c


def model_card_cases() -> list[Case]:
    def card(front: str, body: str = "Hello\n") -> Damage:
        return raw("README.md", f"---\n{front}\n---\n{body}")

    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
    return [
        Case("model_card/billion laughs", False, card(laughs.rstrip("\n"))),
        Case("model_card/deep nesting", False, card("a: " + "[" * 1000 + "]" * 1000)),
        Case("model_card/tags as mapping", False, card("tags: {x: 1}")),
        Case("model_card/license 5", False, card("license: 5")),
        Case("model_card/base_model dicts", False, card("base_model: [{a: 1}]")),
        Case("model_card/name with a newline", False, card('model_name: "a\\nb"')),
        Case("model_card/name with an escape", False, card('model_name: "evil\\e[2J"')),
        Case("model_card/finetune path", False, card('finetune: "../../../../tmp/pwned"')),
        Case("model_card/version path", False, card('version: "x/../../y"')),
        Case("model_card/version date", False, card("version: 2024-01-01")),
        Case("model_card/invalid YAML", False, card("a: [unclosed")),
        Case("model_card/invalid UTF-8", False, raw("README.md", b"---\nlicense: \xff\n---\n")),
        Case("model_card/ordinary", True, card("license: apache-2.0\nlicense_link: https://example.org/LICENSE\n"
                                               "pipeline_tag: text-generation\nlibrary_name: transformers\n"
                                               "tags: [chat, qwen]\nwidget: [{text: hi}]")),
        Case("model_card/no front matter", True, raw("README.md", "# A model\n\nJust text.\n")),
    ]


def shard_cases() -> list[Case]:
    return [
        Case("shards/header array", False, edit_header(lambda h: [1, 2])),
        Case("shards/entry not an object", False, edit_header(lambda h: h.__setitem__(
            sorted(k for k in h if k != "__metadata__")[0], 5))),
        Case("shards/offsets reversed", False, edit_header(lambda h: tensor_entry(h).__setitem__(
            "data_offsets", tensor_entry(h)["data_offsets"][::-1]))),
        Case("shards/offsets negative", False, edit_header(lambda h: tensor_entry(h).__setitem__(
            "data_offsets", [-8, 0]))),
        Case("shards/offsets beyond the file", False, edit_header(lambda h: tensor_entry(h).__setitem__(
            "data_offsets", [2**40, 2**40 + 256]))),
        Case("shards/shape negative", False, edit_header(lambda h: tensor_entry(h).__setitem__("shape", [-1, 64]))),
        Case("shards/shape strings", False, edit_header(lambda h: tensor_entry(h).__setitem__("shape", ["64"]))),
        Case("shards/shape 9 dims", False, edit_header(lambda h: tensor_entry(h).__setitem__("shape", [1] * 9))),
        Case("shards/shape huge", False, edit_header(lambda h: tensor_entry(h).__setitem__("shape", [2**40, 2**40]))),
        Case("shards/dtype I32", False, edit_header(lambda h: tensor_entry(h).__setitem__("dtype", "I32"))),
        Case("shards/dtype 5", False, edit_header(lambda h: tensor_entry(h).__setitem__("dtype", 5))),
        Case("shards/extra tensor", False, edit_header(lambda h: h.__setitem__(
            "model.layers.0.mlp.extra.weight", dict(tensor_entry(h))))),
        Case("shards/missing tensor", False, edit_header(lambda h: h.pop(
            sorted(k for k in h if k != "__metadata__")[0]))),
        Case("shards/header not UTF-8", False, edit_header(lambda h: b'{"\xff": 1}')),
        Case("shards/header NaN", False, edit_header(lambda h: b'{"a": NaN}')),
        Case("shards/tensor name with a newline", False, edit_header(lambda h: h.__setitem__(
            "model.x\nError: forged", dict(tensor_entry(h))))),
        Case("shards/metadata entry", True, edit_header(lambda h: h.__setitem__("__metadata__", {"format": "pt"}))),
    ]


@cache
def cases() -> tuple[Case, ...]:
    all_cases = (special_file_cases() + size_cases() + json_cases() + hparam_cases() + tokenizer_cases()
                 + model_card_cases() + shard_cases())
    return unique(all_cases)


def sample(seed: int, per_class: int) -> list[Case]:
    """`per_class` cases of each class chosen by `seed`, including a fine one where the class has some."""
    return case_sample.sample(cases(), CLASSES, seed, per_class)
