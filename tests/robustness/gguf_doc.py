"""A GGUF file as editable parts (key-values and tensors), for building hostile variants of a good file quickly.

gguf-py's reader parses a 16 MB file with the real vocabulary in seconds, and its writer re-encodes every string of
it each time; here a file is parsed once, every field keeps its encoded bytes until it is replaced, and a variant is
a concatenation: milliseconds. The encoder also writes what a well-behaved writer never would (any value type for any
key, any tensor type, offsets and alignment of the caller's choice), which is the point.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

V = GGUFValueType
SCALAR_FORMATS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
                  V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


def encode_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def encode_value(vtype: GGUFValueType, value: Any, item_type: GGUFValueType | None = None) -> bytes:
    if vtype == V.STRING:
        return encode_string(value)
    if vtype in SCALAR_FORMATS:
        return struct.pack(SCALAR_FORMATS[vtype], value)
    assert vtype == V.ARRAY and item_type is not None
    head = struct.pack("<IQ", item_type, len(value))
    if item_type in SCALAR_FORMATS:
        return head + np.asarray(value, dtype=np.dtype(SCALAR_FORMATS[item_type])).tobytes()
    return head + b"".join(encode_value(item_type, v) for v in value)


@dataclass
class Field:
    key: str
    vtype: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None  # for arrays

    @cached_property
    def encoded(self) -> bytes:
        return encode_string(self.key) + struct.pack("<I", self.vtype) + encode_value(self.vtype, self.value,
                                                                                      self.item_type)


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order: the row length first
    type: int  # a ggml type id; not necessarily one gguf-py knows
    data: bytes

    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.type)]
        return int(np.prod(self.shape)) // block * size


@dataclass
class GGUFDoc:
    fields: list[Field]
    tensors: list[Tensor]
    version: int = 3
    layout_alignment: int = 32  # how the data section is laid out (general.alignment is a field like any other)
    extra: dict[str, Any] = field(default_factory=dict)

    # --- reading a good file -----------------------------------------------------------------------------------

    @classmethod
    def parse(cls, path: Path) -> GGUFDoc:
        buf = path.read_bytes()
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos
            pos += n
            return buf[pos - n:pos]

        def unpack(fmt: str) -> Any:
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

        def string() -> str:
            return take(unpack("<Q")).decode("utf-8")

        def value(vtype: GGUFValueType) -> tuple[Any, GGUFValueType | None]:
            if vtype == V.STRING:
                return string(), None
            if vtype in SCALAR_FORMATS:
                return unpack(SCALAR_FORMATS[vtype]), None
            item, n = V(unpack("<I")), unpack("<Q")
            if item in SCALAR_FORMATS:
                dtype = np.dtype(SCALAR_FORMATS[item])
                return np.frombuffer(take(n * dtype.itemsize), dtype=dtype).tolist(), item
            return [value(item)[0] for _ in range(n)], item

        assert take(4) == b"GGUF"
        version, n_tensors, n_kv = unpack("<I"), unpack("<Q"), unpack("<Q")
        fields = []
        for _ in range(n_kv):
            key = string()
            vtype = V(unpack("<I"))
            val, item = value(vtype)
            fields.append(Field(key, vtype, val, item))
        infos = []
        for _ in range(n_tensors):
            name = string()
            shape = tuple(unpack("<Q") for _ in range(unpack("<I")))
            infos.append((name, shape, unpack("<I"), unpack("<Q")))
        data_start = -(-pos // 32) * 32
        tensors = []
        for name, shape, ttype, offset in infos:
            t = Tensor(name, shape, ttype, b"")
            start = data_start + offset
            t.data = buf[start:start + t.nbytes()]
            tensors.append(t)
        return cls(fields, tensors, version)

    # --- editing -------------------------------------------------------------------------------------------------

    def copy(self) -> GGUFDoc:
        return replace(self, fields=list(self.fields), tensors=list(self.tensors), extra=dict(self.extra))

    def get(self, key: str) -> Field | None:
        return next((f for f in self.fields if f.key == key), None)

    def set(self, key: str, value: Any, vtype: GGUFValueType | None = None,
            item_type: GGUFValueType | None = None) -> GGUFDoc:
        """Replace (in place, keeping its position) or append a field; the type defaults to the old field's."""
        old = self.get(key)
        if vtype is None:
            assert old is not None, key
            vtype, item_type = old.vtype, old.item_type if item_type is None else item_type
        new = Field(key, vtype, value, item_type)
        if old is None:
            self.fields.append(new)
        else:
            self.fields[self.fields.index(old)] = new
        return self

    def drop(self, key: str) -> GGUFDoc:
        self.fields = [f for f in self.fields if f.key != key]
        return self

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)

    def retype(self, name: str, ttype: int) -> GGUFDoc:
        """Store tensor `name` as another type, same shape: requantized from its values where gguf-py can quantize
        to that type (a file that is really fine), else its bytes cut or repeated to the new size (nonsense values:
        what matters then is what llama.cpp does with the type)."""
        t = self.tensor(name)
        new = Tensor(t.name, t.shape, ttype, b"")
        try:
            values = _values(t)
            new.data = gguf.quants.quantize(values, GGMLQuantizationType(ttype)).tobytes()
        except (NotImplementedError, ValueError, gguf.quants.QuantError):
            n = new.nbytes()
            new.data = (t.data * (n // max(len(t.data), 1) + 1))[:n]
        assert len(new.data) == new.nbytes()
        self.tensors[self.tensors.index(t)] = new
        return self

    # --- writing ---------------------------------------------------------------------------------------------------

    def encode(self, offsets: list[int] | None = None) -> bytes:
        """The file's bytes. `offsets` overrides the tensors' declared data offsets (the data stays laid out in order,
        each tensor padded to the layout alignment)."""
        align = self.layout_alignment
        placed, cursor = [], 0
        for t in self.tensors:
            placed.append(cursor)
            cursor += -(-len(t.data) // align) * align
        declared = offsets if offsets is not None else placed
        parts = [b"GGUF", struct.pack("<IQQ", self.version, len(self.tensors), len(self.fields))]
        parts += [f.encoded for f in self.fields]
        for t, offset in zip(self.tensors, declared, strict=True):
            parts += [encode_string(t.name), struct.pack("<I", len(t.shape)),
                      b"".join(struct.pack("<Q", d) for d in t.shape), struct.pack("<IQ", t.type, offset)]
        header = b"".join(parts)
        header += b"\0" * (-len(header) % align)
        data = b"".join(t.data + b"\0" * (-len(t.data) % align) for t in self.tensors)
        return header + data


def _values(t: Tensor) -> np.ndarray:
    """A tensor's values as float32, rows of its first dimension."""
    raw = np.frombuffer(t.data, dtype=np.uint8)
    kind = GGMLQuantizationType(t.type)
    if kind == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(-1, t.shape[0])
    return gguf.quants.dequantize(raw.reshape(-1, len(t.data) // int(np.prod(t.shape[1:]))), kind).astype(np.float32)
