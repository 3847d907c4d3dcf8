"""Bad input: one clear line naming the file, a non-zero exit, and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from localqwen.cli import cli
from localqwen.synthetic import QwenShape, write_checkpoint


@pytest.fixture()
def broken(checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the session checkpoint that a test may damage."""
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rewrite_header(shard: Path, change: Callable[[dict], None]) -> None:
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    shard.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + n:])


def first_shard_with(folder: Path, tensor: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][tensor]


def wrong_architecture(folder: Path) -> None:
    edit_json(folder / "config.json", lambda c: c.update(architectures=["LlamaForCausalLM"]))


def missing_tensor(folder: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_header(first_shard_with(folder, name), lambda h: h.pop(name))
    edit_json(folder / "model.safetensors.index.json", lambda i: i["weight_map"].pop(name))


def wrong_shape(folder: Path) -> None:
    edit_json(folder / "config.json", lambda c: c.update(intermediate_size=1024))


def truncated_shard(folder: Path) -> None:
    shard = first_shard_with(folder, "model.embed_tokens.weight")
    os.truncate(shard, shard.stat().st_size // 2)


def corrupt_header(folder: Path) -> None:
    shard = first_shard_with(folder, "model.norm.weight")
    raw = bytearray(shard.read_bytes())
    raw[8:24] = b"\xff" * 16
    shard.write_bytes(bytes(raw))


def missing_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def wrong_dtype(folder: Path) -> None:
    name = "model.norm.weight"
    rewrite_header(first_shard_with(folder, name), lambda h: h[name].update(dtype="I16"))


def shard_not_in_index(folder: Path) -> None:
    edit_json(folder / "model.safetensors.index.json",
              lambda i: i["weight_map"].update({"model.norm.weight": "model-00009-of-00009.safetensors"}))


CASES = {
    wrong_architecture: ("config.json", "architecture LlamaForCausalLM is not supported"),
    missing_tensor: ("ckpt: ", "tensor model.layers.1.mlp.up_proj.weight is missing"),
    wrong_shape: (".safetensors", "config.json implies"),
    truncated_shard: (".safetensors", "truncated"),
    corrupt_header: (".safetensors", "corrupt safetensors header"),
    missing_tokenizer: ("tokenizer.json", "tokenizer file missing"),
    wrong_dtype: (".safetensors", "dtype I16"),
    shard_not_in_index: ("model-00009-of-00009.safetensors", "missing"),
}


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("damage", list(CASES), ids=[f.__name__ for f in CASES])
def test_bad_checkpoint_is_one_clear_line(broken: Path, tmp_path: Path, damage: Callable[[Path], None]) -> None:
    damage(broken)
    out = tmp_path / "out"
    out.mkdir()
    code, output = run_cli("convert", str(broken), "--quant", "q8_0", "--outdir", str(out), "--quiet")
    file_hint, message = CASES[damage]
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1, output
    assert lines[0].startswith("Error: ") and file_hint in lines[0] and message in lines[0], lines[0]
    assert "Traceback" not in output
    assert list(out.iterdir()) == []


def test_unknown_quant_and_unwritable_output(checkpoint: Path, tmp_path: Path) -> None:
    code, output = run_cli("convert", str(checkpoint), "--quant", "q4_k_x", "--outdir", str(tmp_path))
    assert code == 1 and "unknown quantization 'q4_k_x'" in output
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, output = run_cli("convert", str(checkpoint), "--quant", "q8_0", "--outdir", str(locked), "--quiet")
        if os.geteuid() != 0:  # root ignores permission bits; the check is still exercised by the missing folder
            assert code == 1 and "not writable" in output
    finally:
        locked.chmod(0o700)
    code, output = run_cli("convert", str(checkpoint), "--outdir", str(tmp_path / "nope"), "--quiet")
    assert code == 1 and "output folder does not exist" in output


def test_existing_output_needs_force(checkpoint: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    target.write_bytes(b"precious")
    code, output = run_cli("convert", str(checkpoint), "--quant", "q8_0", "--outfile", str(target), "--quiet")
    assert code == 1 and "already exists" in output and target.read_bytes() == b"precious"
    code, output = run_cli("convert", str(checkpoint), "--quant", "q8_0", "--outfile", str(target), "--quiet",
                           "--force")
    assert code == 0 and target.read_bytes()[:4] == b"GGUF"


def test_not_a_checkpoint(tmp_path: Path) -> None:
    code, output = run_cli("convert", str(tmp_path), "--quiet")
    assert code == 1 and "config.json: file not found" in output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_nothing_behind(tmp_path: Path, sig: signal.Signals) -> None:
    # Big enough that quantizing takes a few seconds, so the signal lands mid-way.
    shape = QwenShape(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=128)
    folder = write_checkpoint(tmp_path / "ckpt", shape, shards=1)
    out = tmp_path / "out"
    out.mkdir()
    # SIGINT at its default, as a terminal's foreground command has it (a test run started as a background job of a
    # shell inherits it ignored, and so would the child).
    child = subprocess.Popen([sys.executable, "-m", "localqwen", "convert", str(folder), "--quant", "q4_k_m",
                              "--outdir", str(out), "--quiet"], stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in out.iterdir()):
        assert child.poll() is None and time.monotonic() < deadline, "conversion ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(0.5)
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode != 0
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == []

