"""Defence in depth: load a GGUF once in a child process (and generate a token) before the user's process loads it.

The static checks (gguf_header, metadata, modelcheck, loadcheck) close every abort we found in llama.cpp's loader,
vocabulary and graph code, but llama.cpp will always have asserts nobody anticipated, and an abort cannot be caught
in-process. So a file localqwen has not seen before is loaded first in a throwaway child with the caller's settings
(a small context), which evaluates a short chat prompt, checks that the logits are finite and samples one token. An
abort or crash there is a one-line ModelFileError naming the file; the user's process never loads it.

The verdict is remembered by the file's identity (resolved path, size, modification time, a hash of its header and
of sampled data blocks) with the llama.cpp version and the settings that choose llama.cpp's code paths, so a known
file loads as fast as before: the probe costs its child process once per file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from localqwen import verdicts
from localqwen.errors import ModelFileError
from localqwen.metadata import ModelMetadata

PROBE_FORMAT = 1  # part of the verdict key: bump when what the child does changes
PROBE_CTX = 512  # context (and batch) for the probe: enough for its prompt, small enough to cost little memory
PROBE_TIMEOUT_S = 600.0  # loading a large model from a cold disk on a slow machine; tiny models take a second
HEADER_HASH_CAP = 32 << 20  # bytes of the header hashed (the 4B's header with its vocabulary is ~6 MB)
SAMPLES, SAMPLE_BYTES = 16, 64 << 10  # data blocks hashed: a changed tensor anywhere is likely to show
EVAL_TOKENS = 4  # of the probe prompt evaluated (prefill on a 2-core CPU: ~36 tokens/s for the 4B)
# A chat turn in Qwen3's layout with non-ASCII text, as Model.chat sends it (special tokens parsed).
PROBE_PROMPT = "<|im_start|>user\nHello, wörld! 你好 👋 <tool_call>\n<|im_end|>\n<|im_start|>assistant\n<think>\n"
ERROR_LINE = re.compile(r"GGML_ASSERT|GGML_ABORT|fatal error|what\(\)|error", re.IGNORECASE)


def ensure_loadable(meta: ModelMetadata, *, gpu_layers: int, n_seq_max: int, flash_attn: bool, kv_type: int,
                    n_threads: int) -> None:
    """Raise ModelFileError unless llama.cpp loads `meta.path` with these settings (Model.load's; the context is
    PROBE_CTX cells per sequence) and samples a token, in a child process. Remembered per file."""
    # One small context whatever the caller's, so that another --ctx does not make a known file new again: what
    # llama.cpp asserts on depends on the file and the code paths (GPU layers, slots, flash attention, KV types).
    settings = {"gpu_layers": gpu_layers, "n_seq_max": n_seq_max, "flash_attn": flash_attn, "kv_type": kv_type,
                "n_threads": n_threads}
    key = _identity(meta, settings)
    verdict = verdicts.recall("load", key)
    if verdict is None:
        error, definite = _probe(meta.path, settings)
        if definite:
            verdicts.remember("load", key, ok=error is None, error=error or "")
    else:
        error = None if verdict["ok"] else verdict["error"]
    if error is not None:
        raise ModelFileError(error, meta.path)


def _identity(meta: ModelMetadata, settings: dict[str, Any]) -> str:
    """The file (where, how big, when changed, and hashes of its bytes), llama.cpp's version and the settings."""
    import llama_cpp

    path = meta.path.resolve()
    stat = path.stat()
    digest = hashlib.sha256()
    chosen = {k: v for k, v in settings.items() if k != "n_threads"}  # threads never change what llama.cpp runs
    digest.update(json.dumps([PROBE_FORMAT, llama_cpp.__version__, str(path), stat.st_size, stat.st_mtime_ns,
                              sorted(chosen.items())]).encode())
    try:
        with open(path, "rb") as f:
            digest.update(f.read(min(meta.header.data_offset, HEADER_HASH_CAP)))
            data = stat.st_size - meta.header.data_offset
            for i in range(SAMPLES):
                f.seek(meta.header.data_offset + data * i // SAMPLES)
                digest.update(f.read(SAMPLE_BYTES))
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file ({exc.strerror or exc})", meta.path) from None
    return digest.hexdigest()


def _probe(path: Path, settings: dict[str, Any]) -> tuple[str | None, bool]:
    """(None or the reason to refuse the file, whether the outcome is definite enough to remember)."""
    cmd = [sys.executable, "-m", "localqwen.probe", str(path), json.dumps(settings)]
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # no gdb attaching to the aborting child
    try:
        result = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace",
                                timeout=PROBE_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"llama.cpp did not finish loading the model within {PROBE_TIMEOUT_S:g} s (probe)", False
    if result.returncode == 0:
        return None, True
    said = result.stdout.strip().splitlines()
    if result.returncode in (2, 3) and said:
        return "".join(ch if ch.isprintable() else "?" for ch in said[-1]), True
    if result.returncode == -signal.SIGKILL:
        return "llama.cpp was killed while loading the model in the probe (SIGKILL: out of memory?)", False
    clues = [line for line in result.stderr.splitlines() if ERROR_LINE.search(line)]
    detail = re.sub(r"^\S*/", "", clues[-1].strip())[:160] if clues else "no message"
    detail = "".join(ch if ch.isprintable() else "?" for ch in detail)
    if result.returncode < 0:  # a crash is a property of the file: remembered
        try:
            name = signal.Signals(-result.returncode).name
        except ValueError:
            name = f"signal {-result.returncode}"
        return f"crashes llama.cpp ({name}: {detail}) when loaded: refusing to load it", True
    # Any other exit is a Python error in the probe itself (out of memory, say), not llama.cpp crashing on the file:
    # inconclusive. The static checks passed, so the load goes ahead (and the probe runs again next time).
    return None, False


def _child(path: str, settings: dict[str, Any]) -> int:
    """What Model.load and a first generation do with llama.cpp, in miniature."""
    import llama_cpp
    import numpy as np

    from localqwen.backend import Vocab, load_model, new_context

    n_seq = settings["n_seq_max"]
    try:
        model = load_model(path, gpu_layers=settings["gpu_layers"])
        context = new_context(model, n_ctx=PROBE_CTX * n_seq, n_batch=PROBE_CTX, n_ubatch=PROBE_CTX, n_seq_max=n_seq,
                              flash_attn=settings["flash_attn"], kv_type=settings["kv_type"],
                              n_threads=settings["n_threads"])
    except (ValueError, RuntimeError) as exc:
        print(f"llama.cpp could not load the model ({exc})")
        return 2
    vocab = Vocab(model)
    for token in range(vocab.n_vocab):  # as Model reads them: every token's attributes, special texts
        if vocab.attributes(token) & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED):
            vocab.piece(token, special=True)
    tokens = vocab.tokenize(PROBE_PROMPT.encode(), special=True)[-EVAL_TOKENS:]  # any batch runs the whole graph
    batch = llama_cpp.llama_batch_init(PROBE_CTX, 0, 1)
    for i, token in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = token, i, 1, 0, False
    batch.n_tokens, batch.logits[len(tokens) - 1] = len(tokens), True
    if (status := llama_cpp.llama_decode(context.ctx, batch)) != 0:
        print(f"llama.cpp could not evaluate a prompt with the model (llama_decode: {status})")
        return 2
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context.ctx, len(tokens) - 1), (vocab.n_vocab,))
    if not np.isfinite(logits).all():
        print("the model's output is not finite numbers (NaN or infinite weights?)")
        return 3
    # The model card's sampling, as a chain of llama.cpp's own samplers (what any generation runs through).
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for part in (llama_cpp.llama_sampler_init_top_k(20), llama_cpp.llama_sampler_init_top_p(0.95, 1),
                 llama_cpp.llama_sampler_init_min_p(0.0, 1), llama_cpp.llama_sampler_init_temp(0.6),
                 llama_cpp.llama_sampler_init_dist(0)):
        llama_cpp.llama_sampler_chain_add(chain, part)
    vocab.piece(llama_cpp.llama_sampler_sample(chain, context.ctx, len(tokens) - 1))
    llama_cpp.llama_sampler_free(chain)
    llama_cpp.llama_batch_free(batch)
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(encoding="utf-8")  # type: ignore[union-attr]  # what the parent reads, whatever the locale
    sys.exit(_child(sys.argv[1], json.loads(sys.argv[2])))
