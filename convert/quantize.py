"""K-quants and friends through llama.cpp's own quantizer (llama_model_quantize), in a child process.

A child process because the C call cannot be interrupted: Ctrl+C kills the child at once and the caller
removes the partial file. The child reports llama.cpp's per-tensor log lines ("[  12/ 398] ...") to the parent
as progress.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf

from localqwen.errors import LocalqwenError

# The quantized types that make sense for this model, by their llama.cpp names.
QUANT_TYPES: dict[str, gguf.LlamaFileType] = {
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q5_k_s": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q4_k_s": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "iq4_nl": gguf.LlamaFileType.MOSTLY_IQ4_NL,
    "q3_k_m": gguf.LlamaFileType.MOSTLY_Q3_K_M,
}
TENSOR_LINE = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")


def quantize(source: Path, dest: Path, quant: str, on_progress: Callable[[int, int], None] | None = None) -> None:
    """Quantize the GGUF `source` into `dest`; on_progress(done_tensors, total_tensors) as llama.cpp goes."""
    cmd = [sys.executable, "-m", "localqwen.convert.quantize", str(source), str(dest), str(int(QUANT_TYPES[quant]))]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if on_progress and (match := TENSOR_LINE.search(line)):
                on_progress(int(match[1]), int(match[2]))
        stderr = child.stderr.read() if child.stderr else ""
        if child.wait() != 0:
            detail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {child.returncode}"
            raise LocalqwenError(f"llama.cpp could not quantize to {quant}: {detail}", source)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _child(source: str, dest: str, ftype: int) -> int:
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def forward_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        if TENSOR_LINE.search(line):
            print(line.strip(), flush=True)

    llama_cpp.llama_log_set(forward_log, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(source.encode(), dest.encode(), ctypes.byref(params)) != 0:
        print("llama_model_quantize failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2], int(sys.argv[3])))
