"""Where localqwen keeps its files: `$LOCALQWEN_HOME`, else the platform's data folder (`~/.local/share/localqwen`
on Linux). The store (models, lock), the chat history and the caches all live below it."""

from __future__ import annotations

import os
from pathlib import Path

from localqwen.constants import DEFAULT_QUANT, MODEL_NAME

DEFAULT_MODEL_FILE = f"{MODEL_NAME}-{DEFAULT_QUANT.upper()}.gguf"


def home() -> Path:
    if os.environ.get("LOCALQWEN_HOME"):
        return Path(os.environ["LOCALQWEN_HOME"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("localqwen"))


def models_dir() -> Path:
    return home() / "models"
