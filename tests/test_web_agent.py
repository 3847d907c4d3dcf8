"""The chat page with `serve --mcp`, in the real browser (the harness of tests/test_web_ui.py): the server runs the test
MCP server's tools (tests/mcp_server.py) for the lookback model (tests/lookback_model.py), which calls get_weather on a
fresh question and answers with the weather word of the tool's result. Each call waits for Allow / Always allow /
Refuse in the page; results show as text; the turn's calls and results go back with the next message."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page

from localqwen.convert import convert
from localqwen.mcp_tools import McpTools, ServerConfig
from localqwen.model import Model
from localqwen.server import create_app

from .lookback_model import ANSWER, ANSWER_THINKING, CALL_THINKING, UNKNOWN, write_lookback_checkpoint
from .test_server import running
from .test_web_ui import browser, import_file, send, wait_idle, wait_reply, watch  # noqa: F401 (fixtures)

QUESTION = "What is the weather in Paris?"
SERVER = str(Path(__file__).with_name("mcp_server.py"))
HOSTILE = '<img src=x onerror="window.pwned=1"> grey'


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("lookback")
    [path] = convert(str(write_lookback_checkpoint(tmp / "lookback")), ["f16"], outdir=tmp, quiet=True)
    model = Model.load(path, n_ctx=2048, gpu_layers=0, threads=1)
    servers = {"weather": ServerConfig(command=sys.executable, args=[SERVER], env={"SKY": "grey"}),
               "hostile": ServerConfig(command=sys.executable, args=[SERVER], env={"SKY": HOSTILE})}
    with contextlib.ExitStack() as stack:
        weather = stack.enter_context(McpTools({"weather": servers["weather"]}, start_timeout=30))
        hostile = stack.enter_context(McpTools({"hostile": servers["hostile"]}, start_timeout=30))
        yield {"main": stack.enter_context(running(create_app(model, tools=weather.tools))),
               "hostile": stack.enter_context(running(create_app(model, tools=hostile.tools))),
               "plain": stack.enter_context(running(create_app(model)))}
    model.close()


def ask(page: Page, text: str = QUESTION) -> None:
    """Send `text` through the tool loop and wait until its first call asks for approval."""
    with page.expect_request(lambda request: request.url.endswith("/agent/chat")):
        send(page, text)
    page.wait_for_selector('.message.assistant:last-child .tool-step[data-status="approval"]')


def last_reply(page: Page):
    return page.locator(".message.assistant").last


def test_a_call_is_approved_in_the_page(urls: dict[str, str], watch) -> None:
    watched = watch(urls["main"])
    page = watched.page()
    assert page.locator("#tools-option").is_visible() and page.locator("#tools-label").inner_text() == "Tools (4)"
    assert "get_weather (weather): The weather in a city now." in page.get_attribute("#tools-option", "title")
    ask(page)
    step = last_reply(page).locator(".tool-step")
    assert step.locator(".tool-name").inner_text() == "get_weather"
    assert json.loads(step.locator(".tool-args").inner_text()) == {"city": "Paris"}
    assert step.locator(".tool-status").inner_text() == "waits for your approval"
    assert page.locator("body").evaluate("b => b.classList.contains('running')")  # the turn waits, the page too
    with page.expect_request(lambda r: "/agent/runs/" in r.url) as answer:
        step.locator("button.allow").click()
    assert answer.value.post_data_json == {"approve": True, "always": False}
    wait_reply(page, 1)
    reply = last_reply(page)
    assert step.get_attribute("data-status") == "ok" and step.locator(".tool-status").inner_text() == "done"
    step.locator(".tool-result summary").click()
    assert step.locator(".tool-result pre").inner_text() == "Paris: grey"
    assert reply.locator(".answer").inner_text() == ANSWER.format("grey")
    reply.locator("details.thinking summary").click()
    assert reply.locator(".thinking-text").inner_text() == f"{CALL_THINKING}\n\n{ANSWER_THINKING}"
    assert reply.locator(".stats").inner_text().endswith("finish: stop")

    # The next message carries this turn's call and result: the model answers from them without calling again.
    with page.expect_request(lambda r: r.url.endswith("/agent/chat")) as second:
        send(page, "And tomorrow?")
    wait_reply(page, 2)
    sent = second.value.post_data_json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[2]["content"] == "Paris: grey" and "reasoning_content" not in sent[1]
    assert last_reply(page).locator(".tool-step").count() == 0
    assert last_reply(page).locator(".answer").inner_text() == ANSWER.format("grey")
    # The context counter counts the tools' schemas and the tool messages, as the server does.
    conversation = [*sent, {"role": "assistant", "content": ANSWER.format("grey")}]
    schemas = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")}}
               for t in httpx.get(f"{urls['main']}/agent/tools").json()["tools"]]
    used = httpx.post(f"{urls['main']}/tokenize", json={"messages": conversation, "tools": schemas}).json()["count"]
    page.wait_for_function("text => document.getElementById('context-use').textContent === text",
                           arg=f"{used:,} / 2,048 tokens")


def test_refuse_and_always_allow(urls: dict[str, str], watch) -> None:
    watched = watch(urls["main"])
    page = watched.page()
    ask(page)
    last_reply(page).locator(".tool-step button.refuse").click()
    wait_reply(page, 1)
    step = last_reply(page).locator(".tool-step")
    assert step.get_attribute("data-status") == "refused" and step.locator(".tool-status").inner_text() == "refused"
    assert last_reply(page).locator(".answer").inner_text() == ANSWER.format(UNKNOWN)

    page.click("#new-chat")
    ask(page)
    with page.expect_request(lambda r: "/agent/runs/" in r.url) as answer:
        last_reply(page).locator(".tool-step button.always").click()
    assert answer.value.post_data_json == {"approve": True, "always": True}
    wait_reply(page, 1)
    assert page.evaluate("JSON.parse(localStorage.getItem('localqwen.alwaysTools'))") == ["get_weather"]

    page.click("#new-chat")  # from now on get_weather runs without asking
    with page.expect_request(lambda r: r.url.endswith("/agent/chat")) as third:
        send(page, QUESTION)
    wait_reply(page, 1)
    assert third.value.post_data_json["approved"] == ["get_weather"]
    assert last_reply(page).locator(".tool-step").get_attribute("data-status") == "ok"
    assert last_reply(page).locator(".answer").inner_text() == ANSWER.format("grey")
    assert watched.posts("/agent/chat") == 3


def test_stop_while_a_call_waits(urls: dict[str, str], watch) -> None:
    url = urls["main"]
    page = watch(url).page()
    ask(page)
    page.keyboard.press("Escape")
    wait_reply(page, 1)
    reply = last_reply(page)
    assert reply.locator(".tool-step").get_attribute("data-status") == "stopped"
    assert reply.locator(".tool-step .tool-status").inner_text() == "not run"
    assert reply.locator(".tool-step .tool-approval").is_hidden() and reply.locator(".note").inner_text() == "Stopped."
    wait_idle(url)


def test_tool_turns_survive_a_reload_and_an_export(urls: dict[str, str], watch, tmp_path: Path) -> None:
    page = watch(urls["main"]).page()
    page.evaluate("localStorage.setItem('localqwen.alwaysTools', JSON.stringify(['get_weather']))")
    with page.expect_request(lambda r: r.url.endswith("/agent/chat")):
        send(page, QUESTION)
    wait_reply(page, 1)
    page.reload()
    page.wait_for_selector("body[data-ready]")
    step = last_reply(page).locator(".tool-step")
    assert step.get_attribute("data-status") == "ok"
    assert step.locator(".tool-result pre").text_content() == "Paris: grey"
    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    reply = exported["messages"][1]
    assert reply["tools"] == [{"id": "call_1_1", "name": "get_weather", "arguments": '{"city":"Paris"}',
                               "status": "ok", "result": "Paris: grey"}]
    assert [m["role"] for m in reply["turn"]] == ["assistant", "tool", "assistant"]
    page.click("#conversations li.current .delete")
    import_file(page, tmp_path, exported, "weather.json")
    page.wait_for_selector(".tool-step")
    with page.expect_download() as again:
        page.click("#export")
    assert json.loads(Path(again.value.path()).read_text(encoding="utf-8")) == exported
    bad = {**exported, "messages": [exported["messages"][0], {**reply, "tools": [{"id": 1}]}]}
    import_file(page, tmp_path, bad, "bad.json")
    page.wait_for_selector("#notice:not([hidden])")
    assert page.locator("#notice").inner_text().startswith("Not imported: bad.json: messages[1].tools[0] must have")


def test_tool_results_are_inert_text(urls: dict[str, str], watch) -> None:
    page = watch(urls["hostile"]).page()
    ask(page)
    last_reply(page).locator(".tool-step button.allow").click()
    wait_reply(page, 1)
    step = last_reply(page).locator(".tool-step")
    step.locator(".tool-result summary").click()
    assert step.locator(".tool-result pre").inner_text() == f"Paris: {HOSTILE}"
    assert step.locator(".tool-result img").count() == 0 and page.evaluate("window.pwned") is None
    assert last_reply(page).locator(".answer").inner_text() == ANSWER.format("grey")


def test_tools_off_and_servers_without_tools(urls: dict[str, str], watch) -> None:
    watched = watch(urls["main"])
    page = watched.page()
    page.uncheck("#use-tools")  # plain chat: the OpenAI endpoint, which leaves calls to its clients
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")):
        send(page, QUESTION)
    wait_reply(page, 1)
    assert watched.posts("/agent/chat") == 0 and last_reply(page).locator(".tool-step").count() == 0
    plain = watch(urls["plain"]).page()
    assert plain.locator("#tools-option").is_hidden()
