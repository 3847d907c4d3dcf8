"""`localqwen chat`: its pure parts in-process, the session on real llama.cpp, and the real thing in a terminal (tmux).

Chain models (tests/test_model.py) make replies known: greedy decoding from the prompt's last token always yields the
scripted thinking and answer, whatever the conversation. The "endless" model thinks forever, so a reply is still
streaming when Ctrl+C lands.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from localqwen.chat import ChatSession, chat_repl, read_message
from localqwen.constants import THINK_CLOSE_ID
from localqwen.conversation import ChatSettings, apply_set, fit_context, load_conversation, save_conversation
from localqwen.convert import convert
from localqwen.errors import LocalqwenError
from localqwen.model import Model
from localqwen.sampling import Sampling
from localqwen.synthetic import script_chain, write_chain_checkpoint
from tests.test_model import ANSWER, THINKING, chain_model

BASE = Sampling()
ENDLESS_THINKING = "Let me think about this carefully."
GREEDY = ChatSettings(sampling={"temperature": 0.0})


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("chat")
    path, _ = chain_model(tmp / "scripted", THINKING, ANSWER)
    full, _ = script_chain(ENDLESS_THINKING, "x")  # cut before </think>: then "!" forever (see chain_weights)
    folder = write_chain_checkpoint(tmp / "endless" / "chain", full[:full.index(THINK_CLOSE_ID)], shards=1)
    [endless] = convert(str(folder), ["f16"], outdir=tmp / "endless", quiet=True)
    return {"scripted": path, "endless": endless}


@pytest.fixture(scope="module")
def model(gguf: dict[str, Path]) -> Model:
    model = Model.load(gguf["scripted"], n_ctx=512, gpu_layers=0)
    yield model
    model.close()


@pytest.fixture(scope="module")
def endless(gguf: dict[str, Path]) -> Model:
    model = Model.load(gguf["endless"], n_ctx=4096, gpu_layers=0, loop_guard=False)  # it thinks "!" forever
    yield model
    model.close()


# --- The pure parts -------------------------------------------------------------------------------------------------

def test_set_changes_settings() -> None:
    settings, message = apply_set(ChatSettings(), BASE, "temperature 0.3")
    assert settings.sampling == {"temperature": 0.3} and message == "temperature set to 0.3"
    for arg in ("top_k 5", "temperature default", "max_tokens 100", "thinking_budget 0", 'system "Be brief."',
                "thinking hide", "verbose on"):
        settings, _ = apply_set(settings, BASE, arg)
    assert settings == ChatSettings(system="Be brief.", hide_thinking=True, verbose=True, max_tokens=100,
                                    thinking_budget=0, sampling={"top_k": 5})
    settings, message = apply_set(settings, BASE, "system")
    assert settings.system is None and message == "system prompt cleared"


@pytest.mark.parametrize(("arg", "error"), [
    ("top_p 2", "top_p=2.0 is out of range"),
    ("temperature hot", "temperature needs a number, got 'hot'"),
    ("top_k 2.5", "top_k needs a whole number, got '2.5'"),
    ("seed", "seed needs a whole number, got ''"),
    ("max_tokens 0", "max_tokens must be a whole number of at least 1"),
    ("thinking_budget -1", "thinking_budget must be a whole number of at least 0"),
    ("thinking maybe", "/set thinking takes show or hide, got 'maybe'"),
    ("verbose yes", "/set verbose takes on or off"),
    ("colour blue", "unknown setting 'colour'"),
    ("", "/set needs a setting"),
])
def test_set_rejects_bad_values(arg: str, error: str) -> None:
    settings = ChatSettings(sampling={"temperature": 0.5})
    with pytest.raises(LocalqwenError, match=re.escape(error)):
        apply_set(settings, BASE, arg)
    assert settings == ChatSettings(sampling={"temperature": 0.5})


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "Hi 🦙"},
                {"role": "assistant", "content": "Hello", "reasoning_content": "They said hi."}]
    settings = ChatSettings(system="Be brief.", hide_thinking=True, max_tokens=64, sampling={"temperature": 0.3})
    path = tmp_path / "chat.json"
    save_conversation(path, messages, settings)
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "system": "Be brief.", "messages": messages,
        "settings": {"hide_thinking": True, "verbose": False, "max_tokens": 64, "thinking_budget": None,
                     "sampling": {"temperature": 0.3}}}
    assert load_conversation(path, BASE) == (messages, settings)


@pytest.mark.parametrize(("content", "error"), [
    ("not json", "not a saved conversation"),
    ("[]", 'no "messages" list'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "not a chat message"),
    ('{"messages": [{"role": "user"}]}', "not a chat message"),
    ('{"messages": [], "system": 3}', "the system prompt must be text"),
    ('{"messages": [], "settings": {"max_tokens": "many"}}', "max_tokens must be a whole number"),
    ('{"messages": [], "settings": {"sampling": {"top_p": 7}}}', "top_p=7 is out of range"),
    ('{"messages": [], "settings": {"sampling": {"top_p": "high"}}}', "sampling settings must be numbers"),
    ('{"messages": [], "settings": {"colour": 1}}', "unknown settings"),
    ('{"messages": [], "settings": [1]}', '"settings" must be an object'),
])
def test_load_rejects_bad_files(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "chat.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LocalqwenError, match=re.escape(error)):
        load_conversation(path, BASE)
    with pytest.raises(LocalqwenError, match="cannot read the file"):
        load_conversation(tmp_path / "missing.json", BASE)


def words(messages: list[dict]) -> int:  # a stand-in tokenizer: one token per word, 30 for the system prompt
    return 30 + sum(len(m["content"].split()) for m in messages)


def turn(i: int) -> list[dict]:
    return [{"role": "user", "content": f"q{i} " * 10}, {"role": "assistant", "content": f"a{i} " * 10}]


def test_fit_context_drops_the_oldest_turns_only() -> None:
    new = {"role": "user", "content": "new " * 10}
    history = turn(1) + turn(2) + turn(3) + [new]  # 30 + 70 words
    assert fit_context(history, words, n_ctx=200, room=100) == (history, 0)
    assert fit_context(history, words, n_ctx=200, room=101) == (history[2:], 1)
    assert fit_context(history, words, n_ctx=200, room=140) == (history[4:], 2)
    assert fit_context(history, words, n_ctx=200, room=190) == ([new], 3)  # alone it fits, if without the room
    tool_turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "call"},
                 {"role": "tool", "content": "result " * 50}, {"role": "assistant", "content": "a"}]
    assert fit_context(tool_turn + history, words, n_ctx=200, room=100) == (history, 1)  # a turn goes whole
    huge = {"role": "user", "content": "w " * 200}
    assert fit_context([*history[:-1], huge], words, n_ctx=200, room=10) == ([*history[:-1], huge], 0)


class Lines:
    """A stand-in prompt session that answers prompts from a list."""

    def __init__(self, *lines: str) -> None:
        self.lines, self.prompts = list(lines), []

    def prompt(self, message: str, default: str = "") -> str:
        self.prompts.append(message)
        return self.lines.pop(0)


def test_multi_line_messages() -> None:
    session = Lines('"""', "/not a command", "  second line", '"""')
    assert read_message(session) == ("/not a command\n  second line", True)
    assert session.prompts == [">>> ", "... ", "... ", "... "]
    assert read_message(Lines('"""one line"""')) == ("one line", True)
    assert read_message(Lines('"""first', 'last"""')) == ("first\nlast", True)
    assert read_message(Lines("  /show  ")) == ("/show", False)


# --- The session on real llama.cpp, in-process (plain text output) ---------------------------------------------------

def session_of(model: Model, settings: ChatSettings = GREEDY) -> tuple[ChatSession, io.StringIO]:
    out = io.StringIO()
    return ChatSession(model, settings, Console(file=out, width=120)), out


def test_turns_are_kept_and_trimmed_with_notice(model: Model) -> None:
    chat, out = session_of(model, ChatSettings(system="Be kind.", max_tokens=60, sampling={"temperature": 0.0}))
    chat.send("Hi")
    assert chat.messages == [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": ANSWER, "reasoning_content": THINKING}]
    text = out.getvalue()
    assert text.index("Thinking...") < text.index(THINKING) < text.index("Thought for") < text.index(ANSWER)
    assert chat.used == len(model.tokenize_chat([{"role": "system", "content": "Be kind."}, *chat.messages]))
    long = "the " * 420  # with the first turn and 60 tokens for the reply, more than the context holds
    chat.send(long)
    text = out.getvalue()
    assert "dropped 1 earlier turn to fit the context" in text
    assert re.search(r"context \d+% full \(\d+/512 tokens\): the oldest turns will be dropped", text)
    assert chat.messages == [{"role": "user", "content": long},
                             {"role": "assistant", "content": ANSWER, "reasoning_content": THINKING}]
    assert chat.settings.system == "Be kind." and 0.8 * model.n_ctx < chat.used < model.n_ctx


def test_token_limit_and_errors_keep_the_session(model: Model) -> None:
    chat, out = session_of(model, ChatSettings(max_tokens=3, sampling={"temperature": 0.0}))
    chat.send("Hi")
    assert "Thought for 3 tokens" in out.getvalue() and chat.messages == []
    assert "stopped at the token limit while thinking: no answer, the exchange is not kept" in out.getvalue()
    chat.send("word " * 600)  # longer than the whole context
    assert "Error: the prompt is" in out.getvalue() and "more than the context of 512 allows" in out.getvalue()
    for line in ("/stats", "/set top_p 5", "/nope", "/save", "/load /nonexistent.json"):
        assert chat.command(line)
    assert out.getvalue().count("Error: ") == 5 and "unknown command /nope" in out.getvalue()
    assert not chat.command("/bye")


class InterruptOn(io.StringIO):
    """Output that sends this process SIGINT (`times` times: a second one stops at once) when `text` shows up."""

    def __init__(self, text: str, times: int) -> None:
        super().__init__()
        self.text, self.times = text, times

    def write(self, s: str) -> int:
        n = super().write(s)
        while self.times and self.text in self.getvalue():
            self.times -= 1
            os.kill(os.getpid(), signal.SIGINT)
        return n


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_a_reply_and_drops_it(endless: Model, presses: int) -> None:
    out = InterruptOn(ENDLESS_THINKING + "!!!", presses)
    chat = ChatSession(endless, ChatSettings(verbose=True, sampling={"temperature": 0.0}), Console(file=out))
    before = signal.getsignal(signal.SIGINT)  # Python's own handler; ignored when the tests run as a background job
    chat.send("Hi")
    assert signal.getsignal(signal.SIGINT) is before  # put back
    text = out.getvalue()
    assert re.search(r"!!!\nThought for \d+ tokens, [\d.]+ s \(stopped\)\nstopped: this exchange is not kept", text)
    assert "finish      cancelled" in text
    assert chat.messages == [] and chat.last.finish_reason == "cancelled"


def test_repl_reads_commands_from_the_prompt(model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prompt_toolkit.input import create_pipe_input

    monkeypatch.setenv("LOCALQWEN_HOME", str(tmp_path))
    out = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text("/set temperature 0.2\rhalf typed\x03/show\r/help\r\x04")  # Ctrl+C clears, Ctrl+D leaves
        chat_repl(model, ChatSettings(), input=pipe, output=out)
    text = out.getvalue()
    assert "temperature set to 0.2" in text and re.search(r"^  temperature +0\.2$", text, re.M)
    assert "/save FILE" in text
    history = (tmp_path / "chat_history").read_text()
    assert history.count("/show") == 1 and "half typed" not in history  # abandoned with Ctrl+C, never sent


# --- The real thing in a terminal ------------------------------------------------------------------------------------

class Pane:
    def __init__(self, tmux: list[str], name: str) -> None:
        self.tmux, self.name = tmux, name

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, *(["-l"] if literal else []), *keys], check=True)

    def line(self, text: str) -> None:
        self.keys(text, literal=True)
        self.keys("Enter")

    def screen(self) -> str:
        result = subprocess.run([*self.tmux, "capture-pane", "-p", "-J", "-S", "-500", "-t", self.name],
                                capture_output=True, text=True)
        return "\n".join(line.rstrip() for line in result.stdout.splitlines())

    def alive(self) -> bool:
        return subprocess.run([*self.tmux, "has-session", "-t", self.name], capture_output=True).returncode == 0

    def wait_for(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, screen := self.screen(), re.M):
            if time.monotonic() > deadline or not self.alive():
                pytest.fail(f"{pattern!r} did not appear in pane {self.name}:\n{screen}")
            time.sleep(0.1)
        return screen

    def idle(self) -> str:
        """Wait for an empty prompt (its placeholder shows) with the toolbar below it."""
        return self.wait_for(r"^>>> Send a message \(/\? for help\)\n+ ctx \d+/\d+ ")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux to drive a real terminal")
def test_chat_in_a_terminal(gguf: dict[str, Path], tmp_path: Path) -> None:
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock"), "-f", "/dev/null"]
    localqwen = Path(sys.executable).with_name("localqwen")
    # (GNU readline, which pytest loads, exports COLUMNS=80 and LINES=24: let the pane's real size count.)
    env = f"env -u COLUMNS -u LINES HOME={tmp_path} LOCALQWEN_HOME={tmp_path / 'home'}"

    def start(name: str, model: Path, ctx: int, sampling: str = "--temperature 0") -> Pane:
        command = f"{env} {localqwen} chat -m {shlex.quote(str(model))} {sampling} --ctx {ctx} 2>>{tmp_path}/err"
        subprocess.run([*tmux, "new-session", "-d", "-s", name, "-x", "120", "-y", "40", command], check=True)
        return Pane(tmux, name)

    try:
        # The endless model off its script picks at random between its two likeliest tokens ("!" and '"'): thinking
        # that never repeats itself, so the loop guard (on in the command) lets it think until it is stopped.
        chat = start("chat", gguf["scripted"], 512)
        endless = start("endless", gguf["endless"], 4096, sampling="--temperature 0.5 --top-k 2")
        chat.idle()
        chat.line("Hi")
        screen = chat.wait_for(re.escape(ANSWER))
        # The thinking was shown apart, then collapsed to its summary line once the answer started.
        assert re.search(r"^>>> Hi\nThought for \d+ tokens, [\d.]+ s\n" + re.escape(ANSWER) + "$", screen, re.M)
        assert THINKING not in screen
        used = int(chat.wait_for(r"ctx [1-9]\d*/512").rsplit("ctx ", 1)[1].split("/")[0])

        chat.line("/set temperature 0.3")
        chat.wait_for("temperature set to 0.3")
        chat.line("/show")
        chat.wait_for(r"^  temperature +0\.3$")
        chat.line(f"/save {tmp_path / 'chat.json'}")
        chat.wait_for("saved 1 turn to")
        assert json.loads((tmp_path / "chat.json").read_text(encoding="utf-8")) == {
            "system": None,
            "messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": ANSWER, "reasoning_content": THINKING}],
            "settings": {"hide_thinking": False, "verbose": False, "max_tokens": None, "thinking_budget": None,
                         "sampling": {"temperature": 0.3}}}
        chat.line("/clear")
        chat.wait_for("conversation cleared")
        chat.wait_for(r"ctx 0/512")
        chat.line(f"/load {tmp_path / 'chat.json'}")
        chat.wait_for(re.escape(f"loaded 1 turn from {tmp_path / 'chat.json'} (ctx {used}/512)"))
        chat.wait_for(f"ctx {used}/512")

        chat.line("/set max_tokens 3")
        chat.line("Hi")
        chat.wait_for("stopped at the token limit while thinking")
        chat.idle()
        chat.keys("half typed", literal=True)
        chat.wait_for(r"^>>> half typed")
        chat.keys("C-c")  # at the prompt: clears the line, the chat goes on
        assert re.search(r"^>>> half typed\n>>> Send a message", chat.idle(), re.M)
        chat.line("/bye")

        endless.idle()
        endless.line("Hi")
        screen = endless.wait_for(r"carefully\.[!\"]{3}")  # the thinking streams live, under its header
        assert re.search(r"^>>> Hi\nThinking\.\.\. \d+ s · Enter: answer now\nLet me think", screen, re.M)
        endless.keys("C-c")
        endless.wait_for("stopped: this exchange is not kept")
        endless.line("/stats")
        endless.wait_for(r"finish +cancelled")
        endless.idle()
        endless.keys("C-d")  # Ctrl+D at an empty prompt leaves

        for pane in (chat, endless):
            deadline = time.monotonic() + 10
            while pane.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not pane.alive(), f"{pane.name} is still running:\n{pane.screen()}"
        errors = (tmp_path / "err").read_text()
        assert "Traceback" not in errors, errors
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
