"""models.lock: the exact bytes a model is made from, and the GGUFs made from them, so a pull can be reproduced.

The file is JSON (readable and writable with the standard library on every supported Python):

    {"format": 1, "models": {"Qwen/Qwen3-4B-Thinking-2507": {
        "revision": "<40-hex commit>",
        "files": {"config.json": {"size": 726, "sha256": "<64 hex>"}, ...},
        "gguf": {"Qwen3-4B-Thinking-2507-Q4_K_M.gguf": {"quant": "q4_k_m", "size": ..., "sha256": ...,
                 "localqwen": "0.1.0", "llama_cpp_python": "0.3.36", "gguf": "0.19.0"}}}}}

Every value is measured from real bytes by `localqwen pull` or `localqwen lock`; a field nobody measured yet stays
empty ("" or {}). The lock in use is `--lock FILE`, else `models.lock` in the store, seeded from the one shipped with
localqwen (see `load_lock`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from localqwen.errors import HubError, LocalqwenError
from localqwen.fileio import atomic_output

LOCK_FORMAT = 1
LOCK_NAME = "models.lock"
HASH_CHUNK = 4 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")
COMMIT = re.compile(r"[0-9a-f]{40}")
TOOLS = ("localqwen", "llama_cpp_python", "gguf")  # the packages whose versions decide a GGUF's bytes


@dataclass(frozen=True)
class FilePin:
    size: int
    sha256: str


@dataclass(frozen=True)
class GGUFPin:
    """A GGUF localqwen made, and the versions of the tools that made it (same tools, same input: same bytes)."""

    quant: str
    size: int
    sha256: str
    localqwen: str
    llama_cpp_python: str
    gguf: str

    def tools(self) -> tuple[str, str, str]:
        return self.localqwen, self.llama_cpp_python, self.gguf


@dataclass
class ModelPin:
    """One repository: its revision, every source file it was pulled from, every GGUF made from them."""

    revision: str = ""
    files: dict[str, FilePin] = field(default_factory=dict)
    gguf: dict[str, GGUFPin] = field(default_factory=dict)

    @property
    def pinned(self) -> bool:
        return bool(self.revision and self.files)

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision,
                "files": {name: asdict(pin) for name, pin in sorted(self.files.items())},
                "gguf": {name: asdict(pin) for name, pin in sorted(self.gguf.items())}}


@dataclass
class Lock:
    path: Path
    models: dict[str, ModelPin]

    def entry(self, repo: str) -> ModelPin:
        """The repository's entry, created (empty) if the lock has none yet."""
        return self.models.setdefault(repo, ModelPin())

    def to_json(self) -> dict[str, Any]:
        return {"format": LOCK_FORMAT, "models": {repo: pin.to_json() for repo, pin in sorted(self.models.items())}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


def tool_versions() -> dict[str, str]:
    """The installed versions of the packages that decide a GGUF's bytes ("" where one cannot be found)."""
    names = {"localqwen": "localqwen", "llama_cpp_python": "llama-cpp-python", "gguf": "gguf"}
    versions = {}
    for key, package in names.items():
        try:
            versions[key] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[key] = ""
    return versions


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
    except OSError as exc:
        raise HubError(f"cannot read the file ({exc.strerror or exc})", path) from None
    return digest.hexdigest()


def pin_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> FilePin:
    return FilePin(path.stat().st_size, sha256_file(path, on_bytes))


# --- reading -----------------------------------------------------------------------------------------------------

def _fail(path: Path, where: str, problem: str) -> LocalqwenError:
    return HubError(f"not a valid lock file: {where}: {problem}", path)


def _pin(raw: Any, path: Path, where: str, keys: dict[str, type]) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) != set(keys):
        raise _fail(path, where, f"needs exactly the keys {', '.join(keys)}")
    for key, kind in keys.items():
        value = raw[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise _fail(path, where, f"{key} must be a {'non-negative integer' if kind is int else 'string'}")
    if not SHA256.fullmatch(raw["sha256"]):
        raise _fail(path, where, "sha256 must be 64 lowercase hex digits")
    return raw


def _model(raw: Any, path: Path, repo: str) -> ModelPin:
    if not isinstance(raw, dict) or set(raw) - {"revision", "files", "gguf"}:
        raise _fail(path, repo, "an entry holds only revision, files and gguf")
    revision, files, gguf = raw.get("revision", ""), raw.get("files", {}), raw.get("gguf", {})
    if not isinstance(revision, str) or (revision and not COMMIT.fullmatch(revision)):
        raise _fail(path, repo, "revision must be a 40-hex commit id or empty")
    if not isinstance(files, dict) or not isinstance(gguf, dict):
        raise _fail(path, repo, "files and gguf must be objects keyed by file name")
    file_keys = {"size": int, "sha256": str}
    gguf_keys = {"quant": str, "size": int, "sha256": str, **dict.fromkeys(TOOLS, str)}
    return ModelPin(
        revision=revision,
        files={name: FilePin(**_pin(pin, path, f"{repo} {name}", file_keys)) for name, pin in files.items()},
        gguf={name: GGUFPin(**_pin(pin, path, f"{repo} {name}", gguf_keys)) for name, pin in gguf.items()},
    )


def read_lock(path: Path) -> Lock:
    """Parse and check a lock file; a missing file is an empty lock (written on the first save)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Lock(path, {})
    except OSError as exc:
        raise HubError(f"cannot read the lock file ({exc.strerror or exc})", path) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HubError(f"not a valid lock file: JSON error at line {exc.lineno}: {exc.msg}", path) from None
    if not isinstance(raw, dict) or raw.get("format") != LOCK_FORMAT or not isinstance(raw.get("models"), dict):
        raise _fail(path, "top level", f'needs "format": {LOCK_FORMAT} and a "models" object')
    return Lock(path, {repo: _model(entry, path, repo) for repo, entry in raw["models"].items()})


def packaged_lock_path() -> Path | None:
    """The models.lock shipped with localqwen: the checkout's root in a source (editable) install, package data in a
    wheel."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / LOCK_NAME).is_file():
        return root / LOCK_NAME
    packaged = resources.files("localqwen") / "data" / LOCK_NAME
    return Path(str(packaged)) if packaged.is_file() else None


def load_lock(path: Path | None, store_lock: Path) -> Lock:
    """`--lock FILE` exactly as it is; else the store's lock, with the shipped lock's pins for repositories it has
    not pinned itself (that is how the store's lock is seeded, and how pins in a newer localqwen reach it)."""
    if path is not None:
        return read_lock(path)
    lock = read_lock(store_lock)
    shipped = packaged_lock_path()
    if shipped is not None:
        for repo, entry in read_lock(shipped).models.items():
            own = lock.models.get(repo)
            if own is None or (not own.revision and entry.revision):
                lock.models[repo] = entry
    return lock


# --- checking ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mismatch:
    name: str
    problem: str


def compare_files(entry: ModelPin, measured: dict[str, FilePin], *, complete: bool) -> list[Mismatch]:
    """What differs between the pinned and the measured files. `complete`: the measured files are the whole set
    (a checkpoint), so pinned files that are missing and unpinned extras count too; otherwise (single files from a
    GGUF repository) only files both sides know are compared."""
    if not entry.files:
        return []
    problems = []
    for name, got in sorted(measured.items()):
        want = entry.files.get(name)
        if want is None:
            if complete:
                problems.append(Mismatch(name, "is not in the lock's entry"))
        elif got.size != want.size:
            problems.append(Mismatch(name, f"is {got.size} bytes, the lock pins {want.size}"))
        elif got.sha256 != want.sha256:
            problems.append(Mismatch(name, f"has sha256 {got.sha256[:12]}..., the lock pins {want.sha256[:12]}..."))
    if complete:
        missing = sorted(set(entry.files) - set(measured))
        problems += [Mismatch(name, "is pinned but was not downloaded") for name in missing]
    return problems
