"""Writing files so that a reader never sees half of one: a temporary name, then an atomic rename."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from localqwen.errors import LocalqwenError

PARTIAL = ".partial"
STALE_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.partial$")  # .NAME.PID.RANDOM.partial


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
    """A new empty file next to `path` (same disk, so the final rename is atomic), with the usual permissions.

    Its name carries our process id, so a later run can tell the leftovers of a killed run from live work."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=PARTIAL)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes files private (0600); outputs are ordinary files
    os.close(fd)
    return Path(name)


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete temporary files that killed runs (SIGKILL, power loss) left in `folder`; live ones are kept."""
    import psutil

    removed = []
    for path in folder.glob(f".*{PARTIAL}"):
        match = STALE_NAME.match(path.name)
        if match and not psutil.pid_exists(int(match[1])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def disk_error(exc: OSError, path: Path) -> LocalqwenError:
    """Turn the OS errors a user can act on into one-line messages."""
    # numpy's tofile reports a full disk as a bare OSError without errno, in its own words.
    if exc.errno == errno.ENOSPC or "free space" in str(exc):
        return LocalqwenError("no space left on the device", path)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LocalqwenError("permission denied", path)
    return LocalqwenError(exc.strerror or str(exc), path)
