"""Write an f32/f16/bf16 GGUF from a validated checkpoint, streaming tensor data through a memory map.

gguf-py's GGUFWriter lays the file out (header, key-values, tensor infos, aligned data). Each tensor reaches
it as a StreamedTensor that maps, converts and writes a bounded window of rows at a time, so peak memory stays
a few tens of MB whatever the model size (llama.cpp's converter holds whole tensors: 3.4 GB on the 4B model).
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np
from gguf.utility import LocalTensor

from localqwen.constants import GGUF_ARCH
from localqwen.errors import CheckpointError

from .checkpoint import SAFETENSORS_DTYPE_SIZES, Checkpoint
from .source_files import generation_config, quiet_gguf
from .vocab import add_tokenizer

# Output types gguf-py writes itself; everything else goes through llama.cpp's quantizer (quantize.py).
FLOAT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
SOURCE_NUMPY_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
CHUNK_BYTES = 64 << 20  # source bytes mapped and converted at a time

ProgressCallback = Callable[[int], None]  # called with the number of source bytes just written


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":  # bf16 is the top half of an f32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(SOURCE_NUMPY_TYPES[dtype]).astype(np.float32, copy=False)


@dataclass
class StreamedTensor:
    """Quacks like the ndarray GGUFWriter.write_tensor_data expects (nbytes, tofile) without being in memory."""

    source: LocalTensor
    target: gguf.GGMLQuantizationType
    on_progress: ProgressCallback | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.source.shape) * (4 if self.target == gguf.GGMLQuantizationType.F32 else 2)

    def tofile(self, fout: BinaryIO) -> None:
        src = self.source
        if src.dtype == self.target.name and self._kernel_copy(fout):
            return
        row_bytes = math.prod(src.shape[1:]) * SAFETENSORS_DTYPE_SIZES[src.dtype]
        rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
        for start in range(0, src.shape[0], rows_per_chunk):
            rows = min(rows_per_chunk, src.shape[0] - start)
            # A fresh map per window: it is unmapped when dropped, so its pages leave our RSS right away.
            window = np.memmap(src.data_range.filename, dtype=np.uint8, mode="r",
                               offset=src.data_range.offset + start * row_bytes, shape=(rows * row_bytes,))
            if src.dtype == self.target.name:
                fout.write(window.data)
            else:
                values = to_float32(window, src.dtype)
                if self.target != gguf.GGMLQuantizationType.F32:
                    values = gguf.quants.quantize(values, self.target)  # llama.cpp's own rounding (bf16: RNE)
                values.tofile(fout)
            del window
            if self.on_progress:
                self.on_progress(rows * row_bytes)

    def _kernel_copy(self, fout: BinaryIO) -> bool:
        """Same dtype in and out (bf16 -> bf16): let the kernel copy file to file, as `cp` does (3x faster than
        going through Python). False, having written nothing, where the OS or filesystem cannot (macOS)."""
        if not hasattr(os, "copy_file_range"):
            return False
        fout.flush()  # the buffered writer is empty, so its position is the descriptor's
        data = self.source.data_range
        with open(data.filename, "rb") as fin:
            offset, end = data.offset, data.offset + data.size
            while offset < end:
                try:
                    done = os.copy_file_range(fin.fileno(), fout.fileno(), min(CHUNK_BYTES, end - offset), offset)
                except OSError as exc:
                    if offset == data.offset and exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                                               errno.EOPNOTSUPP):
                        return False
                    raise
                if done == 0:
                    raise OSError(f"{data.filename} ended early")
                offset += done
                if self.on_progress:
                    self.on_progress(done)
        return True


def gguf_name(hf_name: str, name_map: gguf.TensorNameMap) -> str:
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:  # gguf-py returns None for names it cannot map: never skip a tensor silently
        raise CheckpointError(f"tensor {hf_name} has no GGUF name for {GGUF_ARCH}")
    return name


class FloatGGUF:
    """A GGUF about to be written: metadata and tensor infos set, data streamed by write()."""

    def __init__(self, checkpoint: Checkpoint, out_type: str) -> None:
        tensor_type, file_type = FLOAT_TYPES[out_type]
        hp = checkpoint.hparams
        self.writer = gguf.GGUFWriter(None, GGUF_ARCH)
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, hp.num_hidden_layers)
        self.tensors: list[StreamedTensor] = []
        for hf_name, source in checkpoint.tensors.items():
            # Norms and other 1-D tensors stay F32, as llama.cpp writes them.
            target = gguf.GGMLQuantizationType.F32 if len(source.shape) == 1 else tensor_type
            streamed = StreamedTensor(source, target)
            self.writer.add_tensor_info(gguf_name(hf_name, name_map), source.shape, np.dtype(np.uint16 if target in (
                gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F16) else np.float32), streamed.nbytes,
                raw_dtype=target)
            self.tensors.append(streamed)

        total, shared, expert, expert_count = self.writer.get_total_parameter_count()
        # gguf-py reads the model card, config.json and generation_config.json again; checkpoint.load_checkpoint
        # validated each of them first.
        with quiet_gguf():
            self.metadata = gguf.Metadata.load(None, checkpoint.folder, None, total)
        if self.metadata.name is None:
            self.metadata.name = checkpoint.folder.name
        self.folder = checkpoint.folder
        if not self.metadata.name.isprintable():  # shown by `localqwen info`: the GGUF check refuses control characters
            raise CheckpointError("the model's name (from README.md or the folder's name) holds control characters",
                                  checkpoint.folder)
        if self.metadata.sampling_penalty_repeat is None:
            # As llama.cpp's own gguf-py (newer than the 0.19.0 release) does: HF calls it repetition_penalty.
            self.metadata.sampling_penalty_repeat = generation_config(checkpoint.folder).get("repetition_penalty")
        if self.metadata.size_label is None and total > 0:
            self.metadata.size_label = gguf.size_label(total, shared, expert, expert_count)
        self.source_bytes = sum(t.source.data_range.size for t in self.tensors)
        self._add_metadata(checkpoint, file_type)

    def _add_metadata(self, checkpoint: Checkpoint, file_type: gguf.LlamaFileType) -> None:
        hp, w = checkpoint.hparams, self.writer
        w.add_type(gguf.GGUFType.MODEL)
        self.metadata.set_gguf_meta_model(w)
        w.add_block_count(hp.num_hidden_layers)
        w.add_context_length(hp.max_position_embeddings)
        w.add_embedding_length(hp.hidden_size)
        w.add_feed_forward_length(hp.intermediate_size)
        w.add_head_count(hp.num_attention_heads)
        w.add_head_count_kv(hp.num_key_value_heads)
        w.add_rope_freq_base(hp.rope_theta)
        w.add_layer_norm_rms_eps(hp.rms_norm_eps)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, checkpoint)

    def file_name(self, quant: str) -> str:
        """The GGUF naming convention, e.g. Qwen3-4B-Thinking-2507-Q4_K_M.gguf."""
        m = self.metadata
        name = gguf.naming_convention(m.name, m.basename, m.finetune, m.version, m.size_label, quant) + ".gguf"
        # Its parts come from the model card: it must stay one plain file name in the output folder.
        if not name.isprintable() or "/" in name or "\\" in name or name.startswith(".") or len(name.encode()) > 255:
            raise CheckpointError(f"the model card's name makes an unusable file name {name[:80]!r}: use --outfile",
                                  self.folder)
        return name

    def write(self, path: Path, on_progress: ProgressCallback | None = None) -> None:
        w = self.writer
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for tensor in self.tensors:
            tensor.on_progress = on_progress
            w.write_tensor_data(tensor)  # type: ignore[arg-type]  # StreamedTensor streams instead of an ndarray
        w.close()
