"""Answer now in the terminal chat: Enter while the model thinks. In-process on a pseudo-terminal (the session's key
thread reads a real tty), and the real `localqwen chat` in tmux.

The pondering model (tests/structured.py) thinks "Hmm!!!..." until it is told to answer, then says PONDER_ANSWER.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from rich.console import Console

from localqwen.chat import ChatSession
from localqwen.constants import THINKING_BUDGET_WRAP_UP
from localqwen.conversation import ChatSettings
from localqwen.model import Model
from tests.structured import PONDER_ANSWER, pondering_model_file
from tests.test_chat import Pane


@pytest.fixture(scope="module")
def ponder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pondering_model_file(tmp_path_factory.mktemp("ponder"))


class TypeOn(io.StringIO):
    """Output that types `keys` on the terminal (a pty's master side) once `text` shows up."""

    def __init__(self, text: str, master: int, keys: bytes) -> None:
        super().__init__()
        self.text, self.master, self.keys = text, master, keys

    def write(self, s: str) -> int:
        n = super().write(s)
        if self.keys and self.text in self.getvalue():
            keys, self.keys = self.keys, b""
            os.write(self.master, keys)
        return n


def test_enter_answers_now(ponder_file: Path) -> None:
    model = Model.load(ponder_file, n_ctx=4096, gpu_layers=0, threads=1, loop_guard=False)  # it thinks "!" forever
    master, terminal = os.openpty()
    try:
        before = termios.tcgetattr(terminal)
        out = TypeOn("Hmm!!!!", master, b"draft\x1b[A\r")  # some text, an arrow key, then Enter
        chat = ChatSession(model, ChatSettings(sampling={"temperature": 0.0}), Console(file=out, width=120))
        chat.keys_fd = terminal
        chat.send("Hi")
        thinking = chat.messages[-1]["reasoning_content"]
        assert thinking.startswith("Hmm!!!") and thinking.endswith(THINKING_BUDGET_WRAP_UP.strip())
        assert chat.messages[-1]["content"] == PONDER_ANSWER and chat.last.wrap_up == "answer_now"
        assert chat.typed == "draft"  # what else was typed waits for the next prompt
        assert termios.tcgetattr(terminal) == before  # the terminal is as it was
    finally:
        os.close(master)
        os.close(terminal)
        model.close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux to drive a real terminal")
def test_enter_answers_now_in_a_terminal(ponder_file: Path, tmp_path: Path) -> None:
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock"), "-f", "/dev/null"]
    localqwen = Path(sys.executable).with_name("localqwen")
    env = f"env -u COLUMNS -u LINES HOME={tmp_path} LOCALQWEN_HOME={tmp_path / 'home'}"
    # Its loop guard is on (the command has no switch for it): thinking that picks at random between its two likeliest
    # tokens never repeats itself, and thinks until told. The answer's tokens outweigh all others: it stays exact.
    command = (f"{env} {localqwen} chat -m {shlex.quote(str(ponder_file))} --ctx 4096 --temperature 0.5 --top-k 2 "
               f"2>>{tmp_path}/err")
    subprocess.run([*tmux, "new-session", "-d", "-s", "chat", "-x", "120", "-y", "40", command], check=True)
    pane = Pane(tmux, "chat")
    try:
        pane.idle()
        pane.line("Hi")
        screen = pane.wait_for(r"Hmm[!\"]{20}")
        assert re.search(r"^>>> Hi\nThinking\.\.\. \d+ s · Enter: answer now\nHmm", screen, re.M)
        pane.keys("next", literal=True)  # typed while it thinks: not echoed into the reply, kept for the prompt
        pane.keys("Enter")
        screen = pane.wait_for(r"^>>> next$")
        assert re.search(r"^>>> Hi\nThought for \d+ tokens, [\d.]+ s\n" + re.escape(PONDER_ANSWER) + "$", screen,
                         re.M)
        pane.keys("C-u")
        pane.line("/stats")
        pane.wait_for(r"finish +stop")
        pane.line("/bye")
        deadline = time.monotonic() + 10
        while pane.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pane.alive(), pane.screen()
        errors = (tmp_path / "err").read_text()
        assert "Traceback" not in errors, errors
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
