"""Hundreds of damaged GGUF files: every one is refused with a clear error or loads; none crashes or hangs.

Mutations are deterministic (seeded): truncations, bit flips in the header, and header fields rewritten to huge or
inconsistent values. In-process, the header reader and model check must raise LocalqwenError or pass, quickly.
Files that pass are then run through `localqwen run` in a child process: it must exit 0 or 1, never by a signal.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from localqwen.convert import convert
from localqwen.errors import LocalqwenError
from localqwen.gguf_header import read_header
from localqwen.metadata import read_metadata
from localqwen.modelcheck import check_model
from localqwen.synthetic import TINY, write_checkpoint

SEED = 20261121


@pytest.fixture(scope="module")
def seed_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tmp = tmp_path_factory.mktemp("seed")
    [path] = convert(str(write_checkpoint(tmp / "tiny", TINY, shards=1)), ["q8_0"], outdir=tmp, quiet=True)
    return path.read_bytes()


def header_end(data: bytes) -> int:
    """Where tensor data begins: mutations aimed at the header stay before it."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        return read_header(f.name).data_offset


def string_length_offsets(data: bytes, end: int) -> list[int]:
    """Offsets of the u64 length prefixes of metadata keys (found by their "general."/"qwen3."/"tokenizer." text)."""
    offsets = []
    for prefix in (b"general.", b"qwen3.", b"tokenizer."):
        start = 0
        while (i := data.find(prefix, start, end)) >= 0:
            offsets.append(i - 8)
            start = i + 1
    return [o for o in offsets if o >= 24]


def mutations(data: bytes) -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    end = header_end(data)
    cases: list[tuple[str, bytes]] = []
    for _ in range(60):  # truncations, mostly inside the header and the first tensors
        cut = rng.choice([rng.randrange(0, end), rng.randrange(end, len(data))])
        cases.append((f"truncate@{cut}", data[:cut]))
    for _ in range(180):  # bit flips in the header
        raw = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(0, end)
            raw[i] ^= 1 << rng.randrange(8)
        cases.append(("flip", bytes(raw)))
    huge = [2**63 - 1, 2**64 - 1, 2**40, 2**32, 0xFFFFFFFF]
    for field, at in (("tensor_count", 8), ("kv_count", 16)):
        for value in huge:
            raw = bytearray(data)
            raw[at:at + 8] = struct.pack("<Q", value)
            cases.append((f"{field}={value}", bytes(raw)))
    for at in string_length_offsets(data, end):  # oversize key lengths
        raw = bytearray(data)
        raw[at:at + 8] = struct.pack("<Q", rng.choice(huge))
        cases.append((f"length@{at}", bytes(raw)))
    for _ in range(40):  # random u32 overwrites: value types, dimension counts, tensor types
        raw = bytearray(data)
        i = rng.randrange(24, end - 4)
        raw[i:i + 4] = struct.pack("<I", rng.choice([0, 1, 7, 9, 13, 40, 255, 2**31]))
        cases.append((f"u32@{i}", bytes(raw)))
    return cases


def check(path: Path) -> bool:
    """True if the file passes validation, False if refused with LocalqwenError (anything else fails the test)."""
    try:
        check_model(read_metadata(path))
    except LocalqwenError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return False
    return True


def test_mutated_gguf_files_are_refused_or_loaded(seed_gguf: bytes, tmp_path: Path) -> None:
    cases = mutations(seed_gguf)
    assert len(cases) >= 300
    passed: list[tuple[str, Path]] = []
    for i, (name, data) in enumerate(cases):
        path = tmp_path / f"case{i}.gguf"
        path.write_bytes(data)
        started = time.monotonic()
        if check(path):
            passed.append((name, path))
        else:
            path.unlink()
        assert time.monotonic() - started < 2, f"{name}: validation took too long"
    refused = len(cases) - len(passed)
    print(f"{refused} of {len(cases)} mutated files refused, {len(passed)} passed validation")
    assert refused > len(cases) // 2
    # Files that pass validation (flips in values llama.cpp tolerates) must not crash llama.cpp.
    for name, path in random.Random(SEED).sample(passed, min(6, len(passed))):
        run_one(name, path)


def run_one(name: str, path: Path) -> None:
    cmd = [sys.executable, "-m", "localqwen", "run", "-m", str(path), "--ctx", "256", "--max-tokens", "2", "hi"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), f"{name}: exit {result.returncode}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, f"{name}: {result.stderr[-2000:]}"


@pytest.mark.parametrize("damage", [
    lambda d: b"GGUX" + d[4:],
    lambda d: d[:4] + struct.pack("<I", 99) + d[8:],
    lambda d: d[:10],
    lambda d: b"",
])
def test_obviously_broken_files_give_one_line(seed_gguf: bytes, tmp_path: Path,
                                              damage: Callable[[bytes], bytes]) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(damage(seed_gguf))
    assert not check(path)
    result = subprocess.run([sys.executable, "-m", "localqwen", "run", "-m", str(path), "hi"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
