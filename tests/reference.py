"""An independent float64 numpy forward pass of Qwen3, the correctness reference for conversions.

It reads the safetensors files itself and shares no code with localqwen, gguf or llama.cpp: a bug there cannot
hide by being repeated here. Follows transformers' Qwen3 modeling: q/k RMS norms per head before NEOX-style RoPE.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        start, end = (8 + length + offset for offset in info["data_offsets"])
        raw = data[start:end]
        if info["dtype"] == "BF16":
            values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(raw, {"F16": "<f2", "F32": "<f4"}[info["dtype"]])
        out[name] = values.astype(np.float64).reshape(info["shape"])
    return out


def load_weights(checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """All tensors as float64, from the shards the index names or from model.safetensors."""
    index = checkpoint_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    weights: dict[str, np.ndarray] = {}
    for file in files:
        weights.update(_read_safetensors(checkpoint_dir / file))
    return weights


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """NEOX-style rotary embedding of x [n, heads, head_dim] at positions 0..n-1: dims i and i + head_dim/2 pair."""
    n, _, dim = x.shape
    inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(np.concatenate([angles, angles], axis=-1))[:, None, :]
    sin = np.sin(np.concatenate([angles, angles], axis=-1))[:, None, :]
    half = dim // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def forward(checkpoint_dir: Path, token_ids: list[int]) -> np.ndarray:
    """Logits [len(token_ids), vocab] (float64) of a causal pass over token_ids from position 0."""
    checkpoint_dir = Path(checkpoint_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    w = load_weights(checkpoint_dir)
    theta = float(config["rope_theta"] if "rope_theta" in config else config["rope_parameters"]["rope_theta"])
    eps, dim = float(config["rms_norm_eps"]), int(config["head_dim"])
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    n = len(token_ids)
    mask = np.triu(np.full((n, n), -np.inf), k=1)

    x = w["model.embed_tokens.weight"][np.asarray(token_ids)]
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        h = rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, heads, dim)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kv_heads, dim)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kv_heads, dim)
        q = rope(rmsnorm(q, w[p + "self_attn.q_norm.weight"], eps), theta)
        k = rope(rmsnorm(k, w[p + "self_attn.k_norm.weight"], eps), theta)
        # GQA: query head j reads kv head j // (heads / kv_heads).
        k, v = np.repeat(k, heads // kv_heads, axis=1), np.repeat(v, heads // kv_heads, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dim) + mask
        attn = np.einsum("hqk,khd->qhd", softmax(scores), v).reshape(n, heads * dim)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        mlp = silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ w[p + "mlp.down_proj.weight"].T
    x = rmsnorm(x, w["model.norm.weight"], eps)
    output = w["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ output.T
