"""The shape of the package: the public API apps import, what the runtime loads, and the import-linter contracts
(pyproject.toml) that keep the layers apart."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import localqwen

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `statement`."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    return set(json.loads(out))


def test_the_runtime_loads_neither_the_converter_nor_the_cli() -> None:
    for statement in ("import localqwen.model", "from localqwen import Model, Reply; Model", "import localqwen.server"):
        loaded = loaded_after(statement)
        assert "localqwen.model" in loaded
        assert not {m for m in loaded if m.startswith(("localqwen.convert", "localqwen.cli"))}, statement
    assert "click" not in loaded_after("import localqwen.model")  # (uvicorn, under the server, brings its own)


def test_import_localqwen_is_cheap() -> None:
    loaded = loaded_after("import localqwen")
    assert not {m for m in loaded if m.startswith(("localqwen.", "llama_cpp", "numpy", "fastapi"))}


def test_every_public_name_resolves() -> None:
    assert sorted(localqwen.__all__) == sorted(localqwen._EXPORTS)
    for name in localqwen.__all__:
        value = getattr(localqwen, name)
        assert value is not None and getattr(value, "__module__", localqwen._EXPORTS[name]).startswith("localqwen")
    assert issubclass(localqwen.ContextOverflow, localqwen.BadRequest)
    assert issubclass(localqwen.ModelBusy, localqwen.LocalqwenError)
    assert not issubclass(localqwen.LocalqwenError, type(None)) and "click" not in str(localqwen.LocalqwenError.__mro__)


def test_import_contracts_are_kept() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is a test dependency"
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_no_module_is_over_the_size_guide() -> None:
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines())
             for folder in ("localqwen", "convert") for p in (ROOT / folder).rglob("*.py")}
    assert sizes and {str(p): n for p, n in sizes.items() if n > 420} == {}
