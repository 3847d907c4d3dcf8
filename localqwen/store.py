"""Where models live: `LOCALQWEN_HOME` or the platform's data folder, and how `-m` finds a model."""

from __future__ import annotations

import os
from pathlib import Path

from localqwen.constants import DEFAULT_REPO, MODEL_NAME
from localqwen.convert import DEFAULT_QUANT
from localqwen.errors import LocalqwenError

DEFAULT_MODEL_FILE = f"{MODEL_NAME}-{DEFAULT_QUANT.upper()}.gguf"


def home() -> Path:
    if os.environ.get("LOCALQWEN_HOME"):
        return Path(os.environ["LOCALQWEN_HOME"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("localqwen"))


def models_dir() -> Path:
    return home() / "models"


def resolve_model(spec: str | None) -> Path:
    """`-m` as given: a GGUF path, a file name in the store, or None for the default model."""
    if spec is None:
        path = models_dir() / DEFAULT_MODEL_FILE
        if not path.is_file():
            raise LocalqwenError(
                f"the default model {DEFAULT_MODEL_FILE} is not in {models_dir()}. Make it with "
                f"`localqwen convert {DEFAULT_REPO} --quant {DEFAULT_QUANT} --outdir {models_dir()}` "
                "(needs the hub, or a local checkpoint folder in place of the repo id), or pass -m FILE.gguf")
        return path
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    stored = models_dir() / spec
    for candidate in (stored, stored.with_name(stored.name + ".gguf")):
        if candidate.is_file():
            return candidate
    raise LocalqwenError("model not found (not a file, nor a model in the store)", spec)
