"""The store without the hub: models, rm, info and plan (--json shapes), how -m and the default model resolve, and
the lock file format (the shipped lock, reading, seeding, comparing)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from localqwen import lock as lock_module
from localqwen import store
from localqwen.cli.inspection import info_command, plan_command
from localqwen.cli.models import models_command, rm_command
from localqwen.constants import DEFAULT_CONTEXT, DEFAULT_REPO, MODEL_NAME
from localqwen.convert import convert
from localqwen.errors import LocalqwenError
from localqwen.lock import (
    FilePin,
    GGUFPin,
    Lock,
    ModelPin,
    compare_files,
    load_lock,
    packaged_lock_path,
    read_lock,
    tool_versions,
)
from localqwen.synthetic import TINY, tensor_shapes, write_checkpoint

SHA = "ab" * 32


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model as q4_k_m and q8_0, under the names the real model's files have in the store."""
    folder = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "Qwen3-Tiny", TINY, seed=5, shards=1)
    out = tmp_path_factory.mktemp("models")
    made = dict(zip(["q4_k_m", "q8_0"], convert(str(folder), ["q4_k_m", "q8_0"], outdir=out, quiet=True), strict=True))
    return {quant: path.rename(out / f"{MODEL_NAME}-{quant.upper()}.gguf") for quant, path in made.items()}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOCALQWEN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def filled(home: Path, made: dict[str, Path]) -> dict[str, Path]:
    (home / "models").mkdir(parents=True)
    return {quant: Path(shutil.copy(path, home / "models")) for quant, path in made.items()}


def invoke(command, *args: str) -> Result:
    return CliRunner().invoke(command, list(args), catch_exceptions=False)


def one_error_line(result: Result) -> str:
    assert result.exit_code == 1
    [line] = result.output.splitlines()
    assert line.startswith("Error: ")
    return line


# --- models, rm ---

def test_models_lists_name_quant_size_context_path(filled: dict[str, Path]) -> None:
    listed = json.loads(invoke(models_command, "--json").output)
    assert listed == [{"name": p.stem, "quant": q, "size": p.stat().st_size, "context": TINY.max_position_embeddings,
                       "path": str(p)} for q, p in sorted(filled.items(), key=lambda kv: kv[1].name)]
    text = invoke(models_command).output.splitlines()
    assert text[0].split() == ["NAME", "QUANT", "SIZE", "CONTEXT", "PATH"]
    assert any(line.split()[:2] == [filled["q8_0"].stem, "q8_0"] for line in text[1:])


def test_models_on_an_empty_store(home: Path) -> None:
    assert json.loads(invoke(models_command, "--json").output) == []
    assert "localqwen pull" in invoke(models_command).output


def test_a_damaged_file_is_listed_as_invalid(filled: dict[str, Path]) -> None:
    (filled["q8_0"].parent / "broken.gguf").write_bytes(b"not a gguf at all, just some bytes")
    listed = {m["name"]: m["quant"] for m in json.loads(invoke(models_command, "--json").output)}
    assert listed["broken"] == "invalid"


