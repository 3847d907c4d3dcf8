"""The Hugging Face hub, through huggingface_hub: its shared cache, its retries (an interrupted file resumes with a
Range request; finished files are kept across runs), `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` as it reads them.

Every failure becomes one LocalqwenError line that says what to do, offline ones included.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from localqwen.constants import DEFAULT_QUANT, DEFAULT_REPO
from localqwen.errors import HubError, LocalqwenError
from localqwen.paths import models_dir

NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")


@dataclass(frozen=True)
class Snapshot:
    """Files of one repository at one commit, as they lie in the Hugging Face cache."""

    repo: str
    commit: str
    files: dict[str, Path]  # name in the repository -> local path


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, or as set since it was imported."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((v or "").upper() in ("1", "ON", "YES", "TRUE") for v in flags)


def convert_hint(repo: str = DEFAULT_REPO) -> str:
    folder = repo.split("/")[-1] if repo == DEFAULT_REPO else "CHECKPOINT"
    return (f"convert a local checkpoint folder instead: localqwen convert PATH/TO/{folder} --quant {DEFAULT_QUANT} "
            f"--outdir {models_dir()}")


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[None]:
    """huggingface_hub's own byte bars on stderr, only on a terminal and unless quiet."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    show = not quiet and sys.stderr.isatty()
    if show or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _is_network_error(exc: BaseException) -> bool:
    return any(cls.__module__.split(".")[0] in NETWORK_MODULES for cls in type(exc).__mro__)


def hub_error(exc: BaseException, repo: str, revision: str) -> LocalqwenError:
    """One line for each way a download fails; falls through to the exception's first line."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo}@{revision}"
    if isinstance(exc, LocalEntryNotFoundError):
        if offline():
            why, then = "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the Hugging Face cache", "Unset it"
        else:
            why, then = f"the hub ({constants.ENDPOINT}) cannot be reached and it is not (completely) in the cache", \
                "Connect"
        return HubError(f"cannot download {where}: {why} ({constants.HF_HUB_CACHE}). {then} and pull again, "
                              f"or {convert_hint(repo)}")
    if isinstance(exc, GatedRepoError):
        return HubError(f"{where} is gated: accept its terms on the hub and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{repo} is not on the hub ({constants.ENDPOINT}), or is private (set HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo} has no revision {revision!r}")
    if isinstance(exc, EntryNotFoundError):
        return HubError(f"{where} has no such file: {str(exc).splitlines()[0]}")
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, HfHubHTTPError) or _is_network_error(exc):
        return HubError(f"the download of {where} failed ({first}). Pull again: finished files are kept in the "
                              "Hugging Face cache")
    return HubError(f"cannot download {where}: {first}")


def _commit_of(path: Path, revision: str) -> str:
    """The commit a cached file belongs to: its snapshot folder's name (.../snapshots/<commit>/<file>)."""
    for parent in path.parents:
        if parent.parent.name == "snapshots":
            return parent.name
    return revision


def _fetch(download: Callable[[], str], repo: str, revision: str, quiet: bool) -> Path:
    """Run a huggingface_hub download; its failures become one-line LocalqwenErrors."""
    try:
        with _progress(quiet):
            return Path(download())
    except (OSError, ValueError) as exc:  # HfHubHTTPError and LocalEntryNotFoundError are OSErrors
        raise hub_error(exc, repo, revision) from None
    except Exception as exc:
        if _is_network_error(exc):
            raise hub_error(exc, repo, revision) from None
        raise


def download_checkpoint(repo: str, revision: str, patterns: Sequence[str], *, quiet: bool = False) -> Snapshot:
    """The repository's files that match `patterns`, downloaded into (or found in) the shared cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    folder = _fetch(lambda: snapshot_download(repo, revision=revision, allow_patterns=list(patterns)), repo, revision,
                    quiet)
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    files = {name: folder / name for name in sorted(filter_repo_objects(names, allow_patterns=list(patterns)))}
    return Snapshot(repo, folder.name, files)


def download_file(repo: str, filename: str, revision: str, *, quiet: bool = False) -> Snapshot:
    """One file of the repository, downloaded into (or found in) the shared cache."""
    from huggingface_hub import hf_hub_download

    path = _fetch(lambda: hf_hub_download(repo, filename, revision=revision), repo, revision, quiet)
    return Snapshot(repo, _commit_of(path, revision), {filename: path})


def evict(path: Path) -> None:
    """Remove a cached file that failed verification: the blob and the snapshot link, so the next pull fetches it
    again instead of linking the bad blob back."""
    with contextlib.suppress(OSError):
        blob = path.resolve()
        if blob != path:
            blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
