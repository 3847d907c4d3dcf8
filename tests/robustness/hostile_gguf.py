"""Hostile GGUF files by class: named variants of a good tiny Qwen3 GGUF, each either refused or really fine.

Every case rewrites the good file (gguf_doc.GGUFDoc) in one way an attacker or a broken converter might; `fine`
marks the variants that are legitimate (an untied output layer, descriptive extra keys, another quantization, a
larger alignment, a reworded chat template...), which localqwen must accept. `cases()` lists them all (hundreds);
`sample(seed, per_class)` picks a seeded subset per class. Classes:

    hparams         values llama.cpp asserts on (rope dimensions, RMS epsilon, layer count, rope scaling, alignment)
    vocab           tokenizer model and pre-tokenizer names, vocabulary invariants, token types, special-token ids
    tensor_types    a norm stored quantized or as integers, weights as I8..I64/F64/helper types
    tensors         extra, missing or oddly named tensors, shapes, data layout (offsets, overlap, truncation)
    metadata_types  a wrong GGUF type for every key localqwen or llama.cpp reads; unknown keys; sampling defaults
    template        the chat template as untrusted code: syntax, recursion, huge ranges, loops, output, memory
    limits          counts and sizes that would make `info` or the checks slow: keys, arrays, strings, tensors
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from localqwen.template_check import OFFICIAL_TEMPLATE
from tests.robustness import case_sample
from tests.robustness.case_sample import class_of, unique
from tests.robustness.gguf_doc import GGUFDoc

Build = Callable[[GGUFDoc], GGUFDoc | bytes]
CLASSES = ("hparams", "vocab", "tensor_types", "tensors", "metadata_types", "template", "limits")
NORMS = ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "blk.1.attn_q_norm.weight",
         "blk.1.attn_k_norm.weight")
MATRICES = ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.attn_v.weight",
            "blk.1.attn_output.weight", "blk.0.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.0.ffn_down.weight")


@dataclass(frozen=True)
class Case:
    name: str  # "<class>/<what>"
    fine: bool
    build: Build

    @property
    def klass(self) -> str:
        return class_of(self)

    def write(self, base: GGUFDoc, path: Path) -> Path:
        out = self.build(base.copy())
        path.write_bytes(out if isinstance(out, bytes) else out.encode())
        return path


def _set(key: str, value: object, vtype: V | None = None, item: V | None = None) -> Build:
    return lambda d: d.set(key, value, vtype, item)


def _aligned(alignment: int, vtype: V = V.UINT32, layout: int | None = None) -> Build:
    def build(d: GGUFDoc) -> GGUFDoc:
        d.set("general.alignment", alignment, vtype)
        d.layout_alignment = layout or alignment
        return d
    return build


def _tokens(edit: Callable[[list], None], key: str = "tokenizer.ggml.tokens") -> Build:
    def build(d: GGUFDoc) -> GGUFDoc:
        values = list(d.get(key).value)
        edit(values)
        return d.set(key, values)
    return build


def _put(i: int, value: object) -> Callable[[list], None]:
    return lambda values: values.__setitem__(i, value)


def hparams_cases() -> list[Case]:
    c = []
    for n in (0, 513, 600, 4096, 2**32 - 1):
        c.append(Case(f"hparams/block_count={n}", False, _set("qwen3.block_count", n)))
    for n in (0, 1, 16, 31, 33, 64, 2**32 - 1):
        c.append(Case(f"hparams/rope.dimension_count={n}", False, _set("qwen3.rope.dimension_count", n, V.UINT32)))
    c.append(Case("hparams/rope.dimension_count=key_length", True, _set("qwen3.rope.dimension_count", 32, V.UINT32)))
    for v in (float("nan"), -1.0, -1e-6, 0.0, float("inf"), float("-inf"), 2.0):
        c.append(Case(f"hparams/rms_eps={v}", False, _set("qwen3.attention.layer_norm_rms_epsilon", v)))
    for v in (float("nan"), 0.0, -1.0, float("inf"), 1e30):
        c.append(Case(f"hparams/freq_base={v}", False, _set("qwen3.rope.freq_base", v)))
    for name in ("bogus", "", "YARN", "longrope", "linear "):
        c.append(Case(f"hparams/rope.scaling.type={name!r}", False, _set("qwen3.rope.scaling.type", name, V.STRING)))
    for v in (float("nan"), -2.0, 0.0, 1e9):
        c.append(Case(f"hparams/yarn_factor={v}", False, lambda d, v=v: d.set(
            "qwen3.rope.scaling.type", "yarn", V.STRING).set("qwen3.rope.scaling.factor", v, V.FLOAT32)))
    c.append(Case("hparams/yarn_orig_ctx=0", False, lambda d: d.set("qwen3.rope.scaling.type", "yarn", V.STRING)
                  .set("qwen3.rope.scaling.factor", 4.0, V.FLOAT32)
                  .set("qwen3.rope.scaling.original_context_length", 0, V.UINT32)))
    c.append(Case("hparams/yarn", True, lambda d: d.set("qwen3.rope.scaling.type", "yarn", V.STRING)
                  .set("qwen3.rope.scaling.factor", 4.0, V.FLOAT32)
                  .set("qwen3.rope.scaling.original_context_length", 32768, V.UINT32)))
    c.append(Case("hparams/rope_scaling_none", True, _set("qwen3.rope.scaling.type", "none", V.STRING)))
    for n in (0, 2**32 - 1):
        c.append(Case(f"hparams/context_length={n}", False, _set("qwen3.context_length", n)))
    c.append(Case("hparams/head_count_kv=0", False, _set("qwen3.attention.head_count_kv", 0)))
    c.append(Case("hparams/head_count_kv=3", False, _set("qwen3.attention.head_count_kv", 3)))
    c.append(Case("hparams/value_length!=key_length", False, _set("qwen3.attention.value_length", 16)))
    for key, value, vtype in (("expert_count", 4, V.UINT32), ("expert_used_count", 2, V.UINT32),
                              ("nextn_predict_layers", 1, V.UINT32), ("attention.causal", False, V.BOOL),
                              ("pooling_type", 7, V.UINT32), ("embedding_length_out", 128, V.UINT32),
                              ("attention.sliding_window", 4, V.UINT32), ("rope.scaling.attn_factor", 0.5, V.FLOAT32),
                              ("attention.layer_norm_epsilon", 1e-5, V.FLOAT32)):
        c.append(Case(f"hparams/qwen3.{key}", False, _set(f"qwen3.{key}", value, vtype)))
    c.append(Case("hparams/classifier_labels", False, _set("qwen3.classifier.output_labels", ["a", "b"], V.ARRAY,
                                                          V.STRING)))
    for a in (0, 1, 2, 3, 4, 8, 16, 48, 2**31):
        layout = a if 1 <= a <= 4096 and not a & (a - 1) else 32  # 2**31 would pad the file to gigabytes
        c.append(Case(f"hparams/alignment={a}", False, _aligned(a, layout=layout)))
    c.append(Case("hparams/alignment_u64", False, _aligned(32, V.UINT64)))
    c.append(Case("hparams/alignment_i32", False, _aligned(32, V.INT32)))
    for a in (64, 256):
        c.append(Case(f"hparams/alignment={a}_fine", True, _aligned(a)))
    c.append(Case("hparams/split.count=2", False, _set("split.count", 2, V.UINT16)))
    c.append(Case("hparams/split.no=0", False, _set("split.no", 0, V.UINT16)))
    return c


def vocab_cases() -> list[Case]:
    c = []
    for model in ("llama", "none", "no_vocab", "bert", "t5", "rwkv", "gemma4", "plamo2", "", "GPT2"):
        c.append(Case(f"vocab/model={model!r}", False, _set("tokenizer.ggml.model", model)))
    for pre in ("default", "llama3", "", "bogus", "deepseek-llm", "qwen35"):
        c.append(Case(f"vocab/pre={pre!r}", False, _set("tokenizer.ggml.pre", pre)))
    c.append(Case("vocab/pre_missing", False, lambda d: d.drop("tokenizer.ggml.pre")))
    for i in (0, 500, 151642):
        c.append(Case(f"vocab/duplicate@{i}", False, _tokens(lambda t, i=i: t.__setitem__(i, t[i + 1]))))
    c.append(Case("vocab/duplicate_pad", False, _tokens(lambda t: t.__setitem__(151900, t[151901]))))
    c.append(Case("vocab/empty_token", False, _tokens(_put(700, ""))))
    c.append(Case("vocab/empty_collision", False, _tokens(lambda t: (t.__setitem__(700, ""),
                                                                     t.__setitem__(701, "[EMPTY_700]")))))
    c.append(Case("vocab/invalid_utf8", False, _tokens(_put(700, b"\xff\xfe\xfd"))))
    c.append(Case("vocab/im_end_renamed", False, _tokens(_put(151645, "<|im_END|>"))))
    c.append(Case("vocab/think_renamed", False, _tokens(_put(151668, "</thinking>"))))
    for i, kind in ((500, 2), (500, 6), (500, 0), (500, 7), (500, 99), (500, -1), (97, 3), (151645, 1), (151667, 3),
                    (151900, 3), (151900, 1)):
        c.append(Case(f"vocab/type[{i}]={kind}", False, _tokens(_put(i, kind), "tokenizer.ggml.token_type")))
    c.append(Case("vocab/types_short", False, _tokens(lambda t: t.pop(), "tokenizer.ggml.token_type")))
    c.append(Case("vocab/types_u32", False, lambda d: d.set(
        "tokenizer.ggml.token_type", d.get("tokenizer.ggml.token_type").value, V.ARRAY, V.UINT32)))
    c.append(Case("vocab/tokens_ints", False, _set("tokenizer.ggml.tokens", list(range(10)), V.ARRAY, V.UINT32)))
    c.append(Case("vocab/tokens_missing", False, lambda d: d.drop("tokenizer.ggml.tokens")))
    c.append(Case("vocab/merges_missing", False, lambda d: d.drop("tokenizer.ggml.merges")))
    c.append(Case("vocab/merges_empty", False, _set("tokenizer.ggml.merges", [], V.ARRAY, V.STRING)))
    c.append(Case("vocab/merges_ints", False, _set("tokenizer.ggml.merges", [1, 2], V.ARRAY, V.INT32)))
    c.append(Case("vocab/merge_without_space", False, _tokens(_put(10, "abc"), "tokenizer.ggml.merges")))
    c.append(Case("vocab/merge_of_unknown_tokens", False, _tokens(_put(10, "zzqq xxyy"), "tokenizer.ggml.merges")))
    for key, value in (("bos_token_id", 10**9), ("eos_token_id", 2**32 - 1), ("eos_token_id", 100),
                       ("padding_token_id", 151900), ("unknown_token_id", 151936)):
        c.append(Case(f"vocab/{key}={value}", False, _set(f"tokenizer.ggml.{key}", value, V.UINT32)))
    c.append(Case("vocab/eos_int32", False, _set("tokenizer.ggml.eos_token_id", 151645, V.INT32)))
    c.append(Case("vocab/eot=im_end", True, _set("tokenizer.ggml.eot_token_id", 151645, V.UINT32)))
    c.append(Case("vocab/add_bos_u8", False, _set("tokenizer.ggml.add_bos_token", 1, V.UINT8)))
    c.append(Case("vocab/scores_short", False, _set("tokenizer.ggml.scores", [0.0] * 10, V.ARRAY, V.FLOAT32)))
    for key, value, vtype, item in (("token_type_count", 2, V.UINT32, None),
                                    ("suppress_tokens", [1, 2], V.ARRAY, V.INT32),
                                    ("precompiled_charsmap", [0] * 8, V.ARRAY, V.UINT8),
                                    ("prefix_token_id", 5, V.UINT32, None)):
        c.append(Case(f"vocab/tokenizer.ggml.{key}", False, _set(f"tokenizer.ggml.{key}", value, vtype, item)))
    c.append(Case("vocab/chat_template_missing", False, lambda d: d.drop("tokenizer.chat_template")))
    return c


def tensor_type_cases() -> list[Case]:
    c = []
    for norm in NORMS:
        for t in (T.F16, T.BF16, T.Q8_0, T.I32, T.I8, T.F64):
            c.append(Case(f"tensor_types/{norm}={t.name}", False, lambda d, n=norm, t=t: d.retype(n, t)))
    for matrix in MATRICES:
        for t in (T.I8, T.I16, T.I32, T.I64, T.F64, T.Q8_1, T.MXFP4):
            c.append(Case(f"tensor_types/{matrix}={t.name}", False, lambda d, m=matrix, t=t: d.retype(m, t)))
        for t in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_1):  # types gguf-py can requantize real values to
            c.append(Case(f"tensor_types/{matrix}={t.name}_fine", True, lambda d, m=matrix, t=t: d.retype(m, t)))
    return c


def _add_tensor(name: str, shape: tuple[int, ...], ttype: int = T.F32) -> Build:
    def build(d: GGUFDoc) -> GGUFDoc:
        from tests.robustness.gguf_doc import Tensor
        t = Tensor(name, shape, ttype, b"")
        t.data = b"\0" * t.nbytes()
        d.tensors.append(t)
        return d
    return build


def _rename(old: str, new: str) -> Build:
    def build(d: GGUFDoc) -> GGUFDoc:
        t = d.tensor(old)
        d.tensors[d.tensors.index(t)] = type(t)(new, t.shape, t.type, t.data)
        return d
    return build


def _reshape(name: str, shape: tuple[int, ...]) -> Build:
    def build(d: GGUFDoc) -> GGUFDoc:
        t = d.tensor(name)
        d.tensors[d.tensors.index(t)] = type(t)(name, shape, t.type, t.data)
        return d
    return build


def _offsets(change: Callable[[list[int]], None]) -> Build:
    def build(d: GGUFDoc) -> bytes:
        offsets, cursor = [], 0
        for t in d.tensors:
            offsets.append(cursor)
            cursor += -(-len(t.data) // 32) * 32
        change(offsets)
        return d.encode(offsets)
    return build


def tensor_cases() -> list[Case]:
    c = []
    for name, shape in (("blk.0.attn_q.bias", (128,)), ("blk.0.attn_qkv.weight", (64, 256)),
                        ("blk.2.attn_q.weight", (64, 128)), ("cls.output.weight", (64, 1)),
                        ("rope_freqs.weight", (16,)), ("blk.0.ffn_up.input_scale", (1,)),
                        ("token_embd_norm.weight", (64,)), ("blk.0.attn_q.weight ", (64, 128)),
                        ("BLK.0.attn_q.weight", (64, 128)), ("blk.00.attn_q.weight", (64, 128)),
                        ("blk.0.attn_q.weighť", (64, 128)), ("x" * 63, (32,)), ("blk.0.attn\nq", (32,))):
        c.append(Case(f"tensors/extra {name[:30]!r}", False, _add_tensor(name, shape)))
    c.append(Case("tensors/untied_output", True, _add_tensor("output.weight", (64, 151936), T.Q8_0)))
    c.append(Case("tensors/output_wrong_shape", False, _add_tensor("output.weight", (64, 1000), T.Q8_0)))
    for length in (64, 200):
        c.append(Case(f"tensors/name_of_{length}", False, _add_tensor("y" * length, (32,))))
    c.append(Case("tensors/empty_name", False, _add_tensor("", (32,))))
    c.append(Case("tensors/duplicate", False, _add_tensor("output_norm.weight", (64,))))
    for name in ("blk.1.ffn_down.weight", "output_norm.weight", "token_embd.weight"):
        c.append(Case(f"tensors/missing {name}", False, lambda d, n=name: setattr(
            d, "tensors", [t for t in d.tensors if t.name != n]) or d))
    c.append(Case("tensors/renamed", False, _rename("blk.1.ffn_down.weight", "blk.1.ffn_dwn.weight")))
    c.append(Case("tensors/transposed", False, _reshape("blk.0.ffn_up.weight", (128, 64))))
    c.append(Case("tensors/3d", False, _reshape("blk.0.ffn_up.weight", (64, 64, 2))))
    c.append(Case("tensors/zero_dim", False, _reshape("blk.0.attn_q_norm.weight", (0,))))
    c.append(Case("tensors/offsets_swapped", False, _offsets(lambda o: o.__setitem__(slice(1, 3), o[2:0:-1]))))
    c.append(Case("tensors/gap", False, _offsets(lambda o: o.__setitem__(-1, o[-1] + 32))))
    c.append(Case("tensors/overlap", False, _offsets(lambda o: o.__setitem__(3, o[3] - 32))))
    c.append(Case("tensors/offset_beyond_file", False, _offsets(lambda o: o.__setitem__(-1, 2**40))))
    c.append(Case("tensors/truncated", False, lambda d: d.encode()[:-1000]))
    c.append(Case("tensors/truncated_header", False, lambda d: d.encode()[:5_000_000]))
    return c


def _retype_key(key: str, value: object, vtype: V, item: V | None = None) -> Case:
    return Case(f"metadata_types/{key}:{vtype.name.lower()}{'[' + item.name.lower() + ']' if item else ''}", False,
                _set(key, value, vtype, item))


def metadata_type_cases() -> list[Case]:
    c = []
    wrong = [("x", V.STRING, None), ([1, 2], V.ARRAY, V.UINT32), (1.5, V.FLOAT32, None), (True, V.BOOL, None),
             (7, V.INT64, None), (3, V.UINT8, None), (["a"], V.ARRAY, V.STRING), (2.0, V.FLOAT64, None)]
    keys = ("general.architecture", "general.name", "general.file_type", "general.quantization_version",
            "general.sampling.temp", "general.sampling.top_k", "general.sampling.top_p", "qwen3.block_count",
            "qwen3.context_length", "qwen3.embedding_length", "qwen3.feed_forward_length",
            "qwen3.attention.head_count", "qwen3.attention.head_count_kv", "qwen3.attention.key_length",
            "qwen3.attention.layer_norm_rms_epsilon", "qwen3.rope.freq_base", "tokenizer.ggml.model",
            "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token",
            "tokenizer.chat_template", "general.tags")
    scalar_types = {"general.file_type": V.UINT32, "general.quantization_version": V.UINT32,
                    "general.sampling.temp": V.FLOAT32, "general.sampling.top_k": V.INT32,
                    "general.sampling.top_p": V.FLOAT32, "qwen3.attention.layer_norm_rms_epsilon": V.FLOAT32,
                    "qwen3.rope.freq_base": V.FLOAT32, "tokenizer.ggml.add_bos_token": V.BOOL,
                    "general.tags": V.ARRAY}
    for key in keys:
        right = scalar_types.get(key, V.STRING if key.endswith(("architecture", "name", "model", "pre", "template"))
                                 else V.UINT32)
        for value, vtype, item in wrong:
            if vtype != right and not (vtype == V.ARRAY and key == "general.tags" and item == V.STRING):
                c.append(_retype_key(key, value, vtype, item))
    for value in ("hot", float("nan"), -1.0, 1e30, 6.0):
        vtype = V.STRING if isinstance(value, str) else V.FLOAT32
        c.append(Case(f"metadata_types/temp={value!r}", False, _set("general.sampling.temp", value, vtype)))
    for value in (-5, 2**40):
        c.append(Case(f"metadata_types/top_k={value}", False, _set("general.sampling.top_k", value,
                                                                    V.INT64 if value > 2**31 else V.INT32)))
    for key, value in (("general.sampling.top_p", 0.0), ("general.sampling.top_p", 2.0),
                       ("general.sampling.min_p", 1.5)):
        c.append(Case(f"metadata_types/{key}={value}", False, _set(key, value, V.FLOAT32)))
    c.append(Case("metadata_types/min_p=0.05", True, _set("general.sampling.min_p", 0.05, V.FLOAT32)))
    for value in (9999, 2**31):
        c.append(Case(f"metadata_types/file_type={value}", False, _set("general.file_type", value)))
    for arch in ("llama", "qwen2", "Qwen3", ""):
        c.append(Case(f"metadata_types/architecture={arch!r}", False, _set("general.architecture", arch)))
    for name in ("evil\x1b[2J\x1b]0;pwned\x07", "two\nlines", "nul\0"):
        c.append(Case(f"metadata_types/name={name[:8]!r}", False, _set("general.name", name)))
    c.append(Case("metadata_types/unknown qwen3 key", False, _set("qwen3.foo", 1, V.UINT32)))
    c.append(Case("metadata_types/unknown tokenizer key", False, _set("tokenizer.ggml.foo", 1, V.UINT32)))
    c.append(Case("metadata_types/tags_as_string", False, _set("general.tags", "chat", V.STRING)))
    for key, value, vtype, item in (("general.author", "someone", V.STRING, None),
                                    ("general.tags", ["chat", "qwen"], V.ARRAY, V.STRING),
                                    ("quantize.imatrix.file", "imatrix.dat", V.STRING, None),
                                    ("quantize.imatrix.entries_count", 252, V.INT32, None),
                                    ("custom.numbers", [1, 2, 3], V.ARRAY, V.INT64),
                                    ("llama.context_length", 4096, V.UINT32, None),
                                    ("tokenizer.chat_template.tool_use", "{{ messages }}", V.STRING, None)):
        c.append(Case(f"metadata_types/extra {key}", True, _set(key, value, vtype, item)))
    c.append(Case("metadata_types/empty_key", False, _set("", 1, V.UINT32)))
    c.append(Case("metadata_types/key with a newline", False, _set("general.a\nError: forged", 1, V.UINT32)))
    c.append(Case("metadata_types/key with an escape", False, _set("general.\x1b[2Jx", 1, V.UINT32)))
    c.append(Case("metadata_types/duplicate_key", False, lambda d: d.fields.append(d.get("general.name")) or d))
    c.append(Case("metadata_types/nested_array", False, lambda d: _raw_field(d, "general.nested", struct.pack(
        "<IIQIQ", V.ARRAY, V.ARRAY, 1, V.UINT8, 0))))
    c.append(Case("metadata_types/unknown_value_type", False, lambda d: _raw_field(d, "general.odd",
                                                                                  struct.pack("<II", 13, 0))))
    return c


def _raw_field(d: GGUFDoc, key: str, typed_value: bytes) -> GGUFDoc:
    from tests.robustness.gguf_doc import Field, encode_string
    field = Field(key, V.UINT8, 0)
    field.__dict__["encoded"] = encode_string(key) + typed_value  # a value no well-behaved writer would produce
    d.fields.append(field)
    return d


TEMPLATES = {
    "syntax": ("{% for m in messages %}{{ m.content }", False),
    "unclosed_block": ("{% if messages %}{{ messages[-1].content }}", False),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}{{ messages[-1].content }}", False),
    "huge_range": ("{% for i in range(10**9) %}{% endfor %}{{ messages[-1].content }}", False),
    "nested_loops": ("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"
                     "{{ messages[-1].content }}", False),
    # Six nested loops over literals (90**6 iterations): nothing the sandbox could count, only a clock stops it.
    "literal_loops": ("".join(f"{{% for {v} in '0123456789' * 9 %}}" for v in "abcdef") + "{% endfor %}" * 6
                      + "{{ messages[-1].content }}", False),
    "division_by_zero": ("{{ messages[-1].content }}{{ 1 / 0 }}", False),
    "type_error": ("{{ messages + 1 }}", False),
    "include": ('{% include "other.jinja" %}{{ messages[-1].content }}', False),
    "import": ('{% import "macros.jinja" as m %}{{ messages[-1].content }}', False),
    "extends": ('{% extends "base.jinja" %}', False),
    "raise_exception": ('{{ raise_exception("nope\\nsecond line") }}', False),
    "enormous_output": ("{% for i in range(99999) %}{{ 'x' * 99 }}{% endfor %}{{ messages[-1].content }}", False),
    "string_bomb": ("{{ 'x' * 10**10 }}{{ messages[-1].content }}", False),
    "center_bomb": ("{{ messages[-1].content | center(2**31) }}", False),
    "concat_doubling": ('{% set ns = namespace(s="ab") %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}'
                        "{% endfor %}{{ messages[-1].content }}", False),
    "lipsum": ("{{ lipsum(10**6) }}{{ messages[-1].content }}", False),
    "dunder": ("{{ ''.__class__.__mro__[1].__subclasses__() }}{{ messages[-1].content }}", False),
    "drops_user_message": ("<|im_start|>assistant\n", False),
    "empty": ("", False),
    "only_first_message": ("{{ messages[0].content }}", False),
    "content_trigger": ("{% if messages|length > 3 %}{{ 1 / 0 }}{% endif %}{{ messages[-1].content }}", False),
    "too_big": ("{# " + "x" * (300 << 10) + " #}{{ messages[-1].content }}", False),
    "reworded_official": (OFFICIAL_TEMPLATE.replace("You may call one or more functions",
                                                    "You may call one or more tools"), True),
    "official_plus_comment": ("{#- a note from the quantizer -#}\n" + OFFICIAL_TEMPLATE, True),
}


def template_cases() -> list[Case]:
    return [Case(f"template/{name}", fine, _set("tokenizer.chat_template", text))
            for name, (text, fine) in TEMPLATES.items()]


def _many_keys(n: int) -> Build:
    def build(d: GGUFDoc) -> GGUFDoc:
        for i in range(n):
            d.set(f"general.extra.k{i}", i, V.UINT32)
        return d
    return build


def _patch(offset: int, fmt: str, value: int) -> Build:
    def build(d: GGUFDoc) -> bytes:
        raw = bytearray(d.encode())
        struct.pack_into(fmt, raw, offset, value)
        return bytes(raw)
    return build


def limit_cases() -> list[Case]:
    c = [Case("limits/5000_keys", False, _many_keys(5000)), Case("limits/900_keys", True, _many_keys(900)),
         Case("limits/array_of_2M", False, _set("general.big", [0] * (2 << 20), V.ARRAY, V.UINT8)),
         Case("limits/array_of_1M_fine", True, _set("general.big", [0] * (1 << 20), V.ARRAY, V.UINT8)),
         Case("limits/arrays_over_total", False, lambda d: d.set("general.a", [0] * (1 << 20), V.ARRAY, V.UINT8)
              .set("general.b", [0] * (1 << 20), V.ARRAY, V.UINT8)),
         Case("limits/900k_strings", False, lambda d: d.set("general.s", ["a"] * 900_000, V.ARRAY, V.STRING)
              .set("general.t", ["b"] * 900_000, V.ARRAY, V.STRING)),
         Case("limits/string_of_2MB", False, _set("general.description", "d" * (2 << 20), V.STRING)),
         Case("limits/key_of_300", False, _set("general." + "k" * 300, 1, V.UINT32)),
         Case("limits/tensor_count=10**6", False, _patch(8, "<Q", 10**6)),
         Case("limits/kv_count=2**40", False, _patch(16, "<Q", 2**40)),
         Case("limits/version=1", False, _patch(4, "<I", 1)), Case("limits/version=4", False, _patch(4, "<I", 4)),
         Case("limits/version=2", True, _patch(4, "<I", 2)),
         Case("limits/first_key_length=2**62", False, _patch(24, "<Q", 2**62))]
    return c


@cache
def cases() -> tuple[Case, ...]:
    all_cases = (hparams_cases() + vocab_cases() + tensor_type_cases() + tensor_cases() + metadata_type_cases()
                 + template_cases() + limit_cases())
    return unique(all_cases)


def sample(seed: int, per_class: int) -> list[Case]:
    """`per_class` cases of each class chosen by `seed`, including a fine one where the class has some."""
    return case_sample.sample(cases(), CLASSES, seed, per_class)
