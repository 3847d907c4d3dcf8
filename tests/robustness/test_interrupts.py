"""Conversion under SIGKILL and a full disk: never a partial file under the final name, and the next run recovers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localqwen.synthetic import QwenShape, write_checkpoint

MEDIUM = QwenShape(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=128)


def convert_cmd(folder: Path, out: Path, *quants: str) -> list[str]:
    return [sys.executable, "-m", "localqwen", "convert", str(folder), *[a for q in quants for a in ("--quant", q)],
            "--outdir", str(out), "--quiet"]


def test_sigkill_then_rerun_recovers(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt", MEDIUM, shards=1)
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen(convert_cmd(folder, out, "q4_k_m"), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in out.iterdir()):
        assert child.poll() is None and time.monotonic() < deadline, "conversion ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)
    child.send_signal(signal.SIGKILL)  # no cleanup can run
    child.wait()
    leftovers = [p.name for p in out.iterdir()]
    assert leftovers and all(name.startswith(".") and name.endswith(".partial") for name in leftovers)
    result = subprocess.run(convert_cmd(folder, out, "q4_k_m"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    names = [p.name for p in out.iterdir()]
    assert len(names) == 1 and names[0].endswith("-Q4_K_M.gguf")  # complete, and the debris is gone
    assert (out / names[0]).read_bytes()[:4] == b"GGUF"


@pytest.fixture()
def small_disk(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path: Path, small_disk: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt", shards=1)  # TINY: its f32 GGUF (~40 MB) cannot fit in 12 MB
    result = subprocess.run(convert_cmd(folder, small_disk, "f32"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and "no space left on the device" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(small_disk.iterdir()) == []
