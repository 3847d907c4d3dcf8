"""Parity with llama.cpp's own converter: `localqwen convert` must write what `convert_hf_to_gguf.py` writes.

The reference is the converter vendored in the llama-cpp-python sdist of the installed version (the llama.cpp that
quantizes and runs our files), fetched from PyPI once and cached in pytest's cache. It needs torch + transformers +
sentencepiece, which localqwen does not: it runs under the interpreter named by $LOCALQWEN_REFERENCE_PYTHON, e.g.

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers==4.57.6 sentencepiece 'numpy~=2.2.6'
    LOCALQWEN_REFERENCE_PYTHON=/tmp/refvenv/bin/python .venv/bin/python -m pytest -m reference \
        tests/test_llamacpp_parity.py

Both converters read the same synthetic checkpoint folder. Compared: every key-value (name, type, value; arrays
element by element), every tensor (name, shape, type, raw data), key and tensor order, the default file name and
finally the bytes of the files. Q8_0 and Q4_K_M made by llama.cpp's quantizer from each side's bf16 must match too.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from localqwen.convert import convert
from localqwen.convert.quantize import quantize
from localqwen.synthetic import GENERATION_CONFIG, write_checkpoint

from .conftest import QUANT_SHAPE

pytestmark = pytest.mark.reference

REFERENCE_ENV = "LOCALQWEN_REFERENCE_PYTHON"
LLAMA_CPP_PYTHON_VERSION = metadata.version("llama-cpp-python")
SDIST_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")  # under vendor/llama.cpp/ in the sdist

# general.* keys allowed to differ between the two files: none. For a local folder both converters derive
# general.name/basename/finetune/version/size_label from the same folder name and parameter count (gguf-py's
# Metadata.load), license/base_model/tags/languages from the same README.md, general.sampling.* from the same
# generation_config.json; neither writes an output path, a date, a tool version or a source URL.
ALLOWED_DIFFERENCES: frozenset[str] = frozenset()
IMPLIED_KEYS = {"GGUF.kv_count"}  # follows from the key sets, which are compared key by key

# The model card of Qwen/Qwen3-4B-Thinking-2507 (its front matter; `localqwen convert REPO` downloads README.md).
HUB_README = """---
library_name: transformers
license: apache-2.0
license_link: https://huggingface.co/Qwen/Qwen3-4B-Thinking-2507/blob/main/LICENSE
pipeline_tag: text-generation
---

# Qwen3-4B-Thinking-2507
"""
# A fine-tune's card: exercises base_model, tags and languages.
FINETUNE_README = """---
license: apache-2.0
base_model: Qwen/Qwen3-4B-Thinking-2507
tags:
- chat
- reasoning
language:
- en
- zh
pipeline_tag: text-generation
---

