"""The model store: where models live (`LOCALQWEN_HOME` or the platform's data folder), how `-m` finds one, and the
flows that fill it: pull (download, verify against the lock, convert), lock (re-pin) and verify (re-hash).

    <home>/models/<name>.gguf     the models (`localqwen models` lists them)
    <home>/models.lock            the store's lock: the pins pull verifies against and records into
    <home>/models/.pull-*/        a pull's workspace (outputs appear in models/ only once verified)

Downloads stay in the shared Hugging Face cache (HF_HOME), where other tools find them too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localqwen.constants import DEFAULT_QUANT, DEFAULT_REPO, GGUF_ARCH, MODEL_NAME
from localqwen.convert import OUTPUT_TYPES
from localqwen.errors import HubError, LocalqwenError, ModelFileError
from localqwen.lock import (
    LOCK_NAME,
    FilePin,
    GGUFPin,
    Lock,
    ModelPin,
    compare_files,
    load_lock,
    pin_file,
    sha256_file,
    tool_versions,
)

if TYPE_CHECKING:
    from localqwen.hub import Snapshot
from localqwen.paths import DEFAULT_MODEL_FILE, home, models_dir

Echo = Callable[[str], None]


def store_lock_path() -> Path:
    return home() / LOCK_NAME


def _in_store(name: str) -> Path | None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    stored = models_dir() / name
    for candidate in (stored, stored.with_name(stored.name + ".gguf")):
        if candidate.is_file() and candidate.suffix == ".gguf":
            return candidate
    return None


def resolve_model(spec: str | None) -> Path:
    """`-m` as given: a GGUF path, a file name in the store (".gguf" optional), a quant of the default model
    ("q8_0"), or None for the default model."""
    if spec is None:
        path = models_dir() / DEFAULT_MODEL_FILE
        if not path.is_file():
            raise ModelFileError(default_model_help())
        return path
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    stored = _in_store(spec)
    if stored is None and spec.lower() in OUTPUT_TYPES:
        stored = _in_store(f"{MODEL_NAME}-{spec.upper()}.gguf")
    if stored is not None:
        return stored
    raise ModelFileError(f"model not found (not a file, nor a model in the store {models_dir()}: see "
                         "`localqwen models`)", spec)


def ensure_default_model(confirm: Callable[[str], bool] | None = None, echo: Echo = lambda line: None) -> Path:
    """The default model's path. When it is missing: pull it if `confirm(question)` says yes (the CLI asks the
    person at the terminal), else a ModelFileError that says how to get it."""
    path = models_dir() / DEFAULT_MODEL_FILE
    if path.is_file():
        return path
    question = (f"The default model {DEFAULT_MODEL_FILE} is not in the store. Pull {DEFAULT_REPO} now (about 8 GB "
                "download, then a few minutes of conversion)?")
    if confirm is None or not confirm(question):
        raise ModelFileError(default_model_help())
    [path] = pull(DEFAULT_REPO, [DEFAULT_QUANT], echo=echo)
    return path


def default_model_help() -> str:
    from localqwen.hub import convert_hint, offline

    why = " and offline mode is on (HF_HUB_OFFLINE=1), so it cannot be pulled" if offline() else ""
    pull = "" if offline() else f"run `localqwen pull` (downloads {MODEL_NAME}, about 8 GB, once), or "
    return (f"the default model {DEFAULT_MODEL_FILE} is not in the store ({models_dir()}){why}: {pull}"
            f"{convert_hint()}, or pass -m FILE.gguf")


# --- what is in the store ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredModel:
    name: str
    quant: str
    size: int
    context: int
    path: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_models() -> list[StoredModel]:
    """Every GGUF in the store, by name. A file that is not a valid GGUF is listed with quant "invalid"."""
    from localqwen.metadata import read_metadata

    found = []
    folder = models_dir()
    for path in sorted(folder.glob("*.gguf")) if folder.is_dir() else []:
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            meta = read_metadata(path)
            quant, context = meta.quant, meta.context_length or 0
        except LocalqwenError:
            quant, context = "invalid", 0
        found.append(StoredModel(path.stem, quant, path.stat().st_size, context, str(path)))
    return found


def remove_model(name: str) -> Path:
    """Delete one GGUF from the store, by its name in the store (never an arbitrary path)."""
    path = _in_store(name)
    if path is None:
        raise ModelFileError(f"no such model in the store {models_dir()} (see `localqwen models`)", name)
    path.unlink()
    return path


# --- pull --------------------------------------------------------------------------------------------------------

def _revision(entry: ModelPin, asked: str | None, repo: str, lock: Lock) -> str:
    if entry.revision and asked and asked != entry.revision:
        raise HubError(f"{repo} is pinned to revision {entry.revision} by {lock.path}, not {asked}: to move the "
                             f"pin run `localqwen lock {repo} --revision {asked}`")
    return entry.revision or asked or "main"


def _measure(files: dict[str, Path], quiet: bool) -> dict[str, FilePin]:
    from localqwen.progress import progress_bars

    with progress_bars(quiet) as bars:
        advance = bars.bytes("verifying", sum(p.stat().st_size for p in files.values()))
        return {name: pin_file(path, advance) for name, path in files.items()}


def _check_sources(entry: ModelPin, lock: Lock, snapshot: Snapshot, *, complete: bool,
                   quiet: bool) -> dict[str, FilePin]:
    """Hash the downloaded files; refuse when they differ from the pins, and evict the bad copies from the cache so
    that the next pull downloads them again."""
    from localqwen.hub import evict

    measured = _measure(snapshot.files, quiet)
    problems = compare_files(entry, measured, complete=complete)
    if not problems:
        return measured
    bad = [p.name for p in problems if p.name in snapshot.files and p.name in entry.files]
    for name in bad:
        evict(snapshot.files[name])
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    evicted = "; the bad copy was removed from the Hugging Face cache: pull again to download it again" if bad else ""
    raise HubError(f"{first.problem}{more}: refused by the lock {lock.path}, nothing was converted{evicted}. If "
                         f"the repository really changed, re-pin it with `localqwen lock {snapshot.repo}`",
                         f"{snapshot.repo}/{first.name}")


@contextlib.contextmanager
def _workspace() -> Iterator[Path]:
    """A folder inside the store (same disk: finished files are renamed into place), always removed. Its name
    carries our process id: workspaces of killed pulls (SIGKILL) are removed by the next one."""
    import psutil

    models_dir().mkdir(parents=True, exist_ok=True)
    for old in models_dir().glob(".pull-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f".pull-{os.getpid()}-", dir=models_dir()))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _place(made: Path, force: bool) -> Path:
    target = models_dir() / made.name
    if target.exists() and not force:
        if sha256_file(target) != sha256_file(made):
            raise LocalqwenError("already in the store with different bytes (use --force to replace it)", target)
        return target
    os.replace(made, target)
    return target


def _check_reproduced(entry: ModelPin, made: dict[str, GGUFPin], lock: Lock, echo: Echo) -> None:
    """A GGUF the same tool versions made before must come out byte for byte the same."""
    for name, pin in made.items():
        old = entry.gguf.get(name)
        if old is None or old.sha256 == pin.sha256:
            continue
        if old.tools() == pin.tools():
            raise HubError(f"the conversion did not reproduce the pinned file: sha256 {pin.sha256[:12]}..., the "
                                 f"lock {lock.path} pins {old.sha256[:12]}... for the same localqwen, llama-cpp-python "
                                 "and gguf versions; nothing was added to the store", name)
        echo(f"re-pinned {name}: made by localqwen {pin.localqwen}, llama-cpp-python {pin.llama_cpp_python}, gguf "
             f"{pin.gguf} (the lock's was made by {old.localqwen}, {old.llama_cpp_python}, {old.gguf})")


def pull(repo: str = DEFAULT_REPO, quants: Sequence[str] = (DEFAULT_QUANT,), *, revision: str | None = None,
         lock_file: Path | None = None, force: bool = False, quiet: bool = False,
         echo: Echo = lambda line: None) -> list[Path]:
    """Download `repo` (verified against the lock), convert it to `quants` into the store; returns the GGUF paths.

    An unpinned entry is pinned from what was downloaded (the revision's commit, every file's size and sha256);
    the GGUFs made are recorded with the versions of the tools that made them.
    """
    from localqwen.convert import convert
    from localqwen.convert.pipeline import HUB_FILES, linked_folder, parse_quants
    from localqwen.hub import download_checkpoint

    quants = parse_quants(quants)
    lock = load_lock(lock_file, store_lock_path())
    entry = lock.models.get(repo) or ModelPin()
    rev = _revision(entry, revision, repo, lock)
    have = {pin.quant: models_dir() / name for name, pin in entry.gguf.items() if (models_dir() / name).is_file()}
    todo = [q for q in quants if force or q not in have]
    if not todo:
        echo(f"{repo}: already in the store")
        return [have[q] for q in quants]

    snapshot = download_checkpoint(repo, rev, HUB_FILES, quiet=quiet)
    measured = _check_sources(entry, lock, snapshot, complete=True, quiet=quiet)
    with _workspace() as workspace:
        source = linked_folder(workspace, repo, snapshot.files)
        (workspace / "out").mkdir()
        made = dict(zip(todo, convert(str(source), todo, outdir=workspace / "out", quiet=quiet), strict=True))
        pins = {path.name: _gguf_pin(path, quant, quiet) for quant, path in made.items()}
        _check_reproduced(entry, pins, lock, echo)
        placed = {quant: _place(path, force) for quant, path in made.items()}

    entry = lock.entry(repo)
    if not entry.revision:
        entry.revision = snapshot.commit
    if not entry.files:
        entry.files = measured
        echo(f"pinned {repo} at {snapshot.commit} ({len(measured)} files) in {lock.path}")
    entry.gguf.update(pins)
    lock.save()
    return [placed.get(q) or have[q] for q in quants]


def _gguf_pin(path: Path, quant: str, quiet: bool) -> GGUFPin:
    pin = _measure({path.name: path}, quiet)[path.name]
    return GGUFPin(quant, pin.size, pin.sha256, **tool_versions())


def parse_gguf_spec(spec: str) -> tuple[str, str]:
    repo, sep, filename = spec.partition(":")
    if not sep or repo.count("/") != 1 or not filename.endswith(".gguf"):
        raise LocalqwenError(f"--gguf takes REPO:FILE, e.g. Qwen/Some-Model-GGUF:model-Q4_K_M.gguf, not {spec!r}")
    return repo, filename


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link to the cached blob where the disk allows (no second copy), else a copy; atomic either way."""
    from localqwen.fileio import atomic_output

    with atomic_output(target) as tmp:
        try:
            tmp.unlink()
            os.link(source.resolve(), tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def pull_gguf(spec: str, *, revision: str | None = None, lock_file: Path | None = None, force: bool = False,
              quiet: bool = False, echo: Echo = lambda line: None) -> Path:
    """Download a ready GGUF from a GGUF repository into the store, verified against (or pinned in) the lock."""
    from localqwen.hub import download_file
    from localqwen.metadata import read_metadata

    repo, filename = parse_gguf_spec(spec)
    lock = load_lock(lock_file, store_lock_path())
    entry = lock.models.get(repo) or ModelPin()
    rev = _revision(entry, revision, repo, lock)
    target = models_dir() / Path(filename).name
    if target.is_file() and not force:
        raise LocalqwenError("already in the store (use --force to replace it)", target)
    snapshot = download_file(repo, filename, rev, quiet=quiet)
    measured = _check_sources(entry, lock, snapshot, complete=False, quiet=quiet)
    arch = read_metadata(snapshot.files[filename]).architecture
    if arch != GGUF_ARCH:
        raise HubError(f"is a {arch} model; localqwen runs {GGUF_ARCH} models", f"{repo}/{filename}")
    models_dir().mkdir(parents=True, exist_ok=True)
    _link_or_copy(snapshot.files[filename], target)
    entry = lock.entry(repo)
    if not entry.revision:
        entry.revision = snapshot.commit
    if filename not in entry.files:
        entry.files[filename] = measured[filename]
        echo(f"pinned {repo}/{filename} at {entry.revision} in {lock.path}")
    lock.save()
    return target


# --- lock and verify ---------------------------------------------------------------------------------------------

def relock(repo: str = DEFAULT_REPO, *, gguf_file: str | None = None, revision: str | None = None,
           lock_file: Path | None = None, quiet: bool = False, echo: Echo = lambda line: None) -> ModelPin:
    """Record (or update) a repository's pins from the bytes of `revision` (default: main). GGUF records made from
    another revision are dropped: they no longer describe what a pull makes."""
    from localqwen.convert.pipeline import HUB_FILES
    from localqwen.hub import download_checkpoint, download_file

    lock = load_lock(lock_file, store_lock_path())
    rev = revision or "main"
    if gguf_file is not None:
        snapshot = download_file(repo, gguf_file, rev, quiet=quiet)
    else:
        snapshot = download_checkpoint(repo, rev, HUB_FILES, quiet=quiet)
    measured = _measure(snapshot.files, quiet)
    entry = lock.entry(repo)
    if entry.revision and entry.revision != snapshot.commit:
        echo(f"{repo}: revision {entry.revision} -> {snapshot.commit}")
        entry.files, entry.gguf = {}, {}
    for name, pin in measured.items():
        old = entry.files.get(name)
        if old is not None and old != pin:
            echo(f"{repo}/{name}: {old.sha256[:12]}... -> {pin.sha256[:12]}... at the same revision: the cached copy "
                 "may be damaged")
    entry.revision = snapshot.commit
    entry.files = {**entry.files, **measured} if gguf_file is not None else measured
    lock.save()
    echo(f"pinned {repo} at {snapshot.commit} ({len(measured)} files) in {lock.path}")
    return entry


@dataclass(frozen=True)
class Verified:
    path: str
    status: str  # "ok", "mismatch", "unpinned"
    detail: str = ""


def verify_store(lock_file: Path | None = None, *, quiet: bool = False) -> list[Verified]:
    """Re-hash every GGUF in the store against the lock (a GGUF localqwen made, or one pulled from a GGUF repo)."""
    lock = load_lock(lock_file, store_lock_path())
    pins: dict[str, FilePin] = {}
    for entry in lock.models.values():
        pins.update({Path(name).name: pin for name, pin in entry.files.items() if name.endswith(".gguf")})
        pins.update({name: FilePin(pin.size, pin.sha256) for name, pin in entry.gguf.items()})
    results = []
    files = {m.name + ".gguf": Path(m.path) for m in list_models()}
    measured = _measure(files, quiet) if files else {}
    for name, got in measured.items():
        want = pins.get(name)
        path = str(files[name])
        if want is None:
            results.append(Verified(path, "unpinned", f"not in {lock.path}"))
        elif want == got:
            results.append(Verified(path, "ok"))
        else:
            results.append(Verified(path, "mismatch", f"sha256 {got.sha256[:12]}..., {lock.path} pins "
                                                      f"{want.sha256[:12]}... ({want.size} bytes)"))
    return results
