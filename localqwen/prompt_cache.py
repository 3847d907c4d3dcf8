"""Long prompts' KV cache on disk, so a conversation re-opened later (in this process or the next) does not evaluate
its long start again: llama.cpp's sequence state (llama_state_seq_save_file / load_file) of every prompt of at least
MIN_TOKENS, restored into a slot when a later prompt shares at least MIN_TOKENS of its start.

Each entry is a state file and a JSON sidecar: its tokens, its size and sha256. Entries live in one folder per
*setting* (the model file's content fingerprint, the KV cache type and layout, the llama.cpp build), so a state is
never restored into another model or setting. A state is restored only if its bytes hash as recorded: a damaged or
truncated file is removed with a warning instead (llama.cpp could abort on it). The folder is kept under
`max_bytes`, least recently used entries going first.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

MIN_TOKENS = 1024  # shorter prompts evaluate in seconds; their states are not worth the disk
DEFAULT_MAX_BYTES = 8 << 30
SAMPLES, SAMPLE_BYTES = 64, 64 << 10  # the model fingerprint reads the header and this many spread samples
log = logging.getLogger("localqwen")


def model_fingerprint(path: Path) -> str:
    """A hash of the model file's content (its start and SAMPLES spread samples) and size: two files with other
    weights differ, however alike their metadata; reading it takes milliseconds."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        for i in range(SAMPLES):
            f.seek(size * i // SAMPLES)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def setting_key(path: Path, kv_type: str, flash_attn: bool) -> str:
    """What a saved state depends on: the model, the KV cache's type and layout (flash attention stores V
    untransposed), and the llama.cpp build (its state format)."""
    parts = [model_fingerprint(path), kv_type, f"fa{int(flash_attn)}", metadata.version("llama-cpp-python")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Entry:
    key: str
    tokens: np.ndarray  # int32
    size: int
    sha256: str
    used: float


class PromptCache:
    """The entries of one setting; used from the engine thread only (saves finish in a background thread)."""

    def __init__(self, folder: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, min_tokens: int = MIN_TOKENS) -> None:
        self.folder, self.max_bytes, self.min_tokens = folder, max_bytes, min_tokens
        self._entries: dict[str, Entry] | None = None  # read from the sidecars on first use
        self._lock = threading.Lock()  # the entries, shared with the background saver

    # --- looking up and restoring ----------------------------------------------------------------------------------

    def best(self, prompt: list[int], better_than: int, room: int) -> tuple[Entry, int] | None:
        """The entry sharing the longest start with `prompt` (at least min_tokens, more than `better_than`) among
        those of at most `room` tokens (what a slot holds), and how many tokens they share."""
        wanted = np.asarray(prompt, dtype=np.int32)
        best: tuple[Entry, int] | None = None
        with self._lock:
            entries = [e for e in self.entries().values() if len(e.tokens) <= room]
        for entry in entries:
            n = min(len(entry.tokens), len(wanted))
            diff = np.flatnonzero(entry.tokens[:n] != wanted[:n])
            shared = int(diff[0]) if diff.size else n
            if shared >= self.min_tokens and shared > better_than and (best is None or shared > best[1]):
                best = (entry, shared)
        return best

    def restore(self, ctx: Any, seq_id: int, entry: Entry) -> list[int] | None:
        """Load `entry` into sequence `seq_id` (which must be empty); its tokens, or None if it could not be used
        (a damaged entry is removed, with a warning)."""
        import llama_cpp

        state = self._path(entry.key, ".state")
        try:
            intact = state.stat().st_size == entry.size and file_sha256(state) == entry.sha256
        except OSError:
            intact = False
        if not intact:
            log.warning("localqwen: the prompt cache entry %s is damaged or incomplete; removed", state)
            with self._lock:
                self._remove(entry.key)
            return None
        tokens = (llama_cpp.llama_token * len(entry.tokens))()
        count = ctypes.c_size_t(0)
        if not llama_cpp.llama_state_seq_load_file(ctx, str(state).encode(), seq_id, tokens, len(tokens),
                                                   ctypes.byref(count)) or count.value != len(entry.tokens):
            log.warning("localqwen: llama.cpp could not load the prompt cache entry %s; removed", state)
            with self._lock:
                self._remove(entry.key)
            return None
        entry.used = time.time()
        with contextlib.suppress(OSError):
            self._path(entry.key, ".json").touch()
        return list(tokens[: count.value])

    # --- saving ----------------------------------------------------------------------------------------------------

    def wants(self, prompt: list[int]) -> bool:
        with self._lock:
            return len(prompt) >= self.min_tokens and self._key(prompt) not in self.entries()

    def save(self, ctx: Any, seq_id: int, prompt: list[int]) -> None:
        """Write the state of sequence `seq_id` (which holds exactly `prompt`); it becomes an entry once a
        background thread has hashed it, so a crash halfway leaves no entry that could be restored."""
        import llama_cpp

        key = self._key(prompt)
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self._path(key, f".state.{os.getpid()}.partial")
        tokens = (llama_cpp.llama_token * len(prompt))(*prompt)
        if not llama_cpp.llama_state_seq_save_file(ctx, str(partial).encode(), seq_id, tokens, len(prompt)):
            partial.unlink(missing_ok=True)
            return
        threading.Thread(target=self._finish_save, args=(key, partial, prompt), daemon=True).start()

    def _finish_save(self, key: str, partial: Path, prompt: list[int]) -> None:
        try:
            size, digest = partial.stat().st_size, file_sha256(partial)
            os.replace(partial, self._path(key, ".state"))
            sidecar = {"format": 1, "size": size, "sha256": digest, "tokens": prompt}
            tmp = self._path(key, f".json.{os.getpid()}.partial")
            tmp.write_text(json.dumps(sidecar), encoding="utf-8")
            os.replace(tmp, self._path(key, ".json"))
        except OSError as exc:
            log.warning("localqwen: could not save a prompt cache entry in %s (%s)", self.folder, exc.strerror)
            partial.unlink(missing_ok=True)
            return
        with self._lock:
            self.entries()[key] = Entry(key, np.asarray(prompt, dtype=np.int32), size, digest, time.time())
            self._evict()

    # --- the folder ------------------------------------------------------------------------------------------------

    def entries(self) -> dict[str, Entry]:
        if self._entries is None:
            self._entries = {}
            for sidecar in self.folder.glob("*.json") if self.folder.is_dir() else []:
                entry = self._read(sidecar)
                if entry is not None:
                    self._entries[entry.key] = entry
        return self._entries

    def _read(self, sidecar: Path) -> Entry | None:
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            tokens = np.asarray(data["tokens"], dtype=np.int32)
            if tokens.ndim != 1 or not isinstance(data["size"], int) or not isinstance(data["sha256"], str):
                raise ValueError("malformed")
            return Entry(sidecar.stem, tokens, data["size"], data["sha256"], sidecar.stat().st_mtime)
        except (OSError, ValueError, KeyError, TypeError, OverflowError):
            log.warning("localqwen: the prompt cache entry %s is unreadable; removed", sidecar)
            self._remove(sidecar.stem)
            return None

    def _evict(self) -> None:
        """Drop least recently used entries until the folder fits max_bytes (called holding the lock)."""
        entries = self.entries()
        total = sum(e.size for e in entries.values())
        for entry in sorted(entries.values(), key=lambda e: e.used):
            if total <= self.max_bytes:
                break
            total -= entry.size
            self._remove(entry.key)

    def _remove(self, key: str) -> None:
        """Forget an entry and delete its files (called holding the lock)."""
        if self._entries is not None:
            self._entries.pop(key, None)
        for suffix in (".json", ".state"):
            self._path(key, suffix).unlink(missing_ok=True)

    def _key(self, prompt: list[int]) -> str:
        return hashlib.sha256(np.asarray(prompt, dtype=np.int32).tobytes()).hexdigest()[:40]

    def _path(self, key: str, suffix: str) -> Path:
        return self.folder / f"{key}{suffix}"
