"""The web chat page of `localqwen serve`, in a real headless Chromium (Debian's `chromium`, driven by Playwright),
against the real server on a loopback port with known-output chain models. (A chain model's next token outweighs
all others so far that the page's default sampling, the model card's, gives the scripted text as greedy decoding does.)

Every page opened here records the requests it makes to other origins (they are also aborted, so nothing leaves the
machine) and its script errors and CSP violations; each test ends by asserting there were none.

Screenshots for the README: LOCALQWEN_SCREENSHOTS=docs/images pytest tests/test_web_ui.py -k themes
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect, sync_playwright

from localqwen.constants import THINK_CLOSE_ID, THINKING_BUDGET_WRAP_UP
from localqwen.model import Model
from localqwen.server import create_app
from localqwen.synthetic import script_chain
from localqwen.web import CONTENT_SECURITY_POLICY, STATIC
from tests.structured import PONDER_ANSWER, pondering_model_file
from tests.test_server import ANSWER, THINKING, load_chain, running

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "sk-web-test"
# Hostile model output: raw HTML that would run a script and send a request, and a javascript: link.
XSS_THINKING = "Testing hostile markup"
# (A chain says each token once: hence </SCRIPT> in capitals, and no space before <img.)
XSS_HTML = '<script>window.pwned=1</SCRIPT> then<img src=x onerror="fetch(`//evil.test`)">'
XSS_ANSWER, XSS_SHOWN = f"[click](javascript:void(0)) or {XSS_HTML}", f"click or {XSS_HTML}"
# A conversation file with hostile fields everywhere a file can put text.
HOSTILE_FILE = {
    "format": "localqwen-conversation", "version": 1, "title": '<img src=x onerror="window.pwned=2">',
    "created": 1, "updated": 2, "settings": {"system": "<script>window.pwned=3</script>"},
    "messages": [
        {"role": "user", "content": "<iframe src=\"javascript:window.pwned=4\"></iframe>"},
        {"role": "assistant", "reasoning": "<svg onload=\"window.pwned=5\"></svg>",
         "content": "![pixel](http://evil.test/pixel.png) <a href=\"javascript:window.pwned=6\">a</a> "
                    "$\\href{javascript:window.pwned=7}{x}$ <style>body{display:none}</style>\n\n"
                    "<details open ontoggle=\"window.pwned=8\">d</details>",
         "finish_reason": "stop"},
    ],
}
# A conversation with Markdown, math and code, for the rendering test and the README's screenshots.
SAMPLE_FILE = {
    "format": "localqwen-conversation", "version": 1, "title": "Multiply 17 by 24", "created": 1764000000000,
    "updated": 1764000000000, "settings": {},
    "messages": [
        {"role": "user", "content": "What is 17 × 24? Check it in Python too."},
        {"role": "assistant", "reasoning": "17 × 24 is 17 × 20 + 17 × 4 = 340 + 68 = 408. A one-line Python print "
                                           "confirms it.",
         "content": "Split the product: $17 \\times 24 = 17 \\times 20 + 17 \\times 4 = 340 + 68$, so\n\n"
                    "$$17 \\times 24 = \\boxed{408}$$\n\n```python\nprint(17 * 24)  # 408\n```\n\n"
                    "- **Check:** $408 / 24 = 17$\n- Prices like $5 and $10 stay text.",
         "finish_reason": "stop",
         "stats": {"prompt_tokens": 26, "completion_tokens": 151, "thinking_tokens": 48, "thinking_deltas": 47,
                   "ttft_s": 0.21, "thinking_s": 3.9, "total_s": 12.3, "tokens_per_s": 12.6}},
    ],
}


# --- servers and browser -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("web")
    chain, _ = script_chain(THINKING, ANSWER)
    xss_chain, _ = script_chain(XSS_THINKING, XSS_ANSWER)
    loaded = {"scripted": load_chain(tmp, "scripted", chain), "xss": load_chain(tmp, "xss", xss_chain),
              # "Hmm", then at temperature 0 "!" forever, until it is stopped or asked to answer now (then it says
              # PONDER_ANSWER). Without its loop guard, which would wrap the "!!!" up.
              "endless": Model.load(pondering_model_file(tmp / "endless"), n_ctx=8192, gpu_layers=0, threads=1,
                                    loop_guard=False)}
    yield {**loaded, "chain": chain}
    for model in loaded.values():
        model.close()


ATTACK_PAGE = b"""<!doctype html><script>
(async () => {
  const chat = new URLSearchParams(location.search).get("target") + "/v1/chat/completions";
  const body = JSON.stringify({messages: [{role: "user", content: "Hi"}], max_tokens: 3});
  // A "simple" request (no preflight): the browser sends it whatever CORS says, and cannot read the answer.
  await fetch(chat, {method: "POST", mode: "no-cors", body}).catch(() => {});
  // A JSON request: preflighted; the page reads the answer only if the server allows this origin.
  try {
    const response = await fetch(chat, {method: "POST", headers: {"Content-Type": "application/json"}, body});
    document.title = "read: " + (await response.json()).choices[0].finish_reason;
  } catch (error) {
    document.title = "blocked";
  }
})();
</script>"""


class AttackPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(ATTACK_PAGE)))
        self.end_headers()
        self.wfile.write(ATTACK_PAGE)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def attacker() -> Iterator[str]:
    """Another site on this machine (another port: another origin), whose page calls the API of `?target=`.
    On loopback like the server, as a local dev server or a rebound name would be (Chrome keeps public sites away
    from loopback addresses by itself; other browsers do not)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), AttackPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def servers(models: dict, attacker: str) -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as stack:
        yield {
            "main": stack.enter_context(running(create_app(models["scripted"], model_id="qwen-test"))),
            "keyed": stack.enter_context(running(create_app(models["scripted"], api_key=KEY))),
            "cors": stack.enter_context(running(create_app(models["scripted"], cors_origins=[attacker]))),
            "none": stack.enter_context(running(create_app(models["scripted"], reasoning_format="none"))),
            "xss": stack.enter_context(running(create_app(models["xss"]))),
            "endless": stack.enter_context(running(create_app(models["endless"]))),
        }


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium at {CHROMIUM}: .ci/run installs Debian's chromium package")
        pytest.skip("needs Debian's chromium package (apt-get install chromium)")
    with sync_playwright() as playwright:
        yield launch(playwright)


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)


