"""`localqwen pull` end to end: the real huggingface_hub client against a stand-in hub on 127.0.0.1 (tests/hubserver.py)
serving a tiny checkpoint in 3 shards. Each pull runs the CLI in a subprocess, because huggingface_hub reads
HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, when it is imported; each gets a private HF_HOME and LOCALQWEN_HOME."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from localqwen.cli.models import verify_command
from localqwen.constants import DEFAULT_REPO
from localqwen.convert import convert
from localqwen.lock import FilePin, Lock, ModelPin, pin_file, read_lock, sha256_file, tool_versions
from localqwen.synthetic import TINY, write_checkpoint

from .hubserver import StandInHub

REPO = "test-org/Qwen3-Tiny-Thinking"
GGUF_REPO = "test-org/Qwen3-Tiny-Thinking-GGUF"
BIG = "model-00001-of-00003.safetensors"  # the embedding: 19 MB, more than one 10 MiB download chunk
SMALL = "model-00003-of-00003.safetensors"
BOOT = "from localqwen.cli import main; main()"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_checkpoint(tmp_path_factory.mktemp("hub") / "Qwen3-Tiny-Thinking", TINY, seed=3, shards=3)
    (folder / "README.md").write_text("# A tiny stand-in for Qwen3-4B-Thinking-2507\n")
    assert (folder / BIG).stat().st_size > 15_000_000
    return folder


@pytest.fixture(scope="module")
def server(source: Path) -> Iterator[StandInHub]:
    with StandInHub() as hub:
        hub.add_repo(REPO, source)
        yield hub


@pytest.fixture
def hub(server: StandInHub) -> StandInHub:
    server.reset()
    return server


def pins_of(folder: Path) -> dict[str, FilePin]:
    return {p.name: pin_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def localqwen(*args: str, hub: StandInHub, hf_home: Path, home: Path, offline: bool = False,
              endpoint: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "LOCALQWEN_HOME"))}
    env.update(HF_ENDPOINT=endpoint or hub.url, HF_HOME=str(hf_home), LOCALQWEN_HOME=str(home),
               HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", BOOT, *args], env=env, capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command prints (huggingface_hub's own warnings may come before it)."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def store_files(home: Path) -> list[str]:
    folder = home / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def pulled(server: StandInHub, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One full pull (the default quant, q4_k_m); its HF cache is reused by the offline test."""
    server.reset()
    hf_home, home = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("home")
    result = localqwen("pull", REPO, hub=server, hf_home=hf_home, home=home)
    assert result.returncode == 0, result.stderr
    return hf_home, home, result.stdout


def test_pull_downloads_converts_and_pins(pulled: tuple[Path, Path, str], server: StandInHub, source: Path) -> None:
    hf_home, home, stdout = pulled
    [line] = stdout.splitlines()
    gguf = Path(line)
    assert gguf.parent == home / "models" and gguf.name.endswith("-Q4_K_M.gguf") and gguf.is_file()
    assert store_files(home) == [gguf.name]  # the workspace is gone
    lock = read_lock(home / "models.lock")
    entry = lock.models[REPO]
    assert entry.revision == server.repos[REPO].commit
    assert entry.files == pins_of(source)  # every file, measured from the downloaded bytes
    assert entry.gguf == {gguf.name: entry.gguf[gguf.name]}
    made = entry.gguf[gguf.name]
    assert (made.quant, made.size, made.sha256) == ("q4_k_m", gguf.stat().st_size, sha256_file(gguf))
    assert {"localqwen": made.localqwen, "llama_cpp_python": made.llama_cpp_python, "gguf": made.gguf} == \
        tool_versions()
    assert lock.models[DEFAULT_REPO] == ModelPin()  # seeded from the shipped lock: nothing measured yet
    assert (hf_home / "hub" / "models--test-org--Qwen3-Tiny-Thinking" / "blobs").is_dir()  # the shared HF cache


def test_second_pull_needs_no_network(pulled: tuple[Path, Path, str], hub: StandInHub) -> None:
    hf_home, home, stdout = pulled
    result = localqwen("pull", REPO, hub=hub, hf_home=hf_home, home=home)
    assert result.returncode == 0 and result.stdout == stdout, result.stderr
    assert "already in the store" in result.stderr
    assert hub.repo_requests(REPO) == []


