"""Shared fixtures: synthetic Qwen3 checkpoints (real tokenizer, random weights) and the GGUFs made from them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from localqwen.convert import convert
from localqwen.synthetic import QwenShape, write_checkpoint

# Small, but every row length is a multiple of 256 so llama.cpp's K-quants really apply (QK_K = 256),
# and head_dim differs from hidden_size / heads as in the real model.
QUANT_SHAPE = QwenShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tests' own LOCALQWEN_HOME: they never read or write the user's store, chat history or prompt cache."""
    home = tmp_path_factory.mktemp("localqwen-home")
    before = os.environ.get("LOCALQWEN_HOME")
    os.environ["LOCALQWEN_HOME"] = str(home)
    yield home
    if before is None:
        del os.environ["LOCALQWEN_HOME"]
    else:
        os.environ["LOCALQWEN_HOME"] = before


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16 checkpoint in 3 shards with an index, like the real one."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "Qwen3-Tiny-Thinking", QUANT_SHAPE, seed=1, shards=3)


@pytest.fixture(scope="session")
def gguf_files(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One conversion run producing several types from one intermediate."""
    quants = ["f32", "bf16", "q8_0", "q4_k_m"]
    paths = convert(str(checkpoint), quants, outdir=tmp_path_factory.mktemp("gguf"), quiet=True)
    return dict(zip(quants, paths, strict=True))
