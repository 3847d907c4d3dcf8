"""What the installed llama.cpp can do, and the one place that creates llama_cpp.Llama objects."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_params_lock = threading.Lock()


@functools.cache
def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace")


def backend_names() -> list[str]:
    """The ggml backends compiled into the installed llama.cpp, e.g. ["CPU"], ["CUDA", "CPU"], ["MTL", "CPU"]."""
    return [part.split(":")[0].strip() for part in system_info().split("|")
            if ":" in part and "=" not in part.split(":")[0]]


# ggml_backend_dev_type (ggml-backend.h): the device kinds llama.cpp offloads layers to.
GGML_DEVICE_GPU, GGML_DEVICE_IGPU = 1, 2


@functools.cache
def ggml_devices() -> tuple[tuple[str, int], ...]:
    """Every device ggml registered in the installed llama.cpp: (name, ggml_backend_dev_type), e.g. ("CPU", 0),
    ("CUDA0", 1). llama-cpp-python binds none of ggml's device API, so it is read from libggml directly."""
    import llama_cpp.llama_cpp as native  # loads libllama, which registers ggml's backends
    from llama_cpp._ctypes_extensions import load_shared_library

    ggml = load_shared_library("ggml", native._base_path)
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.argtypes, ggml.ggml_backend_dev_get.restype = [ctypes.c_size_t], ctypes.c_void_p
    for name, restype in (("ggml_backend_dev_type", ctypes.c_int), ("ggml_backend_dev_name", ctypes.c_char_p)):
        getattr(ggml, name).argtypes, getattr(ggml, name).restype = [ctypes.c_void_p], restype
    devices = [ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())]
    return tuple((ggml.ggml_backend_dev_name(d).decode(errors="replace"), ggml.ggml_backend_dev_type(d))
                 for d in devices)


def gpu_devices() -> tuple[str, ...]:
    """The GPUs llama.cpp can offload layers to ("CUDA0", "Metal", ...): ggml's devices of type GPU or integrated
    GPU. Not llama_supports_gpu_offload(): that is also true when only the RPC backend is compiled in, with no GPU
    at all."""
    return tuple(name for name, kind in ggml_devices() if kind in (GGML_DEVICE_GPU, GGML_DEVICE_IGPU))


def gpu_offload_supported() -> bool:
    return bool(gpu_devices())


def amx_repacking() -> bool:
    """llama.cpp's AMX matmul segfaults on some Sapphire Rapids hosts (ggml-org/llama.cpp#20824, unfixed); laptops
    have no AMX. Where it is compiled in, weights are kept out of the AMX buffer type."""
    return "AMX_INT8 = 1" in system_info()


@functools.cache
def repacked_types() -> frozenset[int]:
    """The ggml types whose matmul weights llama.cpp copies into a CPU extra buffer type on this machine, as
    ggml-cpu/repack.cpp chooses them (the planner counts a tied output there as a second copy of token_embd)."""
    from gguf import GGMLQuantizationType as T

    info = system_info()
    if amx_repacking() or "REPACK = 1" not in info:  # open_llama turns extra buffer types off on AMX hosts
        return frozenset()
    types: set[int] = set()
    if "AVX2 = 1" in info:
        types |= {T.Q4_0, T.Q4_K, T.IQ4_NL}
    if "AVX512 = 1" in info:
        types.add(T.Q2_K)
    if "NEON = 1" in info and ("DOTPROD = 1" in info or "MATMUL_INT8 = 1" in info):
        types |= {T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.Q8_0}
    return frozenset(int(t) for t in types)


class CancelFlag:
    """A cancel flag that llama.cpp itself reads between graph nodes, so a long prompt evaluation stops too.

    llama.cpp polls its abort callback thousands of times per batch. A Python callback would take the GIL each
    time and wait behind any busy Python thread (prompt evaluation ran 27% slower beside one). The callback is
    libc's strlen over a two-byte buffer instead: 0 (go on) while the buffer is empty, 1 (abort) once set() writes
    its first byte. No Python runs, and the bool ABI reads 0 or 1 the same on x86-64 and arm64.
    """

    def __init__(self, ctx: Any) -> None:
        import llama_cpp

        libc = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)
        self._buffer = ctypes.create_string_buffer(2)
        self._callback = llama_cpp.ggml_abort_callback(ctypes.cast(libc.strlen, ctypes.c_void_p).value)
        llama_cpp.llama_set_abort_callback(ctx, self._callback, ctypes.addressof(self._buffer))

    def set(self) -> None:
        self._buffer[0] = b"\x01"

    def clear(self) -> None:
        self._buffer[0] = b"\x00"

    def is_set(self) -> bool:
        return self._buffer[0] != b"\x00"


