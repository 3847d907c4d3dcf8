"""A strict, bounded reader for GGUF headers: metadata and tensor infos, checked before llama.cpp sees the file.

llama.cpp's C loader aborts the process on some malformed files, and gguf-py's reader trusts declared lengths
(and parses the whole vocabulary in Python: seconds). This reader checks every count, length, type, offset and
size against the file and fixed limits, skips over big arrays without decoding them, and raises LocalqwenError.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from localqwen.errors import LocalqwenError, ModelFileError

MAX_KEYS = 1024  # metadata entries (a converted Qwen3 has ~35)
MAX_TENSORS = 1 << 14  # 512 layers (llama.cpp's maximum) of 11 tensors, and room to spare
MAX_ARRAY = 1 << 20  # elements in one metadata array (the vocabulary: 151,936)
MAX_ARRAY_TOTAL = 1 << 21  # elements in all arrays together: bounds the walk's time (~0.2 us per skipped string)
MAX_STRING = 1 << 20  # bytes in one string (chat templates are kilobytes)
MAX_KEY = 256  # bytes in one key
MAX_NAME = 63  # bytes in a tensor name: ggml's GGML_MAX_NAME is 64 with the NUL
MAX_DIMS = 4
# general.alignment: the spec wants a power of two and a multiple of 8, llama.cpp's CPU buffers assert on tensor
# data that is not 32-byte aligned (ggml-backend.cpp: "buffer pointer must be aligned"); the cap is only sanity.
MIN_ALIGNMENT, MAX_ALIGNMENT = 32, 1 << 20
KEEP_ARRAY = 64  # arrays up to this length are decoded; longer ones are summarised as ArrayInfo
SCALARS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}


U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array too long to be worth decoding (token lists, merges): its element type and length."""

    item_type: gguf.GGUFValueType
    count: int
    offset: int  # where its first element starts in the file
    size: int  # bytes its elements take


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (the row length) first
    type: gguf.GGMLQuantizationType
    offset: int  # from the start of the data section
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    types: dict[str, tuple[gguf.GGUFValueType, gguf.GGUFValueType | None]]  # key -> (type, element type of arrays)
    tensors: dict[str, TensorInfo]
    data_offset: int
    file_size: int


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path
        self.array_budget = MAX_ARRAY_TOTAL
        self.last_item_type: gguf.GGUFValueType | None = None

    def fail(self, message: str) -> LocalqwenError:
        return ModelFileError(f"not a valid GGUF file: {message} (at byte {self.pos})", self.path)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail("truncated")
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, limit: int, what: str) -> int:
        n = self.unpack("<Q")
        if n > limit:
            raise self.fail(f"{what} {n} exceeds the limit of {limit}")
        return n

    def string(self) -> str:
        raw = self.take(self.count(MAX_STRING, "string length"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not valid UTF-8") from None

    def value_type(self) -> gguf.GGUFValueType:
        code = self.unpack("<I")
        try:
            return gguf.GGUFValueType(code)
        except ValueError:
            raise self.fail(f"unknown metadata value type {code}") from None

    def value(self, kind: gguf.GGUFValueType, *, nested: bool = False) -> Any:
        if kind == gguf.GGUFValueType.FLOAT32:
            # The shortest decimal that is this float32 (0.6, not 0.6000000238418579): the value the writer meant.
            return float(str(np.float32(self.unpack("<f"))))
        if kind in SCALARS:
            return self.unpack(SCALARS[kind])
        if kind == gguf.GGUFValueType.STRING:
            return self.string()
        if nested:
            raise self.fail("arrays of arrays are not supported")
        item = self.value_type()
        self.last_item_type = item
        n = self.count(MAX_ARRAY, "array length")
        self.array_budget -= n
        if self.array_budget < 0:
            raise self.fail(f"the arrays hold more than {MAX_ARRAY_TOTAL} elements together")
        start = self.pos
        if n <= KEEP_ARRAY:
            return [self.value(item, nested=True) for _ in range(n)]
        if item in SCALARS:
            self.take(n * struct.calcsize(SCALARS[item]))
        elif item == gguf.GGUFValueType.STRING:
            self.skip_strings(n)
        else:
            raise self.fail("arrays of arrays are not supported")
        return ArrayInfo(item, n, start, self.pos - start)

    def skip_strings(self, n: int) -> None:
        """Step over n strings (a vocabulary: 150k of them) with bounds checks, without decoding them."""
        pos, size, length_at = self.pos, len(self.buf), U64.unpack_from
        for _ in range(n):
            if pos + 8 > size:
                raise self.fail("truncated")
            length = length_at(self.buf, pos)[0]
            if length > MAX_STRING:
                raise self.fail(f"string length {length} exceeds the limit of {MAX_STRING}")
            pos += 8 + length
        if pos > size:
            raise self.fail("truncated")
        self.pos = pos


def _tensor_info(cur: _Cursor) -> TensorInfo:
    name = cur.string()
    if not name or len(name.encode()) > MAX_NAME or not name.isprintable():
        raise cur.fail(f"tensor name {name[:80]!r} is empty, longer than {MAX_NAME} bytes or not printable")
    n_dims = cur.unpack("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name} has {n_dims} dimensions")
    shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
    code = cur.unpack("<I")
    try:
        kind = gguf.GGMLQuantizationType(code)
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name} has unknown type {code}") from None
    if shape[0] % block:
        raise cur.fail(f"tensor {name}: row length {shape[0]} is not a multiple of {kind.name}'s block of {block}")
    n_elements = math.prod(shape)
    if n_elements > len(cur.buf) * block:  # cannot fit in the file whatever the data offset: also stops overflows
        raise cur.fail(f"tensor {name} declares {n_elements} elements, more than the file can hold")
    return TensorInfo(name, shape, kind, cur.unpack("<Q"), n_elements // block * type_size)


def read_header(path: Path | str) -> GGUFHeader:
    """Parse and check a GGUF header; raises LocalqwenError naming the file and the problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) < 24:
                raise ModelFileError("not a GGUF file (too short)", path)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ModelFileError(exc.strerror or str(exc), path) from None
    with buf:
        cur = _Cursor(buf, path)
        if cur.take(4) != b"GGUF":
            raise ModelFileError("not a GGUF file (bad magic)", path)
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise cur.fail(f"unsupported version {version}")
        n_tensors = cur.count(MAX_TENSORS, "tensor count")
        n_kv = cur.count(MAX_KEYS, "metadata count")
        metadata: dict[str, Any] = {}
        types: dict[str, tuple[gguf.GGUFValueType, gguf.GGUFValueType | None]] = {}
        for _ in range(n_kv):
            key = cur.string()
            if not key or len(key.encode()) > MAX_KEY or not key.isprintable():  # keys end up in one-line errors
                raise cur.fail(f"metadata key {key[:80]!r} is empty, longer than {MAX_KEY} bytes or not printable")
            if key in metadata:
                raise cur.fail(f"duplicate metadata key {key}")
            kind = cur.value_type()
            cur.last_item_type = None
            metadata[key] = cur.value(kind)
            types[key] = (kind, cur.last_item_type)
        tensors: dict[str, TensorInfo] = {}
        for _ in range(n_tensors):
            info = _tensor_info(cur)
            if info.name in tensors:
                raise cur.fail(f"duplicate tensor {info.name}")
            tensors[info.name] = info
        alignment = _alignment(metadata, types, cur)
        data_offset = -(-cur.pos // alignment) * alignment
        file_size = len(buf)
    expected_offset = 0  # llama.cpp's reader wants the tensors' data back to back, in order, each padded
    for info in tensors.values():
        if info.offset != expected_offset:
            raise ModelFileError(f"not a valid GGUF file: tensor {info.name} has data offset {info.offset}, the layout "
                                 f"implies {expected_offset}", path)
        if data_offset + info.offset + info.n_bytes > file_size:
            raise ModelFileError(f"not a valid GGUF file: tensor {info.name} lies outside the file "
                                 "(truncated download?)", path)
        expected_offset += -(-info.n_bytes // alignment) * alignment
    return GGUFHeader(version, metadata, types, tensors, data_offset, file_size)


def _alignment(metadata: dict[str, Any], types: dict[str, Any], cur: _Cursor) -> int:
    if "general.alignment" not in metadata:
        return gguf.GGUF_DEFAULT_ALIGNMENT
    alignment = metadata["general.alignment"]
    if types["general.alignment"][0] != gguf.GGUFValueType.UINT32:
        raise cur.fail(f"general.alignment must be a uint32, got {types['general.alignment'][0].name.lower()}")
    if alignment & (alignment - 1) or not MIN_ALIGNMENT <= alignment <= MAX_ALIGNMENT:
        raise cur.fail(f"general.alignment {alignment} is not a power of two in {MIN_ALIGNMENT}..{MAX_ALIGNMENT}")
    return alignment
