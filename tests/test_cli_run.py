"""`localqwen run` through click on a chain model, whose greedy reply is known exactly (see tests/test_model.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner, Result

from localqwen.cli import cli
from localqwen.model import Model
from tests.structured import MAX_TOKENS, PERSON, THINK_BRIEFLY, check_answer, mostly_complete, random_model_file
from tests.test_model import ANSWER, THINKING, chain_model


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The chain model, loaded once: every `run` below goes through the CLI's own loading path up to Model.load,
    which hands back the same Model for the same arguments."""
    path, _ = chain_model(tmp_path_factory.mktemp("run"), THINKING, ANSWER)
    loaded: dict[str, Model] = {}
    real_load = Model.load

    def load(*args: Any, **kwargs: Any) -> Model:
        key = repr((args, sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = real_load(*args, **kwargs)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Model, "load", load)
        yield path
    for model in loaded.values():
        model.close()


def run(gguf: Path, *args: str, input: str | None = None) -> Result:
    runner = CliRunner(env={"LOCALQWEN_HOME": str(gguf.parent / "home")})  # click 8.2+: stdout and stderr apart
    return runner.invoke(cli, ["run", "-m", str(gguf), "--ctx", "512", "--temperature", "0", *args], input=input)


def test_plain_answer_on_stdout(gguf: Path) -> None:
    result = run(gguf, "Hi")
    assert (result.exit_code, result.stdout, result.stderr) == (0, ANSWER + "\n", "")


def test_show_thinking_goes_to_stderr(gguf: Path) -> None:
    result = run(gguf, "--show-thinking", "Hi")
    assert (result.exit_code, result.stdout, result.stderr) == (0, ANSWER + "\n", THINKING)


def test_json_is_one_object(gguf: Path) -> None:
    result = run(gguf, "--json", "Hi")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1
    reply = json.loads(result.stdout)
    assert set(reply) == {"thinking", "content", "tool_calls", "finish_reason", "truncated_thinking", "wrap_up",
                          "usage", "timings"}
    assert (reply["thinking"], reply["content"], reply["tool_calls"], reply["finish_reason"]) == \
        (THINKING, ANSWER, [], "stop")
    usage = reply["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "thinking_tokens"}
    assert 0 < usage["thinking_tokens"] < usage["completion_tokens"] and usage["prompt_tokens"] > 0
    assert reply["truncated_thinking"] is False and reply["wrap_up"] is None
    assert {"prompt_eval_s", "tokens_per_s"} <= set(reply["timings"])


def test_prompt_from_stdin(gguf: Path) -> None:
    result = run(gguf, "-", input="Hi\n")
    assert (result.exit_code, result.stdout) == (0, ANSWER + "\n")
    result = run(gguf, input="Hi\n")  # no PROMPT and stdin not a terminal: stdin too
    assert (result.exit_code, result.stdout) == (0, ANSWER + "\n")


def test_max_tokens_truncates(gguf: Path) -> None:
    result = run(gguf, "--max-tokens", "3", "--json", "Hi")
    reply = json.loads(result.stdout)
    assert (reply["finish_reason"], reply["truncated_thinking"], reply["content"]) == ("length", True, "")
    assert reply["usage"]["completion_tokens"] == 3 and reply["thinking"] and THINKING.startswith(reply["thinking"])
    result = run(gguf, "--max-tokens", "3", "Hi")
    assert (result.exit_code, result.stdout) == (0, "\n")
    assert result.stderr == "[stopped at the token limit while thinking]\n"


def test_missing_model_is_one_line(tmp_path: Path) -> None:
    result = CliRunner(env={"LOCALQWEN_HOME": str(tmp_path)}).invoke(
        cli, ["run", "-m", str(tmp_path / "nope.gguf"), "Hi"])
    assert (result.exit_code, result.stdout, len(result.stderr.splitlines())) == (1, "", 1)
    assert result.stderr.startswith(f"Error: {tmp_path / 'nope.gguf'}: model not found")


def test_bad_values_are_one_line(gguf: Path) -> None:
    result = run(gguf, "--top-p", "2", "Hi")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", "Error: top_p=2.0 is out of range\n")
    result = run(gguf, "--max-tokens", "0", "Hi")
    assert result.exit_code == 2 and "Invalid value for '--max-tokens'" in result.stderr


@pytest.mark.parametrize("args", [("",), ("   ",), ("-",)])
def test_empty_prompt_is_refused(gguf: Path, args: tuple[str, ...]) -> None:
    result = run(gguf, *args, input="")
    assert result.exit_code == 2 and result.stderr.endswith("Error: the prompt is empty\n") and result.stdout == ""


# --- run --schema ----------------------------------------------------------------------------------------------------

OK_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}


def schema_file(folder: Path, schema: object, name: str = "schema.json") -> Path:
    path = folder / name
    path.write_text(schema if isinstance(schema, str) else json.dumps(schema), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def random_gguf(gguf: Path) -> Path:
    """A random tiny model (tests/structured.py): its answer has whatever shape the grammar gives it. Loaded through
    the same cache as the chain model (gguf patches Model.load)."""
    return random_model_file(gguf.parent / "random")


def test_schema_answer_is_json_of_the_schema(gguf: Path) -> None:
    # The chain model's own answer is prose: under the schema's grammar it can only answer JSON of that shape.
    path = schema_file(gguf.parent, OK_SCHEMA)
    result = run(gguf, "--schema", str(path), "Hi")
    assert result.exit_code == 0 and result.stdout.endswith("\n") and len(result.stdout.splitlines()) == 1
    jsonschema.validate(json.loads(result.stdout), OK_SCHEMA)
    result = run(gguf, "--schema", str(path), "--json", "Hi")
    reply = json.loads(result.stdout)
    # --json gains "parsed" only with --schema (test_json_is_one_object pins the key set without it).
    assert set(reply) == {"thinking", "content", "tool_calls", "finish_reason", "truncated_thinking", "wrap_up",
                          "usage", "timings", "parsed"}
    assert (reply["thinking"], reply["finish_reason"]) == (THINKING, "stop")
    assert reply["parsed"] == json.loads(reply["content"]) and result.exit_code == 0


def test_schema_on_a_random_model(random_gguf: Path) -> None:
    path = schema_file(random_gguf.parent, PERSON)
    completed = []
    for seed in range(6):
        result = CliRunner(env={"LOCALQWEN_HOME": str(random_gguf.parent / "home")}).invoke(cli, [
            "run", "-m", str(random_gguf), "--ctx", "2048", "--seed", str(seed), "--thinking-budget",
            str(THINK_BRIEFLY), "--max-tokens", str(MAX_TOKENS), "--schema", str(path), "--json", "Hi"])
        reply = json.loads(result.stdout)
        complete = check_answer(reply["content"], reply["finish_reason"], PERSON)
        assert result.exit_code == (0 if complete else 1)
        assert reply["parsed"] == (json.loads(reply["content"]) if complete else None)
        completed.append(complete)
    mostly_complete(completed)


def test_schema_answer_cut_short_fails(gguf: Path) -> None:
    path = schema_file(gguf.parent, OK_SCHEMA)
    result = run(gguf, "--schema", str(path), "--max-tokens", "3", "Hi")
    assert (result.exit_code, result.stderr) == (1, "[stopped at the token limit while thinking]\n")
    result = run(gguf, "--schema", str(path), "--max-tokens", "3", "--json", "Hi")
    reply = json.loads(result.stdout)
    assert (result.exit_code, reply["finish_reason"], reply["parsed"]) == (1, "length", None)


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read it (No such file or directory)"),
    ("{not json", "not JSON (Expecting property name enclosed in double quotes"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}},
     "schema.properties.n.minimum is not supported in answer schemas"),
    ({"type": "object", "format": "email"}, "schema.format 'email' is not supported"),
    ([1, 2], "schema must be a JSON object (a JSON Schema), not list"),
])
def test_bad_schema_files_are_one_line(gguf: Path, tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "missing.json" if content is None else schema_file(tmp_path, content)
    result = run(gguf, "--schema", str(path), "Hi")
    assert (result.exit_code, result.stdout, len(result.stderr.splitlines())) == (1, "", 1)
    assert result.stderr.startswith(f"Error: {path}: {message}")
