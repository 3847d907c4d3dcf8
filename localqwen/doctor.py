"""What this install can do (`localqwen doctor`): the backend, memory, store and hub settings, and a self-test.

The doctor's self-test needs no download: it writes a tiny Qwen3 checkpoint whose greedy output is known token by
token (a chain model, see synthetic.py), converts and quantizes it, loads it through llama.cpp and checks the
generated thinking and answer exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from localqwen.errors import LocalqwenError

SELF_TEST_QUANT = "q4_k_m"
# Each piece is one token of the Qwen3 vocabulary and none repeats: a chain model says each token once.
SELF_TEST_THINKING = ("The", " user", " says", " hello", ";", " reply", " kindly", ".")
SELF_TEST_ANSWER = ("Hello", "!", " This", " install", " works")
SELF_TEST_WIDTH = 256  # rows of 256: llama.cpp's K-quants apply for real (QK_K = 256), no fallback types


# --- doctor ------------------------------------------------------------------------------------------------------

def system_report() -> dict[str, Any]:
    """Backend, memory, store and hub settings: what a bug report needs (never a token, only whether one is set)."""
    from importlib import metadata

    import psutil
    from huggingface_hub import constants

    from localqwen.backend import backend_names, gpu_devices
    from localqwen.hub import offline
    from localqwen.paths import DEFAULT_MODEL_FILE, home, models_dir
    from localqwen.plan import available_memory
    from localqwen.store import list_models

    ram, vram = available_memory()
    # Whether huggingface_hub will send a token (HF_TOKEN, or one saved by `hf auth login`); never the token itself.
    token_set = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
                     or Path(constants.HF_TOKEN_PATH).is_file())
    existing = next(p for p in (home(), *home().parents) if p.exists())
    return {
        "versions": {name: metadata.version(name) for name in ("localqwen", "llama-cpp-python", "gguf",
                                                                "huggingface_hub")},
        "backend": {"names": backend_names(), "gpu_offload": bool(gpu_devices()), "gpu_devices": list(gpu_devices()),
                    "cpu_count": os.cpu_count()},
        "memory": {"total": psutil.virtual_memory().total, "available": ram, "free_vram": vram},
        "store": {"home": str(home()), "models": len(list_models()),
                  "default_model": (models_dir() / DEFAULT_MODEL_FILE).is_file(),
                  "free_disk": shutil.disk_usage(existing).free},
        "hub": {"endpoint": constants.ENDPOINT, "offline": offline(), "token_set": token_set,
                "cache": constants.HF_HUB_CACHE},
    }


def _chain_ids(pieces: tuple[str, ...]) -> list[int]:
    """Token ids of text pieces that are single tokens of the Qwen3 vocabulary (byte-level spelling)."""
    from localqwen.tokenizer_data import bytes_to_unicode, tokenizer_json

    vocab = json.loads(tokenizer_json())["model"]["vocab"]
    table = bytes_to_unicode()
    spelled = ["".join(table[b] for b in piece.encode()) for piece in pieces]
    missing = [piece for piece, s in zip(pieces, spelled, strict=True) if s not in vocab]
    if missing:
        raise LocalqwenError(f"the self-test's pieces {missing} are not single tokens of the vocabulary")
    return [vocab[s] for s in spelled]


def _self_test_steps(folder: Path, quant: str, steps: list[dict[str, Any]]) -> dict[str, str]:
    from localqwen.constants import IM_END_ID, THINK_CLOSE_ID
    from localqwen.convert import convert
    from localqwen.events import Reply
    from localqwen.gguf_header import read_header
    from localqwen.model import Model
    from localqwen.synthetic import DOUBLE_NEWLINE_ID, NEWLINE_ID, TINY, chain_weights, write_checkpoint

    def step(name: str, started: float, detail: str = "") -> None:
        steps.append({"step": name, "seconds": round(time.perf_counter() - started, 2), "detail": detail})

    started = time.perf_counter()
    chain = [NEWLINE_ID, *_chain_ids(SELF_TEST_THINKING), THINK_CLOSE_ID, DOUBLE_NEWLINE_ID,
             *_chain_ids(SELF_TEST_ANSWER), IM_END_ID]
    shape = replace(TINY, hidden_size=SELF_TEST_WIDTH, intermediate_size=SELF_TEST_WIDTH, tie_word_embeddings=False)
    source = write_checkpoint(folder / "Qwen3-SelfTest", shape, weights=chain_weights(shape, chain), shards=3)
    step("checkpoint", started, f"{len(chain)}-token chain model, 3 shards")

    started = time.perf_counter()
    [path] = convert(str(source), [quant], outdir=folder, quiet=True)
    kinds = sorted({t.type.name for t in read_header(path).tensors.values()})
    step("convert", started, f"{path.name}: {', '.join(kinds)}")

    started = time.perf_counter()
    model = Model.load(path, n_ctx=512)
    try:
        step("load", started, f"n_ctx {model.n_ctx}, {model.plan.gpu_layers} layers on the GPU")
        started = time.perf_counter()
        reply = Reply.collect(model.chat([{"role": "user", "content": "Hi"}], temperature=0.0, seed=0))
    finally:
        model.close()
    got = {"thinking": reply.thinking, "content": reply.content, "finish_reason": reply.stats.finish_reason}
    step("generate", started, f"{reply.stats.completion_tokens} tokens")
    return got


def self_test(quant: str = SELF_TEST_QUANT) -> dict[str, Any]:
    """Build, convert, quantize, load and run a tiny model; `ok` only if it said exactly what it was built to say."""
    expected = {"thinking": "".join(SELF_TEST_THINKING), "content": "".join(SELF_TEST_ANSWER), "finish_reason": "stop"}
    steps: list[dict[str, Any]] = []
    result: dict[str, Any] = {"ok": False, "quant": quant, "steps": steps, "expected": expected, "got": None,
                              "error": None}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="localqwen-doctor-") as tmp:
        try:
            result["got"] = _self_test_steps(Path(tmp), quant, steps)
        except Exception as exc:  # a doctor reports what broke instead of crashing on it
            result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    result["ok"] = result["error"] is None and result["got"] == expected
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result