def test_rm_removes_by_name_only(filled: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(rm_command, filled["q8_0"].stem)
    assert result.exit_code == 0 and not filled["q8_0"].exists()
    assert result.output == f"removed {filled['q8_0']}\n"
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    for name in ("no-such-model", str(outside), "../elsewhere.gguf", filled["q4_k_m"].stem + "/.."):
        assert "no such model in the store" in one_error_line(invoke(rm_command, name))
    assert outside.exists() and filled["q4_k_m"].exists()


# --- info ---

def test_info_json(filled: dict[str, Path]) -> None:
    info = json.loads(invoke(info_command, filled["q4_k_m"].stem, "--json").output)
    n_tensors = len(tensor_shapes(TINY))
    assert info["path"] == str(filled["q4_k_m"]) and info["architecture"] == "qwen3" and info["quant"] == "q4_k_m"
    assert info["parameters"] == sum(math.prod(s) for s in tensor_shapes(TINY).values())
    assert (info["context_length"], info["layers"], info["embedding"], info["heads"], info["kv_heads"],
            info["head_dim"], info["vocab"]) == (262144, 2, 64, 4, 2, 32, 151936)
    assert info["chat_template"] is True
    assert info["sampling"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
    assert info["sampling_from_file"] == ["temperature", "top_k", "top_p"]  # min_p: the card's value, not the file's
    assert sum(sum(counts.values()) for counts in info["mixture"].values()) == n_tensors
    assert sum(t["tensors"] for t in info["tensor_types"].values()) == n_tensors
    assert info["mixture"]["attn_norm"] == {"F32": 2} and set(info["mixture"]) >= {"token_embd", "attn_v", "ffn_down"}


def test_info_text_and_errors(filled: dict[str, Path], tmp_path: Path) -> None:
    text = invoke(info_command, str(filled["q8_0"])).output
    assert "architecture    qwen3" in text and "chat template   yes" in text and "token_embd" in text
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello there, this is not a model\n")
    assert one_error_line(invoke(info_command, str(not_gguf))) == f"Error: {not_gguf}: not a GGUF file (bad magic)"
    assert "model not found" in one_error_line(invoke(info_command, "nothing-like-this"))


# --- plan ---

def test_plan_json(filled: dict[str, Path]) -> None:
    report = json.loads(invoke(plan_command, "-m", "q8_0", "--ctx", "4096", "--json").output)
    assert report["model"] == str(filled["q8_0"]) and report["native_context"] == 262144
    plan = report["plan"]
    assert (plan["n_ctx"], plan["kv_type"], plan["flash_attn"]) == (4096, "f16", False)
    assert plan["total"] == plan["total_cpu"] + plan["total_gpu"] and report["fits"] is True
    assert set(report["largest_context"]) == {"f16", "q8_0", "q4_0"}
    assert all(4096 <= n <= 262144 and n % 256 == 0 for n in report["largest_context"].values())
    quantized = json.loads(invoke(plan_command, "-m", "q8_0", "--kv-cache", "q8_0", "--ctx", "32k", "--json").output)
    assert (quantized["plan"]["n_ctx"], quantized["plan"]["flash_attn"]) == (32768, True)
    auto = json.loads(invoke(plan_command, "--json").output)  # the default model, --ctx auto
    assert auto["model"] == str(filled["q4_k_m"]) and 0 < auto["plan"]["n_ctx"] <= DEFAULT_CONTEXT


def test_plan_text(filled: dict[str, Path]) -> None:
    text = invoke(plan_command, "-m", "q8_0", "--ctx", "8192").output
    assert "context      8192 tokens, KV cache f16" in text and "largest context that fits here" in text
    assert "must be between 1 and 262144" in one_error_line(invoke(plan_command, "-m", "q8_0", "--ctx", "300000"))


# --- -m and the default model ---

def test_resolve_model(filled: dict[str, Path]) -> None:
    assert store.resolve_model(None) == filled["q4_k_m"]
    assert store.resolve_model("q8_0") == store.resolve_model(filled["q8_0"].stem) == filled["q8_0"]
    assert store.resolve_model(filled["q8_0"].name) == store.resolve_model(str(filled["q8_0"])) == filled["q8_0"]
    with pytest.raises(LocalqwenError, match="model not found"):
        store.resolve_model("q6_k")


def test_missing_default_model_says_how_to_get_it(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for get in (lambda: store.resolve_model(None), lambda: store.ensure_default_model(confirm=None)):
        with pytest.raises(LocalqwenError) as error:
            get()
        message = error.value.message
        assert "\n" not in message and "not in the store" in message and str(home / "models") in message
        assert "run `localqwen pull`" in message and "localqwen convert PATH/TO/Qwen3-4B-Thinking-2507" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LocalqwenError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\), so it cannot be pulled"):
        store.ensure_default_model(confirm=None)


def test_missing_default_model_is_offered(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    target = home / "models" / store.DEFAULT_MODEL_FILE

    def fake_pull(repo: str, quants: list[str], **kwargs: object) -> list[Path]:
        calls.append((repo, quants))
        return [target]

    monkeypatch.setattr(store, "pull", fake_pull)
    with pytest.raises(LocalqwenError, match="run `localqwen pull`"):
        store.ensure_default_model(confirm=lambda question: False)
    assert store.ensure_default_model(confirm=lambda question: True) == target
    assert calls == [(DEFAULT_REPO, ["q4_k_m"])]


# --- the lock file ---

def test_the_shipped_lock_holds_only_measured_values() -> None:
    shipped = packaged_lock_path()
    assert shipped is not None and shipped.name == "models.lock"
    lock = read_lock(shipped)
    assert lock.models[DEFAULT_REPO] == ModelPin()  # nobody measured the real 8 GB yet: all empty
    for entry in lock.models.values():  # anything else in it must be complete
        assert not entry.files or entry.revision
    assert json.loads(shipped.read_text())["format"] == 1


def test_lock_round_trip(tmp_path: Path) -> None:
    gguf = GGUFPin("q4_k_m", 123, SHA, **tool_versions())
    lock = Lock(tmp_path / "models.lock", {"a/b": ModelPin("c" * 40, {"x.json": FilePin(7, SHA)}, {"b.gguf": gguf})})
    lock.save()
    assert read_lock(lock.path) == lock
    assert read_lock(tmp_path / "missing.lock").models == {}


@pytest.mark.parametrize(("text", "problem"), [
    ("{", "JSON error at line 1"),
    ('{"format": 2, "models": {}}', '"format": 1'),
    ('{"format": 1, "models": {"a/b": {"revision": "main"}}}', "a/b: revision must be a 40-hex commit id or empty"),
    ('{"format": 1, "models": {"a/b": {"files": {"x": {"size": 1, "sha256": "ABC"}}}}}', "a/b x: sha256 must be"),
    ('{"format": 1, "models": {"a/b": {"files": {"x": {"size": -1, "sha256": "' + SHA + '"}}}}}', "non-negative"),
    ('{"format": 1, "models": {"a/b": {"files": {"x": {"size": 1}}}}}', "needs exactly the keys size, sha256"),
    ('{"format": 1, "models": {"a/b": {"revison": ""}}}', "an entry holds only revision, files and gguf"),
])
def test_a_bad_lock_is_one_line_naming_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "models.lock"
    path.write_text(text)
    with pytest.raises(LocalqwenError) as error:
        read_lock(path)
    message = error.value.message
    assert message.startswith(f"{path}: not a valid lock file") and problem in message and "\n" not in message


def test_the_store_lock_is_seeded_from_the_shipped_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = Lock(tmp_path / "shipped.lock", {DEFAULT_REPO: ModelPin("1" * 40, {"config.json": FilePin(1, SHA)}),
                                                "x/unpinned": ModelPin()})
    shipped.save()
    monkeypatch.setattr(lock_module, "packaged_lock_path", lambda: shipped.path)
    store_lock = tmp_path / "store" / "models.lock"
    assert load_lock(None, store_lock).models == shipped.models  # a fresh store starts from the shipped pins
    own = Lock(store_lock, {DEFAULT_REPO: ModelPin(), "x/unpinned": ModelPin("2" * 40, {"a": FilePin(2, SHA)})})
    own.save()
    merged = load_lock(None, store_lock).models
    assert merged[DEFAULT_REPO] == shipped.models[DEFAULT_REPO]  # pins a newer localqwen ships reach the store
    assert merged["x/unpinned"] == own.models["x/unpinned"]  # the store's own pins win
    assert load_lock(store_lock, store_lock).models == own.models  # --lock FILE: exactly that file


def test_compare_files() -> None:
    entry = ModelPin("c" * 40, {"a": FilePin(1, SHA), "b": FilePin(2, SHA), "c": FilePin(3, SHA)})
    measured = {"a": FilePin(1, SHA), "b": FilePin(5, SHA), "c": FilePin(3, "cd" * 32), "d": FilePin(4, SHA)}
    problems = {m.name: m.problem for m in compare_files(entry, measured, complete=True)}
    assert problems == {"b": "is 5 bytes, the lock pins 2", "d": "is not in the lock's entry",
                        "c": "has sha256 cdcdcdcdcdcd..., the lock pins abababababab..."}
    assert [m.name for m in compare_files(entry, {"a": FilePin(1, SHA)}, complete=True)] == ["b", "c"]
    assert compare_files(entry, {"a": FilePin(1, SHA), "z": FilePin(9, SHA)}, complete=False) == []
    assert compare_files(ModelPin(), measured, complete=True) == []  # nothing pinned: nothing to refuse