# A Qwen3-4B-Thinking-2507 fine-tune
"""

# (checkpoint, outtype). "hub" is laid out as the official repository (bf16, tied embeddings, transformers 4.x
# config, its generation_config.json); "finetune" varies what a derived checkpoint may: f16 weights, an untied
# lm_head, transformers 5.x's rope_parameters, repetition_penalty in generation_config.json, a richer model card.
CASES = [("hub", "bf16"), ("hub", "f16"), ("hub", "f32"), ("finetune", "bf16")]
QUANTS = ["q8_0", "q4_k_m"]


def case_id(case: tuple[str, str]) -> str:
    return "-".join(case)


# --- the reference converter ----------------------------------------------------------------------------------


def _pytest_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    return cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def reference_python() -> str:
    """$LOCALQWEN_REFERENCE_PYTHON, checked before anything is downloaded."""
    python = os.environ.get(REFERENCE_ENV)
    if not python:
        pytest.skip(f"set {REFERENCE_ENV} to a Python with torch, transformers and sentencepiece to compare with "
                    f"llama.cpp's convert_hf_to_gguf.py (see this module's docstring)")
    return python


@pytest.fixture(scope="session")
def llama_cpp_converter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                        reference_python: str) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (converter, conversion/, gguf-py/), extracted once."""
    version = LLAMA_CPP_PYTHON_VERSION
    root = _pytest_cache(request, tmp_path_factory, f"llama-cpp-python-{version}-converter")
    tree = root / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    download = tmp_path_factory.mktemp("sdist")
    pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                          "--retries", "2", f"llama-cpp-python=={version}", "-d", str(download)],
                         capture_output=True, text=True, timeout=900)
    archives = sorted(download.glob("llama_cpp_python-*.tar.gz"))
    if pip.returncode != 0 or not archives:
        last = (pip.stderr.strip() or pip.stdout.strip() or "no output").splitlines()[-1]
        pytest.skip(f"cannot fetch the llama-cpp-python {version} sdist from PyPI (is PyPI reachable?): {last}")
    prefix = f"{archives[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    staging = root / "llama.cpp.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and
                   m.name[len(prefix):].split("/")[0] in SDIST_PARTS and (m.isfile() or m.isdir())]
        for member in members:
            member.name = member.name[len(prefix):]
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(staging, members=members, **extra)
    if not (staging / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"the llama-cpp-python {version} sdist holds no vendor/llama.cpp/convert_hf_to_gguf.py")
    shutil.rmtree(tree, ignore_errors=True)
    staging.rename(tree)
    shutil.rmtree(download, ignore_errors=True)
    return tree


