"""`localqwen run` through click on a chain model, whose greedy reply is known exactly (see tests/test_model.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from localqwen.cli import cli
from localqwen.model import Model
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
    assert set(reply) == {"thinking", "content", "tool_calls", "finish_reason", "truncated_thinking", "usage",
                          "timings"}
    assert (reply["thinking"], reply["content"], reply["tool_calls"], reply["finish_reason"]) == \
        (THINKING, ANSWER, [], "stop")
    usage = reply["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "thinking_tokens"}
    assert 0 < usage["thinking_tokens"] < usage["completion_tokens"] and usage["prompt_tokens"] > 0
    assert reply["truncated_thinking"] is False and {"prompt_eval_s", "tokens_per_s"} <= set(reply["timings"])


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
