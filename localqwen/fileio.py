"""Writing files so that a reader never sees half of one: a temporary name, then an atomic rename."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from localqwen.errors import LocalqwenError


def check_writable_target(path: Path, *, force: bool) -> None:
    """Refuse to clobber an existing file unless asked, and fail before hours of work if the folder is unusable."""
    if path.exists() and not force:
        raise LocalqwenError("already exists (use --force to overwrite)", path)
    folder = path.parent
    if not folder.is_dir():
        raise LocalqwenError("output folder does not exist", folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LocalqwenError("output folder is not writable", folder)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place on success, delete it on any failure or Ctrl+C."""
    tmp = temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    finally:
        tmp.unlink(missing_ok=True)


def temporary_beside(path: Path) -> Path:
    """A new empty file next to `path` (same disk, so the final rename is atomic), with the usual permissions."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes files private (0600); outputs are ordinary files
    os.close(fd)
    return Path(name)


def disk_error(exc: OSError, path: Path) -> LocalqwenError:
    """Turn the OS errors a user can act on into one-line messages."""
    if exc.errno == errno.ENOSPC:
        return LocalqwenError("no space left on the device", path)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LocalqwenError("permission denied", path)
    return LocalqwenError(exc.strerror or str(exc), path)