def _reference_env(converter: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    # The sdist's own gguf-py, not whatever gguf the reference interpreter may have installed.
    env["PYTHONPATH"] = str(converter / "gguf-py")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def check_reference(python: str, converter: Path) -> None:
    """The reference interpreter imports what the converter needs, and gguf from the sdist's gguf-py."""
    try:
        probe = subprocess.run(
            [python, "-c", "import gguf, sentencepiece, torch, transformers; "
                           "print(gguf.__file__, torch.__version__, transformers.__version__)"],
            capture_output=True, text=True, env=_reference_env(converter), timeout=300)
    except OSError as exc:
        pytest.fail(f"{REFERENCE_ENV}={python} cannot be run: {exc}")
    if probe.returncode != 0:
        pytest.fail(f"{REFERENCE_ENV}={python} cannot run llama.cpp's converter: "
                    f"{(probe.stderr.strip() or 'no output').splitlines()[-1]}")
    gguf_file, *versions = probe.stdout.split()
    assert Path(gguf_file).resolve().is_relative_to((converter / "gguf-py").resolve()), \
        f"the reference converter would use gguf from {gguf_file}, not the sdist's gguf-py"
    print(f"reference: llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist, torch {versions[0]}, "
          f"transformers {versions[1]}")


# --- checkpoints and conversions -------------------------------------------------------------------------------


def make_checkpoint(root: Path, kind: str) -> Path:
    # Both converters name the model after this folder, which is named as the hub repository.
    folder = root / kind / "Qwen3-4B-Thinking-2507"
    if kind == "hub":
        write_checkpoint(folder, QUANT_SHAPE, seed=1, shards=3)
        (folder / "README.md").write_text(HUB_README, encoding="utf-8")
    else:
        write_checkpoint(folder, dataclasses.replace(QUANT_SHAPE, tie_word_embeddings=False), seed=2, shards=2,
                         dtype="float16", rope_style="parameters")
        (folder / "generation_config.json").write_text(
            json.dumps({**GENERATION_CONFIG, "repetition_penalty": 1.05}, indent=2) + "\n", encoding="utf-8")
        (folder / "README.md").write_text(FINETUNE_README, encoding="utf-8")
    return folder


@dataclasses.dataclass(repr=False)
class Snapshot:
    """What GGUFReader sees in a file (parsed once: reading the 151,936-token vocabulary takes seconds)."""

    path: Path
    fields: dict[str, tuple[list[gguf.GGUFValueType], Any]]
    tensors: list[gguf.ReaderTensor]

    def __repr__(self) -> str:  # keeps pytest's failure reports short
        return f"Snapshot({self.path.parent.name}/{self.path.name})"

    @classmethod
    def read(cls, path: Path) -> Snapshot:
        reader = gguf.GGUFReader(path)
        return cls(path, {name: (list(f.types), f.contents()) for name, f in reader.fields.items()},
                   list(reader.tensors))


class Conversions:
    """Each side's GGUF for a (checkpoint, type), made on first use and kept for the module."""

    def __init__(self, root: Path, converter: Path, reference_python: str) -> None:
        self.root, self.converter, self.python = root, converter, reference_python
        self.checkpoints: dict[str, Path] = {}
        self.files: dict[tuple[str, ...], Snapshot] = {}

    def checkpoint(self, kind: str) -> Path:
        if kind not in self.checkpoints:
            self.checkpoints[kind] = make_checkpoint(self.root / "checkpoints", kind)
        return self.checkpoints[kind]

    def _outdir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True)
        return path

    def ours(self, kind: str, outtype: str) -> Snapshot:
        key = ("ours", kind, outtype)
        if key not in self.files:
            [path] = convert(str(self.checkpoint(kind)), [outtype], outdir=self._outdir(*key), quiet=True)
            self.files[key] = Snapshot.read(path)
        return self.files[key]

    def theirs(self, kind: str, outtype: str) -> Snapshot:
        key = ("theirs", kind, outtype)
        if key not in self.files:
            outdir = self._outdir(*key)  # a folder: llama.cpp then names the file itself
            cmd = [self.python, str(self.converter / "convert_hf_to_gguf.py"), str(self.checkpoint(kind)),
                   "--outtype", outtype, "--outfile", str(outdir)]
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=outdir,
                                 env=_reference_env(self.converter), timeout=1800)
            if run.returncode != 0:
                pytest.fail(f"llama.cpp's converter failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
            [path] = outdir.glob("*.gguf")
            self.files[key] = Snapshot.read(path)
        return self.files[key]

    def quantized(self, side: str, kind: str, quant: str) -> Snapshot:
        key = (side, kind, quant)
        if key not in self.files:
            source = (self.ours if side == "ours" else self.theirs)(kind, "bf16").path
            dest = self._outdir(*key) / f"{quant}.gguf"
            quantize(source, dest, quant)
            self.files[key] = Snapshot.read(dest)
        return self.files[key]


@pytest.fixture(scope="module")
def conversions(tmp_path_factory: pytest.TempPathFactory, llama_cpp_converter: Path,
                reference_python: str) -> Conversions:
    check_reference(reference_python, llama_cpp_converter)
    return Conversions(tmp_path_factory.mktemp("parity"), llama_cpp_converter, reference_python)


# --- comparisons -----------------------------------------------------------------------------------------------


def show(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} items: {', '.join(map(repr, value[:3]))}, ...]"
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def value_difference(ours: Any, theirs: Any) -> str:
    if isinstance(ours, list) and isinstance(theirs, list):
        if len(ours) != len(theirs):
            return f"{len(ours)} elements, llama.cpp {len(theirs)}"
        i = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
        return f"element {i} of {len(ours)}: ours {show(ours[i])}, llama.cpp {show(theirs[i])}"
    return f"ours {show(ours)}, llama.cpp {show(theirs)}"


