"""`localqwen chat --mcp`: tool calls asked for, shown and kept, in-process and in a real terminal (tmux), on the
lookback model (tests/lookback_model.py): it calls get_weather(city="Paris") on a fresh question and answers with the
weather word of the tool's result ("unknown" when the result has none, as after a refusal)."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from localqwen.chat import ChatSession
from localqwen.conversation import Approvals, ChatSettings, load_conversation
from localqwen.convert import convert
from localqwen.model import Model
from localqwen.sampling import Sampling
from localqwen.tools import function_tool

from .lookback_model import ANSWER, CALL_THINKING, UNKNOWN, write_lookback_checkpoint
from .test_chat import Pane

QUESTION = "What is the weather in Paris?"
ASKED = 'Run get_weather {"city": "Paris"}? [y]es, [n]o, [a]lways for this tool: '
SERVER = Path(__file__).with_name("mcp_server.py")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("lookback")
    [path] = convert(str(write_lookback_checkpoint(tmp / "lookback")), ["f16"], outdir=tmp, quiet=True)
    return path


@pytest.fixture(scope="module")
def model(gguf: Path) -> Iterator[Model]:
    model = Model.load(gguf, n_ctx=2048, gpu_layers=0, threads=1)
    yield model
    model.close()


class Answers:
    """Answers the approval questions from a list, recording them."""

    def __init__(self, *answers: str) -> None:
        self.answers, self.asked = list(answers), []

    def __call__(self, question: str) -> str:
        self.asked.append(question)
        return self.answers.pop(0)


def weather_tool(cities: list[str]):
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        cities.append(city)
        return f"{city}: cool"

    return function_tool(get_weather)


def session(model: Model, answers: Answers, always: tuple[str, ...] = ()) -> tuple[ChatSession, io.StringIO, list]:
    cities: list[str] = []
    out = io.StringIO()
    chat = ChatSession(model, ChatSettings(sampling={"temperature": 0.0}), Console(file=out, width=100),
                       tools=[weather_tool(cities)], approvals=Approvals(always))
    chat.ask = answers
    return chat, out, cities


def test_a_call_is_asked_for_shown_and_kept(model: Model, tmp_path: Path) -> None:
    answers = Answers("y")
    chat, out, cities = session(model, answers)
    chat.send(QUESTION)
    assert answers.asked == [ASKED] and cities == ["Paris"]
    text = out.getvalue()
    assert re.search(r"\[tool call\] .*get_weather.*\n  → get_weather: Paris: cool\n(.|\n)*" +
                     re.escape(ANSWER.format("cool")), text)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert chat.messages[1]["reasoning_content"] == CALL_THINKING and chat.messages[2]["content"] == "Paris: cool"
    assert chat.used == len(model.tokenize_chat(chat.messages, chat.tool_schemas))  # the tools count in the context
    chat.command(f"/save {tmp_path / 'chat.json'}")
    messages, _ = load_conversation(tmp_path / "chat.json", Sampling())
    assert messages == chat.messages  # calls and results are kept in the file


def test_refused_and_always(model: Model) -> None:
    answers = Answers("n", "always")
    chat, out, cities = session(model, answers)
    chat.send(QUESTION)
    assert cities == [] and "  → get_weather: refused" in out.getvalue()
    assert chat.messages[-1]["content"] == ANSWER.format(UNKNOWN)
    for _ in range(2):
        chat.command("/clear")
        chat.send(QUESTION)  # asked the first time only: "always" holds for the session
    assert answers.asked == [ASKED, ASKED] and cities == ["Paris", "Paris"]
    chat.command("/tools")
    assert re.search(r"^  get_weather  python \(always\)  The weather in a city now\.$", out.getvalue(), re.M)


def test_preapproved_tools_are_not_asked_for(model: Model) -> None:
    answers = Answers()
    chat, out, cities = session(model, answers, always=("get_weather",))
    chat.send(QUESTION)
    assert answers.asked == [] and cities == ["Paris"] and chat.messages[-1]["content"] == ANSWER.format("cool")


def test_ctrl_c_at_the_question_stops_the_reply(model: Model) -> None:
    def interrupted(question: str) -> str:
        raise KeyboardInterrupt

    chat, out, cities = session(model, Answers())
    chat.ask = interrupted
    chat.send(QUESTION)
    assert cities == [] and chat.messages == [] and "stopped: this exchange is not kept" in out.getvalue()
    chat.ask = Answers("y")
    chat.send(QUESTION)  # the chat goes on
    assert chat.messages[-1]["content"] == ANSWER.format("cool")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux to drive a real terminal")
def test_mcp_chat_in_a_terminal(gguf: Path, tmp_path: Path) -> None:
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock"), "-f", "/dev/null"]
    localqwen = Path(sys.executable).with_name("localqwen")
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {
        "weather": {"command": sys.executable, "args": [str(SERVER)], "env": {"SKY": "grey"}},
        "broken": {"command": "localqwen-no-such-command"}}}))
    env = f"env -u COLUMNS -u LINES HOME={tmp_path} LOCALQWEN_HOME={tmp_path / 'home'}"

    def start(name: str, *options: str) -> Pane:
        command = (f"{env} {localqwen} chat -m {shlex.quote(str(gguf))} --temperature 0 --ctx 2048 "
                   f"--mcp {shlex.quote(str(config))} {' '.join(options)} 2>>{tmp_path}/err")
        subprocess.run([*tmux, "new-session", "-d", "-s", name, "-x", "140", "-y", "50", command], check=True)
        return Pane(tmux, name)

    try:
        chat, trusting = start("chat"), start("trusting", "--yes", "get_weather,nonesuch")
        chat.idle()
        chat.line("/tools")
        chat.wait_for(r"^  get_weather  weather  The weather in a city now\.$")
        chat.line(QUESTION)
        chat.wait_for(re.escape(ASKED.rstrip()))
        chat.line("n")
        screen = chat.wait_for(re.escape(ANSWER.format(UNKNOWN)))
        assert "  → get_weather: refused" in screen
        chat.idle()
        chat.line("/clear")
        chat.line(QUESTION)
        chat.wait_for(re.escape(ASKED.rstrip()) + "$")
        chat.line("a")
        screen = chat.wait_for(re.escape(ANSWER.format("grey")))
        assert re.search(r"^\[tool call\] .*get_weather.*\n(.|\n)*^" + re.escape(ASKED) + "a\n  → get_weather: "
                         "Paris: grey\nThought for \\d+ tokens", screen, re.M)
        chat.idle()
        chat.line(f"/save {tmp_path / 'chat.json'}")
        chat.wait_for("saved 1 turn")
        saved = json.loads((tmp_path / "chat.json").read_text())["messages"]
        assert [m["role"] for m in saved] == ["user", "assistant", "tool", "assistant"]
        assert saved[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        assert saved[2]["content"] == "Paris: grey"
        chat.line("/bye")

        trusting.idle()
        trusting.line(QUESTION)
        screen = trusting.wait_for(re.escape(ANSWER.format("grey")))
        assert "  → get_weather: Paris: grey" in screen and "[y]es" not in screen
        trusting.idle()
        trusting.keys("C-d")
        for pane in (chat, trusting):
            deadline = time.monotonic() + 20  # the MCP servers stop first (a few seconds at most)
            while pane.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not pane.alive(), f"{pane.name} is still running:\n{pane.screen()}"
        errors = (tmp_path / "err").read_text()
        assert "Traceback" not in errors, errors
        assert errors.count("localqwen: MCP server 'broken' could not start: ") == 2
        assert "localqwen: --yes nonesuch: no such tool" in errors
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