class Watched:
    """A browser context whose pages may talk only to `base`: any other request is recorded and aborted; script
    errors and CSP violations are recorded too."""

    def __init__(self, context: BrowserContext, base: str) -> None:
        self.context, self.base = context, base
        self.foreign: list[str] = []
        self.errors: list[str] = []
        self.requests: list[tuple[str, str]] = []
        context.route(lambda url: not self.own(url), self._refuse)

    def own(self, url: str) -> bool:
        return url.removeprefix("blob:").startswith(self.base + "/")

    def _refuse(self, route) -> None:
        self.foreign.append(route.request.url)
        route.abort()

    def page(self, path: str = "/", *, ready: bool = True) -> Page:
        """A new page at `path`; `ready`: wait until the page has started (it asks for a missing key first)."""
        page = self.context.new_page()
        page.on("request", lambda request: self.requests.append((request.method, request.url)))
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("console", self._console)
        page.on("dialog", lambda dialog: dialog.accept())  # confirm() of Delete
        page.goto(self.base + path)
        if ready:
            page.wait_for_selector("body[data-ready]")
        return page

    def _console(self, message) -> None:
        # Chrome also logs each HTTP error status here ("Failed to load resource"): the page handles those itself.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(f"console {message.type}: {message.text}")

    def posts(self, path: str) -> int:
        return sum(1 for method, url in self.requests if method == "POST" and url == self.base + path)