def test_convert_of_a_repo_id_makes_the_bytes_pull_made(pulled: tuple[Path, Path, str], hub: StandInHub,
                                                        tmp_path: Path) -> None:
    hf_home, home, stdout = pulled
    pulled_file = Path(stdout.strip())
    result = localqwen("convert", REPO, "--quant", "q4_k_m", "--outdir", str(tmp_path), "--quiet", hub=hub,
                       hf_home=hf_home, home=home, offline=True)  # from the HF cache the pull filled
    assert result.returncode == 0, result.stderr
    made = tmp_path / pulled_file.name  # named after the repository, not the cache's commit folder
    assert sha256_file(made) == sha256_file(pulled_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == [made.name]


def test_dropped_connection_resumes_with_a_range_request(hub: StandInHub, tmp_path: Path, source: Path) -> None:
    hub.drop_once[BIG] = 15_000_000
    result = localqwen("pull", REPO, "-q", "f16", hub=hub, hf_home=tmp_path / "hf", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    first, second = hub.gets(BIG)
    assert "Range" not in first.headers
    start = int(second.headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= 15_000_000  # resumed where the received bytes end, not from the start
    assert read_lock(tmp_path / "home" / "models.lock").models[REPO].files[BIG] == pin_file(source / BIG)
    assert [p for p in store_files(tmp_path / "home") if p.endswith("-F16.gguf")]


def test_interrupted_pull_keeps_finished_files(hub: StandInHub, tmp_path: Path) -> None:
    hub.fail.add(SMALL)
    where = {"hub": hub, "hf_home": tmp_path / "hf", "home": tmp_path / "home"}
    failed = localqwen("pull", REPO, "-q", "f16", **where)
    assert "failed" in error_line(failed) and "Pull again" in error_line(failed)
    assert not [p for p in store_files(tmp_path / "home") if p.endswith(".gguf")]
    assert len(hub.gets(BIG)) == 1
    hub.fail.clear()
    result = localqwen("pull", REPO, "-q", "f16", **where)
    assert result.returncode == 0, result.stderr
    assert len(hub.gets(BIG)) == 1 and len(hub.gets(SMALL)) == 2  # only the missing file was fetched again


def test_tampered_file_is_refused_and_nothing_converted(hub: StandInHub, tmp_path: Path, source: Path) -> None:
    lock_file = tmp_path / "pins.lock"
    Lock(lock_file, {REPO: ModelPin(hub.repos[REPO].commit, pins_of(source))}).save()
    pinned = lock_file.read_bytes()
    good = (source / SMALL).read_bytes()
    hub.tampered[SMALL] = good[:-1] + bytes([good[-1] ^ 1])  # same size, one bit flipped
    where = {"hub": hub, "hf_home": tmp_path / "hf", "home": tmp_path / "home"}
    refused = localqwen("pull", REPO, "-q", "f16", "--lock", str(lock_file), **where)
    line = error_line(refused)
    assert line.startswith(f"Error: {REPO}/{SMALL}: has sha256 ") and "the lock pins" in line
    assert str(lock_file) in line and "nothing was converted" in line
    assert store_files(tmp_path / "home") == [] and lock_file.read_bytes() == pinned
    cached = tmp_path / "hf" / "hub" / "models--test-org--Qwen3-Tiny-Thinking" / "blobs"
    assert sorted(p.name for p in cached.iterdir()).count(pin_file(source / SMALL).sha256) == 0  # evicted

    hub.tampered.clear()
    result = localqwen("pull", REPO, "-q", "f16", "--lock", str(lock_file), **where)
    assert result.returncode == 0, result.stderr
    assert len(hub.gets(SMALL)) == 2 and len(hub.gets(BIG)) == 1
    assert read_lock(lock_file).models[REPO].files == pins_of(source)  # the pins were kept, GGUF recorded
    assert list(read_lock(lock_file).models[REPO].gguf) == [Path(result.stdout.strip()).name]


def test_offline_pull_uses_the_cache(pulled: tuple[Path, Path, str], hub: StandInHub, tmp_path: Path) -> None:
    hf_home, _, _ = pulled
    result = localqwen("pull", REPO, "-q", "f16", hub=hub, hf_home=hf_home, home=tmp_path, offline=True)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_file()
    assert hub.requests == []


def test_offline_pull_without_cache_says_what_to_do(hub: StandInHub, tmp_path: Path) -> None:
    refused = localqwen("pull", REPO, hub=hub, hf_home=tmp_path / "hf", home=tmp_path / "home", offline=True)
    line = error_line(refused)
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in line and "localqwen convert PATH/TO/CHECKPOINT" in line
    assert hub.requests == []


def test_unreachable_hub_and_unknown_repo(hub: StandInHub, tmp_path: Path) -> None:
    where = {"hub": hub, "hf_home": tmp_path / "hf", "home": tmp_path / "home"}
    with socket.socket() as closed:  # a port nothing listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        line = error_line(localqwen("pull", REPO, endpoint=endpoint, **where))
    assert f"the hub ({endpoint}) cannot be reached" in line and "localqwen convert PATH/TO/CHECKPOINT" in line
    line = error_line(localqwen("pull", "test-org/No-Such-Model", **where))
    assert line == f"Error: test-org/No-Such-Model is not on the hub ({hub.url}), or is private (set HF_TOKEN)"
    assert store_files(tmp_path / "home") == []


def test_pull_a_ready_gguf(hub: StandInHub, tmp_path: Path, source: Path) -> None:
    folder = tmp_path / "gguf-repo"
    folder.mkdir()
    [made] = convert(str(source), ["q8_0"], outdir=folder, quiet=True)
    hub.add_repo(GGUF_REPO, folder)
    where = {"hub": hub, "hf_home": tmp_path / "hf", "home": tmp_path / "home"}
    result = localqwen("pull", "--gguf", f"{GGUF_REPO}:{made.name}", **where)
    assert result.returncode == 0, result.stderr
    stored = Path(result.stdout.strip())
    assert stored == tmp_path / "home" / "models" / made.name and sha256_file(stored) == sha256_file(made)
    entry = read_lock(tmp_path / "home" / "models.lock").models[GGUF_REPO]
    assert entry.revision == hub.repos[GGUF_REPO].commit and entry.files == {made.name: pin_file(made)}

    stored.unlink()  # pull it again from a fresh cache while the hub serves other bytes: the lock refuses them
    data = made.read_bytes()
    hub.tampered[made.name] = data[:-1] + bytes([data[-1] ^ 1])
    refused = localqwen("pull", "--gguf", f"{GGUF_REPO}:{made.name}", hub=hub, hf_home=tmp_path / "hf2",
                        home=tmp_path / "home")
    assert error_line(refused).startswith(f"Error: {GGUF_REPO}/{made.name}: has sha256")
    assert not stored.exists()


def test_lock_then_pull_then_verify(hub: StandInHub, tmp_path: Path, source: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    lock_file = tmp_path / "project.lock"
    where = {"hub": hub, "hf_home": tmp_path / "hf", "home": tmp_path / "home"}
    result = localqwen("lock", REPO, "--lock", str(lock_file), **where)
    assert result.returncode == 0, result.stderr
    entry = read_lock(lock_file).models[REPO]
    assert (entry.revision, entry.files, entry.gguf) == (hub.repos[REPO].commit, pins_of(source), {})

    moved = localqwen("pull", REPO, "--revision", "0" * 40, "--lock", str(lock_file), **where)
    assert f"pinned to revision {entry.revision}" in error_line(moved)

    result = localqwen("pull", REPO, "-q", "f16", "--lock", str(lock_file), **where)
    assert result.returncode == 0, result.stderr
    gguf = Path(result.stdout.strip())
    assert list(read_lock(lock_file).models[REPO].gguf) == [gguf.name]

    monkeypatch.setenv("LOCALQWEN_HOME", str(tmp_path / "home"))
    ok = CliRunner().invoke(verify_command, ["--lock", str(lock_file)])
    assert ok.exit_code == 0 and ok.output.startswith(f"ok        {gguf}"), ok.output
    as_json = CliRunner().invoke(verify_command, ["--lock", str(lock_file), "--json"])
    assert json.loads(as_json.output) == [{"path": str(gguf), "status": "ok", "detail": ""}]
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 1
    gguf.write_bytes(bytes(data))
    bad = CliRunner().invoke(verify_command, ["--lock", str(lock_file)])
    assert bad.exit_code == 1 and f"mismatch  {gguf}" in bad.output
    assert "1 file(s) in the store do not match the lock" in bad.output
