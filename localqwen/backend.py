"""What the installed llama.cpp can do, and the one place that creates llama_cpp.Llama objects."""

from __future__ import annotations

import contextlib
import functools
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
