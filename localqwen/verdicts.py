"""Remembered verdicts of the child-process probes (does llama.cpp load this file? does this chat template render?),
so that each costs its child process once: `$LOCALQWEN_HOME/probe/<kind>/<key>.json`.

A verdict is only as good as its key: callers key by content (a template's hash) or by a file's identity (path,
size, modification time and a hash of sampled bytes), and by the llama.cpp version where its behaviour matters. A
missing, unreadable or malformed record is no verdict: the probe simply runs again.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from localqwen.paths import home


def _record(kind: str, key: str) -> Path:
    return home() / "probe" / kind / f"{key}.json"


def recall(kind: str, key: str) -> dict[str, Any] | None:
    """The verdict remembered for `key`, or None."""
    try:
        data = json.loads(_record(kind, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool) or not isinstance(data.get("error"), str):
        return None
    return data


def remember(kind: str, key: str, ok: bool, error: str = "") -> None:
    """Store a verdict (atomically: a reader sees the old record or the new one). Failing to store is not an error:
    the probe runs again next time."""
    path = _record(kind, key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"ok": ok, "error": error}), encoding="utf-8")
        os.replace(tmp, path)
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