@pytest.fixture
def watch(browser: Browser) -> Iterator:
    """watch(base, **context_options) -> Watched; asserts at the end that nothing went elsewhere or failed."""
    opened: list[Watched] = []

    def open_context(base: str, **options) -> Watched:
        watched = Watched(browser.new_context(**options), base)
        opened.append(watched)
        return watched

    yield open_context
    for watched in opened:
        watched.context.close()
        assert watched.foreign == [], f"the page made requests to other origins: {watched.foreign}"
        assert watched.errors == [], f"script errors or CSP violations: {watched.errors}"


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_reply(page: Page, replies: int) -> None:
    """Until the conversation on screen has `replies` assistant messages and no reply runs."""
    page.wait_for_function("n => !document.body.classList.contains('running') && "
                           "document.querySelectorAll('.message.assistant').length === n", arg=replies)


@contextlib.contextmanager
def new_reply(page: Page, replies: int = 1) -> Iterator[None]:
    """Around an action that asks for a reply: until that reply has finished (`replies` on screen then)."""
    with page.expect_request(lambda request: request.url.endswith("/v1/chat/completions")):
        yield
    wait_reply(page, replies)


def wait_idle(url: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/health").json()["generating"]:
        assert time.monotonic() < deadline, "the generation kept running"
        time.sleep(0.05)


def import_file(page: Page, tmp_path: Path, data: dict, name: str = "conversation.json") -> None:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    page.set_input_files("#import-file", str(path))


# --- the page and its assets ------------------------------------------------------------------------------------------

def test_page_and_assets_are_served_with_security_headers(servers: dict) -> None:
    url = servers["main"]
    page = httpx.get(f"{url}/", headers={"Accept": "text/html"})  # as a browser asks (apps probing get text)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    assert "static/js/app.js" in assets and len(assets) >= 8
    for response in [page, *(httpx.get(f"{url}/{asset}") for asset in assets)]:
        assert response.status_code == 200, response.url
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-frame-options"] == "DENY"
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'",
                      "require-trusted-types-for 'script'"):
        assert directive in CONTENT_SECURITY_POLICY
    assert "http" not in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
    # No key is needed for the page, and a missing asset is a JSON 404 like the API's.
    assert httpx.get(f"{servers['keyed']}/").status_code == 200
    assert httpx.get(f"{url}/static/nothing.js").json()["error"]["code"] == "not_found"


def test_vendored_libraries_match_their_record() -> None:
    vendor = STATIC / "vendor"
    versions = json.loads((vendor / "VERSIONS.json").read_text())
    assert set(versions) == {"marked", "dompurify", "@highlightjs/cdn-assets", "katex"}
    total = 0
    for name, entry in versions.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", entry["version"]) and entry["integrity"].startswith("sha512-")
        assert entry["license"] and any(f.startswith("licences/") for f in entry["files"]), name
        for file, digest in entry["files"].items():
            data = (vendor / file).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, file
            total += len(data)
    assert total < 1 << 20  # the page stays small: MathML needs no KaTeX fonts
    # The script that vendors them pins the same versions (its --check reads no network).
    script = Path(__file__).resolve().parent.parent / "scripts" / "vendor_web.py"
    checked = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert checked.returncode == 0 and "4 packages" in checked.stdout, checked.stderr


# --- chatting -----------------------------------------------------------------------------------------------------