@contextlib.contextmanager
def _model_params(**overrides: Any) -> Iterator[None]:
    # llama_cpp.Llama exposes no argument for some llama_model_params fields; it reads the defaults from this
    # function while loading, so the overrides are applied there, under a lock, for the duration of one load.
    import llama_cpp.llama_cpp as lc

    original = lc.llama_model_default_params

    def patched() -> Any:
        params = original()
        for name, value in overrides.items():
            setattr(params, name, value)
        return params

    with _params_lock:
        lc.llama_model_default_params = patched
        try:
            yield
        finally:
            lc.llama_model_default_params = original


def open_llama(path: Path | str, **kwargs: Any) -> Any:
    """llama_cpp.Llama(model_path=path, verbose=False, **kwargs), safe on every CPU this runs on."""
    import llama_cpp

    overrides = {"use_extra_bufts": False} if amx_repacking() else {}
    with _model_params(**overrides):
        return llama_cpp.Llama(model_path=str(path), **{"verbose": False, **kwargs})


LLAMA_LOG = collections.deque(maxlen=50)  # llama.cpp's last log lines (errors name them), never printed
GGML_LOG_ERROR = 4  # ggml.h's levels: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


@functools.cache
def log_callback() -> Any:
    """llama.cpp's log, kept in LLAMA_LOG instead of stderr: llama-cpp-python's own callback reads ggml's log levels
    in an older order and prints warnings (a cancelled batch's, say) into the user's terminal."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        LLAMA_LOG.append((level, text.decode("utf-8", "replace")))

    return keep


def quiet_llama_log() -> None:
    import llama_cpp

    llama_cpp.llama_log_set(log_callback(), ctypes.c_void_p(0))


_quiet_once = functools.cache(quiet_llama_log)  # installed at the first load; later callers may set their own


def last_error() -> str:
    """The last error llama.cpp logged (for a one-line message), or ""."""
    return next((text.strip() for level, text in reversed(LLAMA_LOG) if level == GGML_LOG_ERROR), "")


def load_model(path: Path | str, *, gpu_layers: int, **overrides: Any) -> Any:
    """llama.cpp's model (llama-cpp-python's LlamaModel wrapper, which frees it), safe on every CPU this runs on.
    `overrides`: other llama_model_params fields (use_mmap=False, ...)."""
    import llama_cpp
    from llama_cpp import _internals

    _quiet_once()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = gpu_layers
    if amx_repacking():
        params.use_extra_bufts = False
    for name, value in overrides.items():
        setattr(params, name, value)
    return _internals.LlamaModel(path_model=str(path), params=params, verbose=False)


def new_context(model: Any, *, n_ctx: int, n_batch: int, n_ubatch: int, n_seq_max: int, flash_attn: bool,
                kv_type: int, n_threads: int, **overrides: Any) -> Any:
    """A llama.cpp context for `n_seq_max` sequences sharing one (unified) KV cache of `n_ctx` cells.

    Batches never ask for more than one output (logits row) per sequence, so n_outputs_max = n_seq_max: the
    output head's compute buffer is sized for that, not for a whole batch of logits (~300 MB for this model).
    """
    import llama_cpp
    from llama_cpp import _internals

    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_ubatch
    params.n_seq_max, params.kv_unified, params.n_outputs_max = n_seq_max, True, n_seq_max
    params.n_threads, params.n_threads_batch = n_threads, max(n_threads, os.cpu_count() or 1)
    params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    params.type_k = params.type_v = kv_type
    for name, value in overrides.items():  # other llama_context_params fields (op_offload=False, ...)
        setattr(params, name, value)
    return _internals.LlamaContext(model=model, params=params, verbose=False)


class Vocab:
    """Tokenization with llama.cpp's own vocabulary (thread-safe: it only reads the vocabulary)."""

    def __init__(self, model: Any) -> None:
        import llama_cpp

        self._lib, self.handle = llama_cpp, model.vocab  # handle: the llama_vocab pointer (grammars need it)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)

    def tokenize(self, text: bytes, *, special: bool) -> list[int]:
        capacity = len(text) + 8  # byte-level BPE makes at most one token per byte
        while True:
            tokens = (self._lib.llama_token * capacity)()
            n = self._lib.llama_tokenize(self.handle, text, len(text), tokens, capacity, False, special)
            if n >= 0:
                return list(tokens[:n])
            capacity = -n

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (control tokens are empty unless `special`)."""
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = self._lib.llama_token_to_piece(self.handle, token, buffer, size, 0, special)
            if n >= 0:
                return buffer.raw[:n]
            size = -n

    def detokenize(self, tokens: list[int], *, special: bool = False) -> bytes:
        return b"".join(self.piece(t, special=special) for t in tokens)

    def attributes(self, token: int) -> int:
        return self._lib.llama_vocab_get_attr(self.handle, token)
