"""Keys the terminal chat reads while a reply streams (prompt_toolkit reads only at the prompt): Enter asks the model
to answer now. The terminal is put in cbreak mode meanwhile (keys arrive one by one, unechoed, and Ctrl+C still
interrupts), a thread reads them, and what else was typed is kept for the next prompt.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import sys
import threading
from collections.abc import Callable
from typing import Any

ANSWER_NOW_KEYS = (b"\r", b"\n")  # Enter (cbreak mode leaves the terminal's \r -> \n translation on)
ANSWER_NOW_HINT = "Enter: answer now"
# What a key other than a character sends (arrows, function keys): not text to keep for the prompt.
ESCAPE_SEQUENCE = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|O.|.)?")


class KeyWatch:
    """While a reply streams, on the terminal `fd` (in cbreak mode meanwhile): Enter calls `on_enter` (once); other
    typed text is collected in `typed`. A context manager: the terminal's settings are put back on leaving, and keys
    typed after that stay for the prompt."""

    def __init__(self, fd: int, on_enter: Callable[[], None]) -> None:
        self.fd, self.on_enter = fd, on_enter
        self.pressed = False  # Enter was pressed
        self._typed = bytearray()
        self._saved: list[Any] = []
        self._stop_r, self._stop_w = -1, -1
        self._thread = threading.Thread(target=self._read, name="localqwen-chat-keys", daemon=True)

    @property
    def typed(self) -> str:
        """Printable text typed meanwhile (Enter and other keys left out)."""
        text = ESCAPE_SEQUENCE.sub("", self._typed.decode("utf-8", "ignore"))
        return "".join(c for c in text if c.isprintable())

    def __enter__(self) -> KeyWatch:
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)
        self._stop_r, self._stop_w = os.pipe()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import termios

        os.write(self._stop_w, b"x")
        self._thread.join()
        os.close(self._stop_r)
        os.close(self._stop_w)
        termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            data = os.read(self.fd, 1024)
            if not data:
                return
            for byte in (data[i:i + 1] for i in range(len(data))):
                if byte not in ANSWER_NOW_KEYS:
                    self._typed += byte
                elif not self.pressed:
                    self.pressed = True
                    self.on_enter()


def watch_keys(fd: int | None, on_enter: Callable[[], None]) -> contextlib.AbstractContextManager[KeyWatch | None]:
    """A KeyWatch on `fd`, or nothing where there is no terminal to read (None, not a tty, no termios: Windows)."""
    if fd is None or sys.platform == "win32" or not os.isatty(fd):
        return contextlib.nullcontext()
    return KeyWatch(fd, on_enter)
