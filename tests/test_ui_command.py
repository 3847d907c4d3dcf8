"""`localqwen serve --open` and `localqwen ui`: the chat page opens in the browser once the server answers, and `ui`
opens it without a second server when one already runs ($BROWSER stands in for the browser: webbrowser obeys it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_model import ANSWER, THINKING, chain_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_lines(path: Path, n: int, timeout: float = 90) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return lines
        assert time.monotonic() < deadline, f"the browser was opened {len(lines)} times, not {n}"
        time.sleep(0.1)


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for the browser")
def test_serve_open_then_ui(tmp_path: Path) -> None:
    gguf, _ = chain_model(tmp_path, THINKING, ANSWER)
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser"
    browser.write_text(f'#!/bin/sh\necho "$1" >> {opened}\n')
    browser.chmod(0o755)
    env = {**os.environ, "BROWSER": str(browser)}
    port = free_port()
    page = f"http://127.0.0.1:{port}/"
    localqwen = [sys.executable, "-m", "localqwen"]
    server = subprocess.Popen([*localqwen, "ui", "--port", str(port), "-m", str(gguf), "--ctx", "512",
                               "--prompt-cache", "off"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_for_lines(opened, 1) == [page]  # `ui` started the server and opened the page once it answered
        again = subprocess.run([*localqwen, "ui", "--port", str(port)], env=env, capture_output=True, text=True,
                               timeout=60)
        assert again.returncode == 0 and f"the chat page is at {page}" in again.stdout
        assert wait_for_lines(opened, 2) == [page, page] and server.poll() is None  # no second server
    finally:
        server.terminate()
        server.wait(30)