def test_reply_shows_exact_thinking_collapsed_and_answer(servers: dict, models: dict, watch) -> None:
    watched = watch(servers["main"])
    page = watched.page()
    page.fill("#input", "Hi")
    page.press("#input", "Shift+Enter")  # a new line, not a send
    page.locator("#input").press_sequentially("there")
    assert page.input_value("#input") == "Hi\nthere" and watched.posts("/v1/chat/completions") == 0
    page.fill("#input", "Hi")
    with new_reply(page):
        page.press("#input", "Enter")
        page.press("#input", "Enter")  # a second Enter while the first is checked sends nothing more
    assert watched.posts("/v1/chat/completions") == 1 and page.locator(".message.user").count() == 1

    reply = page.locator(".message.assistant")
    thinking = reply.locator("details.thinking")
    assert thinking.evaluate("d => d.open") is False  # collapsed once the answer started
    tokens = models["chain"].index(THINK_CLOSE_ID)  # the server's reasoning_tokens (</think> included)
    assert re.fullmatch(rf"Thought for {tokens} tokens, \d+\.\d s", thinking.locator("summary").inner_text())
    assert not reply.locator(".thinking-text").is_visible()
    thinking.locator("summary").click()  # expandable later
    assert reply.locator(".thinking-text").inner_text() == THINKING
    assert reply.locator(".answer").inner_text() == ANSWER
    stats = reply.locator(".stats").inner_text()
    assert re.fullmatch(rf"{len(models['chain']) - 2} tokens · [\d.]+ tokens/s · first token [\d.]+ s · finish: stop",
                        stats), stats
    assert page.locator(".message.user .bubble").inner_text() == "Hi"
    assert page.locator("#title").inner_text() == "Hi"
    # Context use: the conversation's prompt as the server's /tokenize counts it, out of the model's context.
    used = len(models["scripted"].tokenize_chat([{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": ANSWER}]))
    page.wait_for_function("text => document.getElementById('context-use').textContent === text",
                           arg=f"{used} / 512 tokens")
    assert page.locator("#answer-now").is_hidden()  # only while a reply thinks


def test_thinking_left_in_the_text_is_split_too(servers: dict, models: dict, watch) -> None:
    # serve --reasoning-format none: "<think>\n...\n</think>\n\n" opens the content; the page splits it itself.
    page = watch(servers["none"]).page()
    with new_reply(page):
        send(page, "Hi")
    reply = page.locator(".message.assistant")
    assert reply.locator("details.thinking").evaluate("d => d.open") is False
    tokens = models["chain"].index(THINK_CLOSE_ID)
    assert re.fullmatch(rf"Thought for {tokens} tokens, \d+\.\d s", reply.locator("summary").inner_text())
    reply.locator("summary").click()
    assert reply.locator(".thinking-text").inner_text() == THINKING
    assert reply.locator(".answer").inner_text() == ANSWER


def test_stop_ends_a_reply_and_its_generation(servers: dict, watch) -> None:
    url = servers["endless"]
    page = watch(url).page()
    page.click("#open-settings")
    page.fill("#settings [name=temperature]", "0")
    page.click("#settings button[value=save]")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        send(page, "Hi")
    assert request.value.post_data_json["temperature"] == 0
    thinking = page.locator(".message.assistant .thinking-text")
    page.wait_for_function("() => document.querySelector('.thinking-text').textContent.length > 30")
    assert page.locator(".message.assistant details").evaluate("d => d.open")  # live thinking is shown
    assert page.locator("#answer-now").is_visible()
    page.keyboard.press("Escape")
    wait_reply(page, 1)
    assert page.locator(".message.assistant .note").inner_text() == "Stopped."
    assert thinking.inner_text().startswith("Hmm!!!")
    wait_idle(url)  # closing the stream stopped the generation on the server

    page.click(".message.assistant .regenerate")  # the Stop button does the same
    page.wait_for_function("() => document.querySelector('.thinking-text')?.textContent.length > 30")
    page.click("#stop")
    wait_reply(page, 1)
    assert page.locator(".message.assistant .note").inner_text() == "Stopped."
    assert re.fullmatch(r"Thought for ~\d+ tokens, [\d.]+ s", page.locator(".message.assistant summary").inner_text())
    wait_idle(url)


def test_answer_now_ends_the_thinking(servers: dict, watch) -> None:
    url = servers["endless"]
    watched = watch(url)
    page = watched.page()
    page.click("#open-settings")
    page.fill("#settings [name=temperature]", "0")
    page.click("#settings button[value=save]")
    send(page, "Hi")
    page.wait_for_function("() => document.querySelector('.thinking-text')?.textContent.length > 30")
    button = page.locator("#answer-now")
    expect(button).to_be_visible()
    with page.expect_response(lambda r: r.url.endswith("/answer-now")) as answered:
        button.click()
    assert answered.value.status == 200 and watched.posts("/v1/chat/completions") == 1
    wait_reply(page, 1)
    reply = page.locator(".message.assistant")
    assert reply.locator(".answer").inner_text() == PONDER_ANSWER
    assert reply.locator(".stats").inner_text().endswith("finish: stop")
    reply.locator("summary").click()
    thinking = reply.locator(".thinking-text").inner_text()
    assert thinking.startswith("Hmm!!!") and thinking.endswith(THINKING_BUDGET_WRAP_UP.strip())
    expect(button).to_be_hidden()
    wait_idle(url)


def test_thinking_cut_short_is_said_plainly(servers: dict, watch) -> None:
    page = watch(servers["main"]).page()
    page.click("#open-settings")
    page.fill("#settings [name=max_tokens]", "5")
    page.click("#settings button[value=save]")
    with new_reply(page, 1):
        send(page, "Hi")
    reply = page.locator(".message.assistant")
    assert reply.locator(".answer").inner_text() == ""
    assert reply.locator(".note").inner_text().startswith("The thinking was cut short: the token limit ran out")
    assert reply.locator(".stats").inner_text().endswith("finish: length")


def test_edit_and_regenerate(servers: dict, watch) -> None:
    watched = watch(servers["main"])
    page = watched.page()
    with new_reply(page, 1):
        send(page, "Hello")
    page.locator(".message.user").hover()
    page.click(".message.user .edit")
    page.fill(".edit-box textarea", "Hi again")
    with new_reply(page):
        page.press(".edit-box textarea", "Enter")
    assert page.locator(".message.user .bubble").all_inner_texts() == ["Hi again"]
    assert page.locator(".message.assistant .answer").all_inner_texts() == [ANSWER]
    with new_reply(page):
        page.click(".message.assistant .regenerate")
    assert page.locator(".message").count() == 2 and watched.posts("/v1/chat/completions") == 3


def test_a_message_that_cannot_fit_is_refused_before_it_is_sent(servers: dict, models: dict, watch) -> None:
    watched = watch(servers["main"])
    page = watched.page()
    text = "word " * 600
    send(page, text)
    page.wait_for_selector("#notice:not([hidden])")
    prompt = len(models["scripted"].tokenize_chat([{"role": "user", "content": text}]))
    assert page.locator("#notice").inner_text() == (
        f"This message does not fit: with the conversation it makes a prompt of {prompt} tokens, and the model's "
        f"context holds 512 ({prompt - 511} too many). Shorten it, or start a new chat.")
    assert watched.posts("/v1/chat/completions") == 0 and page.input_value("#input") == text


def test_copy_buttons_copy_the_answer_and_the_code(servers: dict, watch, tmp_path: Path) -> None:
    page = watch(servers["main"], permissions=["clipboard-read", "clipboard-write"]).page()
    import_file(page, tmp_path, SAMPLE_FILE)
    page.wait_for_selector(".message.assistant pre")
    page.click(".message.assistant pre .copy")
    assert page.evaluate("navigator.clipboard.readText()") == "print(17 * 24)  # 408"
    page.click(".message.assistant .actions .copy")
    assert page.evaluate("navigator.clipboard.readText()") == SAMPLE_FILE["messages"][1]["content"]


def test_markdown_math_and_code_render(servers: dict, watch, tmp_path: Path) -> None:
    page = watch(servers["main"]).page()
    import_file(page, tmp_path, SAMPLE_FILE)
    answer = page.locator(".message.assistant .answer")
    answer.locator("pre").wait_for()
    assert answer.locator("math").count() == 3 and answer.locator("math[display=block]").count() == 1
    assert answer.locator("menclose[notation=box] mn").text_content() == "408"  # \boxed{408}
    assert answer.locator("annotation, semantics").count() == 0  # the TeX source is not shown beside the formula
    assert answer.locator("code.language-python .hljs-built_in").inner_text() == "print"
    assert answer.locator("strong").inner_text() == "Check:"
    assert "Prices like $5 and $10 stay text." in answer.inner_text()
    assert page.locator(".message.assistant summary").inner_text() == "Thought for 48 tokens, 3.9 s"


# --- conversations: storage, export, import -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_conversations_survive_a_reload_and_a_server_restart(models: dict, watch) -> None:
    port = free_port()
    with running(create_app(models["scripted"]), port) as url:
        watched = watch(url)
        page = watched.page()
        with new_reply(page, 1):
            send(page, "Hi")
        page.click("#new-chat")
        with new_reply(page, 1):
            send(page, "Hello")
        page.reload()
        page.wait_for_selector("body[data-ready]")
        assert page.locator("#conversations .open").all_inner_texts() == ["Hello", "Hi"]
        assert page.locator("#conversations li.current .open").inner_text() == "Hello"  # the one left open
    with running(create_app(models["scripted"]), port):  # a new server process on the same address
        page.reload()
        page.wait_for_selector("body[data-ready]")
        page.click("#conversations li:nth-child(2) .open")
        assert page.locator(".message.user .bubble").inner_text() == "Hi"
        assert page.locator(".message.assistant .answer").inner_text() == ANSWER
        page.click(".message.assistant summary")
        assert page.locator(".message.assistant .thinking-text").inner_text() == THINKING
        # Rename and delete.
        page.click("#conversations li.current .rename")
        page.fill(".rename-input", "Greeting")
        page.press(".rename-input", "Enter")
        expect(page.locator("#title")).to_have_text("Greeting")
        page.click("#conversations li.current .delete")
        expect(page.locator("#conversations .open")).to_have_text(["Hello"])


def test_export_then_import_gives_the_same_conversation(servers: dict, watch, tmp_path: Path) -> None:
    page = watch(servers["main"]).page()
    page.click("#open-settings")
    page.fill("#settings [name=system]", "Be brief.")
    page.fill("#settings [name=top_k]", "10")
    page.select_option("#settings [name=reasoning_effort]", "low")
    page.click("#settings button[value=save]")
    page.click("#open-settings")
    assert page.input_value("#settings [name=top_k]") == "10"
    assert page.get_attribute("#settings [name=temperature]", "placeholder") == "0.6"  # the model's default
    page.fill("#settings [name=temperature]", "1.5")
    page.keyboard.press("Escape")  # closes without saving
    with new_reply(page, 1):
        send(page, "Hi")
    with new_reply(page, 2):
        send(page, "Thanks")
    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    assert download.value.suggested_filename == "Hi.json"
    assert exported["format"] == "localqwen-conversation" and exported["title"] == "Hi"
    assert exported["settings"] == {"system": "Be brief.", "top_k": 10, "reasoning_effort": "low"}
    assert [(m["role"], m["content"]) for m in exported["messages"]] == [
        ("user", "Hi"), ("assistant", ANSWER), ("user", "Thanks"), ("assistant", ANSWER)]
    assert [m.get("reasoning") for m in exported["messages"]] == [None, THINKING, None, THINKING]

    page.click("#conversations li.current .delete")
    expect(page.locator("#conversations li")).to_have_count(0)
    import_file(page, tmp_path, exported, "Hi.json")
    page.wait_for_selector(".message.assistant")
    assert page.locator("#title").inner_text() == "Hi"
    with page.expect_download() as again:
        page.click("#export")
    assert json.loads(Path(again.value.path()).read_text(encoding="utf-8")) == exported
    assert page.locator(".message.assistant .answer").all_inner_texts() == [ANSWER, ANSWER]


def test_a_bad_file_is_refused_with_the_field_named(servers: dict, watch, tmp_path: Path) -> None:
    page = watch(servers["main"]).page()
    bad = {**SAMPLE_FILE, "messages": [{"role": "user", "content": "ok"}, {"role": "robot", "content": "x"}]}
    import_file(page, tmp_path, bad, "bad.json")
    page.wait_for_selector("#notice:not([hidden])")
    assert page.locator("#notice").inner_text() == \
        "Not imported: bad.json: messages[1].role must be user or assistant"
    assert page.locator("#conversations li").count() == 0


# --- untrusted text -------------------------------------------------------------------------------------------------

def test_hostile_model_output_renders_as_inert_text(servers: dict, watch) -> None:
    watched = watch(servers["xss"])
    page = watched.page()
    with new_reply(page, 1):
        send(page, "Show me")
    answer = page.locator(".message.assistant .answer")
    assert answer.inner_text() == XSS_SHOWN
    assert answer.locator("script, img, iframe").count() == 0
    assert answer.locator("a").inner_text() == "click" and answer.locator("a").get_attribute("href") is None
    page.wait_for_timeout(300)  # an image's onerror would have fired by now
    assert page.evaluate("window.pwned") is None
    assert not any("/x" in url for _, url in watched.requests)


def test_hostile_conversation_file_renders_as_inert_text(servers: dict, watch, tmp_path: Path) -> None:
    watched = watch(servers["main"])
    page = watched.page()
    import_file(page, tmp_path, HOSTILE_FILE)
    page.wait_for_selector(".message.assistant")
    page.click(".message.assistant summary")  # show the thinking too
    page.wait_for_timeout(300)
    assert page.locator("#title").inner_text() == HOSTILE_FILE["title"]
    assert page.locator("#conversations .open").inner_text() == HOSTILE_FILE["title"]
    assert page.locator(".message.user .bubble").inner_text() == HOSTILE_FILE["messages"][0]["content"]
    assert page.locator(".thinking-text").inner_text() == HOSTILE_FILE["messages"][1]["reasoning"]
    assert page.locator("#messages").locator("img, iframe, svg, script, style, details:not(.thinking)").count() == 0
    assert page.locator("#messages [href^='javascript'], #messages [onload], #messages [ontoggle]").count() == 0
    assert page.evaluate("window.pwned") is None
    page.click("#open-settings")
    assert page.input_value("#settings [name=system]") == HOSTILE_FILE["settings"]["system"]


# --- the API key -----------------------------------------------------------------------------------------------

def test_api_key_is_asked_once_and_kept(servers: dict, watch) -> None:
    url = servers["keyed"]
    page = watch(url).page(ready=False)
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-dialog [name=key]", "wrong")
    page.click("#key-dialog button[value=save]")
    page.wait_for_selector("body[data-ready]")
    send(page, "Hi")
    page.wait_for_selector("#key-dialog[open]")
    assert page.locator("#key-reason").inner_text() == "The server refused this key: enter it again."
    page.fill("#key-dialog [name=key]", KEY)
    page.click("#key-dialog button[value=save]")
    wait_reply(page, 1)
    assert page.locator(".message.assistant .answer").inner_text() == ANSWER
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.locator("#key-dialog").evaluate("d => d.open") is False
    assert page.locator(".message.assistant .answer").inner_text() == ANSWER


# --- other sites --------------------------------------------------------------------------------------------------

def attack(watched: Watched, attacker: str, target: str) -> tuple[Page, list[tuple[str, int]]]:
    """Open the attacker's page against `target`; the statuses of the requests it got to send there."""
    watched.context.route(f"{attacker}/**", lambda route: route.continue_())  # the attacker's page itself may load
    page = watched.context.new_page()
    statuses: list[tuple[str, int]] = []
    page.on("response", lambda r: statuses.append((r.request.method, r.status)) if r.url.startswith(target) else None)
    page.goto(f"{attacker}/?target={target}")
    page.wait_for_function("() => document.title !== ''")
    return page, statuses


def test_other_sites_cannot_drive_the_model_from_a_browser(servers: dict, attacker: str, watch) -> None:
    url = servers["main"]
    page, statuses = attack(watch(url), attacker, url)
    assert page.title() == "blocked"
    assert ("POST", 403) in statuses  # the simple request: refused before the model saw anything
    assert not any(status == 200 for _, status in statuses)


def test_cors_lets_the_named_origin_in(servers: dict, attacker: str, watch) -> None:
    url = servers["cors"]
    page, statuses = attack(watch(url), attacker, url)
    assert page.title() == "read: length"  # the answer was read (max_tokens 3 ends it inside the thinking)
    assert ("POST", 200) in statuses


def test_origin_guard_over_http(servers: dict, attacker: str) -> None:
    url = servers["main"]
    chat = f"{url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    port = url.rsplit(":", 1)[1]

    def post(headers: dict, **kwargs) -> httpx.Response:
        return httpx.post(chat, headers=headers, **kwargs)

    refused = post({"Origin": "http://evil.example"}, json=body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "origin_not_allowed"
    assert "--cors http://evil.example" in refused.json()["error"]["message"]
    assert post({"Origin": "null"}, json=body).status_code == 403
    # DNS rebinding: a name that now points at 127.0.0.1 is same-origin with itself, not with the server.
    assert post({"Origin": f"http://rebound.example:{port}", "Host": f"rebound.example:{port}"},
                json=body).status_code == 403
    for own in (url, f"http://localhost:{port}"):
        assert post({"Origin": own, "Host": own.removeprefix("http://")}, json=body).status_code == 200
    assert post({}, json=body).status_code == 200  # curl, SDKs: no Origin
    # A body that is not declared as JSON never reaches the model: a cross-site form's encodings, or none.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        response = post({"Content-Type": content_type}, content=json.dumps(body))
        assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    assert post({}, content=json.dumps(body)).status_code == 415
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    assert httpx.options(chat, headers=preflight).status_code == 403

    allowed = servers["cors"]
    ok = httpx.options(f"{allowed}/v1/chat/completions", headers={
        "Origin": attacker, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == attacker
    read = httpx.get(f"{allowed}/v1/models", headers={"Origin": attacker})
    assert read.status_code == 200 and read.headers["access-control-allow-origin"] == attacker
    assert httpx.get(f"{allowed}/v1/models", headers={"Origin": "http://localhost:10"}).status_code == 403


# --- looks ------------------------------------------------------------------------------------------------------

def test_themes_follow_the_system_and_narrow_windows_fit(servers: dict, watch, tmp_path: Path) -> None:
    shots = Path(os.environ.get("LOCALQWEN_SCREENSHOTS") or tmp_path)
    backgrounds = {}
    for scheme in ("light", "dark"):
        page = watch(servers["main"], color_scheme=scheme, viewport={"width": 1180, "height": 720}).page()
        import_file(page, tmp_path, SAMPLE_FILE)
        page.wait_for_selector(".message.assistant pre")
        page.click(".message.assistant summary")
        page.fill("#input", "And 17 × 25?")
        backgrounds[scheme] = page.evaluate("getComputedStyle(document.body).backgroundColor")
        page.screenshot(path=shots / f"web-ui-{scheme}.png")
    assert backgrounds == {"light": "rgb(255, 255, 255)", "dark": "rgb(22, 24, 29)"}

    page = watch(servers["main"], viewport={"width": 380, "height": 700}).page()
    import_file(page, tmp_path, SAMPLE_FILE)
    page.wait_for_selector(".message.assistant pre")
    assert page.evaluate("document.documentElement.scrollWidth") <= 380  # nothing sticks out sideways
    assert page.locator("#sidebar").evaluate("e => e.getBoundingClientRect().right") <= 0  # folded away
    page.click("#toggle-sidebar")
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    page.click("#conversations .open")
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().right <= 0")
