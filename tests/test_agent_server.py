"""The server's tool loop endpoints (localqwen/server/agent.py) over real HTTP, on the lookback model with a tool from
the test MCP server (tests/mcp_server.py): the events of a turn, approving and refusing calls, the key and the origin
guard, and a page that goes away while a call waits. The page's side is tests/test_web_agent.py."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from localqwen.convert import convert
from localqwen.mcp_tools import McpTools, ServerConfig
from localqwen.model import Model
from localqwen.server import create_app

from .lookback_model import ANSWER, ANSWER_THINKING, CALL_THINKING, UNKNOWN, write_lookback_checkpoint
from .test_server import running

KEY = "sk-agent-test"
QUESTION = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "temperature": 0}
SERVER = str(Path(__file__).with_name("mcp_server.py"))


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("lookback")
    [path] = convert(str(write_lookback_checkpoint(tmp / "lookback")), ["f16"], outdir=tmp, quiet=True)
    model = Model.load(path, n_ctx=2048, gpu_layers=0, threads=1)
    config = ServerConfig(command=sys.executable, args=[SERVER], env={"SKY": "clear"})
    with McpTools({"weather": config}, start_timeout=30) as mcp, \
            running(create_app(model, tools=mcp.tools)) as url, \
            running(create_app(model, tools=mcp.tools, api_key=KEY)) as keyed, \
            running(create_app(model)) as plain:
        yield {"main": url, "keyed": keyed, "plain": plain}
    model.close()


def events(url: str, body: dict[str, Any], answer: Any = None, headers: dict[str, str] | None = None
           ) -> list[dict[str, Any]]:
    """The events of one /agent/chat; `answer(event, run)` is called at each approval (it POSTs the answer)."""
    seen: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{url}/agent/chat", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if seen[-1]["type"] == "approval":
                    answer(seen[-1], seen[0]["run"])
    return seen


def post_answer(url: str, run: str, call: str, headers: dict[str, str] | None = None, **answer: Any) -> httpx.Response:
    return httpx.post(f"{url}/agent/runs/{run}/calls/{call}", json=answer, headers=headers)


def squeezed(seen: list[dict[str, Any]]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for event in seen:
        step = (event["type"], event.get("round", 0))
        if not (out and out[-1] == step and step[0] in ("thinking", "content")):
            out.append(step)
    return out


def test_the_tools_are_listed(urls: dict[str, str]) -> None:
    tools = httpx.get(f"{urls['main']}/agent/tools").json()["tools"]
    assert [t["name"] for t in tools] == ["get_weather", "broken", "slow", "crash"]
    assert tools[0] == {"name": "get_weather", "description": "The weather in a city now.", "server": "weather",
                        "parameters": tools[0]["parameters"]} and tools[0]["parameters"]["required"] == ["city"]
    assert httpx.get(f"{urls['plain']}/agent/tools").json() == {"tools": []}


def test_an_approved_turn(urls: dict[str, str]) -> None:
    url = urls["main"]
    seen = events(url, QUESTION, lambda event, run: post_answer(url, run, event["id"], approve=True).raise_for_status())
    assert squeezed(seen) == [("start", 0), ("thinking", 1), ("tool_call", 1), ("done", 1), ("approval", 1),
                              ("tool_result", 1), ("thinking", 2), ("content", 2), ("done", 2), ("end", 0)]
    call = next(e for e in seen if e["type"] == "tool_call")
    approval = next(e for e in seen if e["type"] == "approval")
    result = next(e for e in seen if e["type"] == "tool_result")
    assert (call["id"], call["name"], call["arguments"]) == ("call_1_1", "get_weather", {"city": "Paris"})
    assert approval == {"type": "approval", "round": 1, "id": "call_1_1", "name": "get_weather",
                        "arguments": {"city": "Paris"}}
    assert (result["status"], result["content"]) == ("ok", "Paris: clear")
    assert "".join(e["text"] for e in seen if e["type"] == "thinking") == CALL_THINKING + ANSWER_THINKING
    assert "".join(e["text"] for e in seen if e["type"] == "content") == ANSWER.format("clear")
    done = [e for e in seen if e["type"] == "done"]
    assert [d["finish_reason"] for d in done] == ["tool_calls", "stop"]
    assert done[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # round 2 extends round 1's prompt
    end = seen[-1]
    assert end["finish_reason"] == "stop" and [m["role"] for m in end["messages"]] == ["assistant", "tool", "assistant"]
    # The next turn sends the messages back; the OpenAI endpoint still only reports calls (its clients run them).
    history = [*QUESTION["messages"], *end["messages"], {"role": "user", "content": "And tomorrow?"}]
    reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": history, "temperature": 0}, timeout=60).json()
    assert reply["choices"][0]["message"]["content"] == ANSWER.format("clear")  # the lookback reads the old result


def test_refused_and_preapproved_calls(urls: dict[str, str]) -> None:
    url = urls["main"]
    seen = events(url, QUESTION, lambda event, run: post_answer(url, run, event["id"], approve=False))
    result = next(e for e in seen if e["type"] == "tool_result")
    assert (result["status"], result["content"]) == ("refused", "The user refused this tool call.")
    assert seen[-1]["messages"][-1]["content"] == ANSWER.format(UNKNOWN)
    seen = events(url, {**QUESTION, "approved": ["get_weather"]})  # no approval event: the run just goes on
    assert "approval" not in [e["type"] for e in seen] and seen[-1]["messages"][-1]["content"] == ANSWER.format("clear")


def test_answers_that_find_no_waiting_call(urls: dict[str, str]) -> None:
    url = urls["main"]
    late: list[httpx.Response] = []

    def answer_twice(event: dict[str, Any], run: str) -> None:
        post_answer(url, run, event["id"], approve=True).raise_for_status()
        late.append(post_answer(url, run, event["id"], approve=False))  # already answered

    events(url, QUESTION, answer_twice)
    assert late[0].status_code == 404 and late[0].json()["error"]["code"] == "not_found"
    gone = post_answer(url, "run_nonesuch", "call_1_1", approve=True)
    assert gone.status_code == 404 and "no call call_1_1 of run run_nonesuch waits" in gone.json()["error"]["message"]
    assert post_answer(url, "r", "c", approve="yes").status_code == 400
    no_tools = httpx.post(f"{urls['plain']}/agent/chat", json=QUESTION)
    assert no_tools.status_code == 400 and no_tools.json()["error"]["code"] == "no_tools"
    own_tools = httpx.post(f"{url}/agent/chat", json={**QUESTION, "tools": [
        {"type": "function", "function": {"name": "x"}}]})
    assert own_tools.status_code == 400 and own_tools.json()["error"]["param"] == "tools"


def test_the_key_and_the_origin_guard(urls: dict[str, str]) -> None:
    url, keyed = urls["main"], urls["keyed"]
    for method, path, body in [("GET", "/agent/tools", None), ("POST", "/agent/chat", QUESTION),
                               ("POST", "/agent/runs/r/calls/c", {"approve": True})]:
        assert httpx.request(method, keyed + path, json=body).status_code == 401
        foreign = httpx.request(method, url + path, json=body, headers={"Origin": "http://evil.test"})
        assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "origin_not_allowed"
    form = httpx.post(f"{url}/agent/runs/r/calls/c", content=b"approve=1",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    bearer = {"Authorization": f"Bearer {KEY}"}
    seen = events(keyed, QUESTION, lambda e, run: post_answer(keyed, run, e["id"], bearer, approve=True,
                                                             always=True).raise_for_status(), headers=bearer)
    assert seen[-1]["messages"][-1]["content"] == ANSWER.format("clear")


def test_a_page_that_goes_away_stops_the_run(urls: dict[str, str]) -> None:
    url = urls["main"]
    run = None
    with httpx.stream("POST", f"{url}/agent/chat", json=QUESTION, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                run = run or event.get("run")
                if event["type"] == "approval":
                    break  # the call waits; the page closes the stream
    deadline = time.monotonic() + 10
    while post_answer(url, run, event["id"], approve=True).status_code != 404:  # the run is dropped
        assert time.monotonic() < deadline, "the run outlived its stream"
        time.sleep(0.05)
    assert not httpx.get(f"{url}/health").json()["generating"]
    seen = events(url, {**QUESTION, "approved": ["get_weather"]})  # and the next turn runs as usual
    assert seen[-1]["finish_reason"] == "stop"
