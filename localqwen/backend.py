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
