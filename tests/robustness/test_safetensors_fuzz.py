"""Damaged checkpoints: every mutation of headers, index and config is a one-line LocalqwenError or converts."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest

from localqwen.convert.checkpoint import load_checkpoint
from localqwen.errors import LocalqwenError
from localqwen.synthetic import TINY, write_checkpoint

SEED = 7


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("st") / "ckpt", TINY, shards=2)


def shard_header_edits(raw: bytes, rng: random.Random) -> bytes:
    """Mutate the JSON header of a safetensors file: bit flips, or a value swapped for a hostile one."""
    n = int.from_bytes(raw[:8], "little")
    header = bytearray(raw[8:8 + n])
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(header))
            header[i] ^= 1 << rng.randrange(8)
        return raw[:8] + bytes(header) + raw[8 + n:]
    meta = json.loads(header)
    name = rng.choice([k for k in meta if k != "__metadata__"])
    field = rng.choice(["dtype", "shape", "data_offsets"])
    meta[name][field] = rng.choice([None, "x", -1, 2**64, [2**62, 2**62], [-5, 3], {"a": 1}, [], [1.5], "F64"])
    encoded = json.dumps(meta).encode()
    return len(encoded).to_bytes(8, "little") + encoded + raw[8 + n:]


def mutate(folder: Path, rng: random.Random) -> str:
    shards = sorted(folder.glob("*.safetensors"))
    kind = rng.choice(["header", "header", "length", "index", "config"])
    if kind in ("header", "length"):
        shard = rng.choice(shards)
        raw = shard.read_bytes()
        if kind == "length":
            raw = struct.pack("<Q", rng.choice([0, 1, 7, 2**63, len(raw), len(raw) * 2])) + raw[8:]
        else:
            raw = shard_header_edits(raw, rng)
        shard.write_bytes(raw)
        return f"{kind}:{shard.name}"
    path = folder / ("model.safetensors.index.json" if kind == "index" else "config.json")
    data = json.loads(path.read_text())
    target = data["weight_map"] if kind == "index" else data
    key = rng.choice(list(target))
    target[key] = rng.choice([None, 0, -1, 2**64, "../../etc/passwd", [], {}, 1.5, True, "model.safetensors"])
    path.write_text(json.dumps(data))
    return f"{kind}:{key}"


def test_mutated_checkpoints_fail_cleanly(pristine: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    refused = 0
    for i in range(150):
        folder = Path(shutil.copytree(pristine, tmp_path / f"c{i}", copy_function=shutil.copy))
        what = mutate(folder, rng)
        try:
            load_checkpoint(folder)
        except LocalqwenError as exc:
            refused += 1
            assert "\n" not in str(exc), what
        shutil.rmtree(folder)
    assert refused > 100
