"""What the installed llama.cpp can do, and the one place that creates llama_cpp.Llama objects."""

from __future__ import annotations

import contextlib
import ctypes
import functools
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


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


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