def metadata_differences(ours: Snapshot, theirs: Snapshot) -> list[str]:
    problems = []
    for key in sorted((ours.fields.keys() | theirs.fields.keys()) - ALLOWED_DIFFERENCES - IMPLIED_KEYS):
        if key not in ours.fields:
            problems.append(f"{key}: missing in ours; llama.cpp writes {show(theirs.fields[key][1])} "
                            f"({'/'.join(t.name for t in theirs.fields[key][0])})")
        elif key not in theirs.fields:
            problems.append(f"{key}: ours writes {show(ours.fields[key][1])}; llama.cpp writes no such key")
        else:
            (our_types, our_value), (their_types, their_value) = ours.fields[key], theirs.fields[key]
            if our_types != their_types:
                problems.append(f"{key}: type {'/'.join(t.name for t in our_types)}, llama.cpp "
                                f"{'/'.join(t.name for t in their_types)}")
            elif our_value != their_value:
                problems.append(f"{key}: {value_difference(our_value, their_value)}")
    return problems


def tensor_differences(ours: Snapshot, theirs: Snapshot, *, data: bool = True) -> list[str]:
    mine, other = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    problems = [f"{name}: only in ours" for name in sorted(mine.keys() - other.keys())]
    problems += [f"{name}: only in llama.cpp's" for name in sorted(other.keys() - mine.keys())]
    for name in sorted(mine.keys() & other.keys()):
        a, b = mine[name], other[name]
        if a.tensor_type != b.tensor_type:
            problems.append(f"{name}: type {a.tensor_type.name}, llama.cpp {b.tensor_type.name}")
        elif list(a.shape) != list(b.shape):
            problems.append(f"{name}: shape {list(a.shape)}, llama.cpp {list(b.shape)}")
        elif data and not (a.data.shape == b.data.shape and np.array_equal(a.data, b.data)):
            problems.append(f"{name}: data differs")
    return problems


def report(what: str, problems: list[str]) -> str:
    return f"{len(problems)} {what} differ from llama.cpp's convert_hf_to_gguf.py:\n  " + "\n  ".join(problems)


@pytest.fixture(params=CASES, ids=case_id)
def pair(request: pytest.FixtureRequest, conversions: Conversions) -> tuple[Snapshot, Snapshot]:
    kind, outtype = request.param
    return conversions.ours(kind, outtype), conversions.theirs(kind, outtype)


def test_metadata_matches(pair: tuple[Snapshot, Snapshot]) -> None:
    problems = metadata_differences(*pair)
    assert not problems, report("key-values", problems)


def test_tensors_match(pair: tuple[Snapshot, Snapshot]) -> None:
    ours, theirs = pair
    assert len(ours.tensors) == len(theirs.tensors) > 0
    problems = tensor_differences(ours, theirs)
    assert not problems, report("tensors", problems)


def test_layout_and_name_match(pair: tuple[Snapshot, Snapshot]) -> None:
    ours, theirs = pair
    common = ours.fields.keys() & theirs.fields.keys()  # missing keys are test_metadata_matches' to report
    assert [k for k in ours.fields if k in common] == [k for k in theirs.fields if k in common], "key order"
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors], "tensor order"
    assert ours.path.name == theirs.path.name, "file name"


def test_files_are_identical(pair: tuple[Snapshot, Snapshot]) -> None:
    """The sum of the above: byte for byte what llama.cpp writes (the tests above say where a difference is)."""
    ours, theirs = pair
    same = filecmp.cmp(ours.path, theirs.path, shallow=False)
    assert same, f"{ours.path.name} ({ours.path.stat().st_size} bytes) differs from llama.cpp's " \
                 f"({theirs.path.stat().st_size} bytes)"


@pytest.mark.parametrize("quant", QUANTS)
def test_quantized_from_each_sides_bf16_match(conversions: Conversions, quant: str) -> None:
    """llama.cpp's quantizer picks the same type for every tensor (and gives the same bytes) from either bf16."""
    ours, theirs = conversions.quantized("ours", "hub", quant), conversions.quantized("theirs", "hub", quant)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    problems = tensor_differences(ours, theirs)
    assert not problems, report(f"{quant} tensors", problems)
    types = {t.tensor_type.name for t in ours.tensors}
    assert types > {"F32"}, f"{quant} quantized nothing: {types}"
