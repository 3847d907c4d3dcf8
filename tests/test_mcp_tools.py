"""MCP servers' tools (localqwen.mcp_tools) against real servers: `mcp-server-time` from the package registry, and
tests/mcp_server.py (written with the `mcp` SDK) over stdio and streamable HTTP; in the tool loop on known-output
models, and failing every way a server can (no such command, exits at once, hangs, errors, times out, dies)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from localqwen import BadRequest, Model
from localqwen.convert import convert
from localqwen.mcp_tools import McpTools, ServerConfig, load_config
from localqwen.tools import ToolError

from .lookback_model import ANSWER, write_lookback_checkpoint
from .test_model import chain_model

SERVER = str(Path(__file__).with_name("mcp_server.py"))
TIME_SERVER = shutil.which("mcp-server-time", path=str(Path(sys.executable).parent)) or "mcp-server-time"
GREEDY = {"temperature": 0.0, "seed": 0}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CLOCK_CALL = '{"name":"get_current_time","arguments":{"timezone": "UTC"}}'  # compact: chain tokens may not repeat


def stdio(*args: str, **env: str) -> ServerConfig:
    return ServerConfig(command=sys.executable, args=[SERVER, *args], env=env or None)


@pytest.fixture(scope="module")
def servers() -> Iterator[McpTools]:
    """The test server (reporting grey skies), the time server, and three that cannot start."""
    configs = {
        "weather": stdio(SKY="grey"),
        "time": ServerConfig(command=TIME_SERVER, args=["--local-timezone", "UTC"]),
        "missing": ServerConfig(command="localqwen-no-such-command"),
        "quitter": ServerConfig(command=sys.executable,
                                args=["-c", "import sys; sys.exit('quitter: bad configuration')"]),
        "silent": ServerConfig(command=sys.executable, args=["-c", "import time; time.sleep(60)"]),
    }
    started = time.monotonic()
    with McpTools(configs, start_timeout=8, call_timeout=2) as tools:
        tools.start_s = time.monotonic() - started  # type: ignore[attr-defined]
        yield tools


def by_name(tools: McpTools) -> dict:
    return {tool.name: tool for tool in tools.tools}


def test_tools_are_listed_with_their_schemas(servers: McpTools) -> None:
    tools = by_name(servers)
    assert list(tools) == ["get_weather", "broken", "slow", "crash", "get_current_time", "convert_time"]
    clock = tools["get_current_time"]
    assert (clock.origin, clock.description) == ("time", "Get current time in a specific timezone")
    assert clock.parameters["required"] == ["timezone"] and clock.parameters["properties"]["timezone"]["type"] == \
        "string"
    assert tools["get_weather"].schema()["function"]["parameters"]["properties"] == {
        "city": {"title": "City", "type": "string"}}  # the server's own schema, as it sent it


def test_servers_that_cannot_start_are_left_out_with_one_line(servers: McpTools) -> None:
    problems = servers.problems
    assert len(problems) == 3 and all("\n" not in p for p in problems)
    assert problems[0].startswith("MCP server 'missing' could not start: ") and "localqwen-no-such-command" in \
        problems[0]
    assert problems[1] == "MCP server 'quitter' could not start: Connection closed (quitter: bad configuration)"
    assert problems[2] == "MCP server 'silent' did not start within 8 s"
    assert servers.start_s < 8 + 3  # side by side: one deadline for all, not one each


def test_calls_reach_the_real_servers(servers: McpTools) -> None:
    tools = by_name(servers)
    assert tools["get_weather"].call({"city": "Paris"}) == "Paris: grey"
    now = json.loads(tools["get_current_time"].call({"timezone": "UTC"}))
    assert now["timezone"] == "UTC"
    assert abs((datetime.fromisoformat(now["datetime"]) - datetime.now(timezone.utc)).total_seconds()) < 60
    with pytest.raises(ToolError, match="Invalid timezone"):  # the server's own error text
        tools["get_current_time"].call({"timezone": "Mars/Olympus_Mons"})
    with pytest.raises(ToolError, match="no sensor"):
        tools["broken"].call({"reason": "no sensor"})
    with pytest.raises(ToolError, match="the MCP server 'weather' failed: Request 'tools/call' timed out"):
        tools["slow"].call({"seconds": 10})


def test_calls_from_an_event_loop(servers: McpTools) -> None:
    clock = by_name(servers)["get_current_time"]

    async def three_at_once() -> list[str]:
        return await asyncio.wait_for(asyncio.gather(*(clock.acall({"timezone": "UTC"}) for _ in range(3))), 30)

    answers = asyncio.run(three_at_once())
    assert [json.loads(a)["timezone"] for a in answers] == ["UTC"] * 3


def test_the_loop_with_the_time_server(servers: McpTools, tmp_path: Path) -> None:
    path, _ = chain_model(tmp_path, "User wants the time; I call a clock", "Asking it.", CLOCK_CALL)
    model = Model.load(path, n_ctx=2048, gpu_layers=0, threads=1)
    try:
        run = model.act([{"role": "user", "content": "What time is it?"}], tools=servers.tools, max_rounds=2,
                        **GREEDY)
        results = [e.tool_result for e in run if e.kind == "tool_result"]
    finally:
        model.close()
    [result] = results  # round 2 calls again: max_rounds, not run
    assert result.status == "ok" and json.loads(result.content)["timezone"] == "UTC"
    assert run.finish_reason == "max_rounds" and run.messages[1]["content"] == result.content


def test_the_loop_answers_from_an_mcp_result(servers: McpTools, tmp_path: Path) -> None:
    [path] = convert(str(write_lookback_checkpoint(tmp_path / "lookback")), ["f16"], outdir=tmp_path, quiet=True)
    model = Model.load(path, n_ctx=2048, gpu_layers=0, threads=1)
    try:
        run = model.act(WEATHER_QUESTION, tools=servers.tools, **GREEDY).collect()
    finally:
        model.close()
    assert run.messages[1]["content"] == "Paris: grey" and run.answer == ANSWER.format("grey")


def test_a_server_that_dies_gives_errors_not_crashes() -> None:
    with McpTools({"weather": stdio()}, start_timeout=15) as tools:
        crash, weather = by_name(tools)["crash"], by_name(tools)["get_weather"]
        with pytest.raises(ToolError, match="the MCP server 'weather' failed: Connection closed"):
            crash.call({})
        with pytest.raises(ToolError, match="the MCP server 'weather' failed"):
            weather.call({"city": "Paris"})
    with pytest.raises(ToolError, match="was stopped"):
        weather.call({"city": "Paris"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_streamable_http_server() -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, SERVER, "http", str(port)], env={"SKY": "clear", "PATH": ""},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/mcp"
        with McpTools({"web": ServerConfig(url=url, headers={"Authorization": "Bearer x"})}) as tools:
            assert tools.problems == [] and by_name(tools)["get_weather"].call({"city": "Oslo"}) == "Oslo: clear"
        with McpTools({"web": ServerConfig(url=f"http://127.0.0.1:{free_port()}/mcp")}, start_timeout=10) as tools:
            [problem] = tools.problems
            assert problem.startswith("MCP server 'web' could not start: ") and "\n" not in problem
    finally:
        process.terminate()
        process.wait(10)


def test_clashing_names_get_the_server_as_prefix() -> None:
    with McpTools({"a": stdio(), "b": stdio()}, start_timeout=15) as tools:
        names = [tool.name for tool in tools.tools]
    assert names[:4] == ["get_weather", "broken", "slow", "crash"]
    assert names[4:] == ["b_get_weather", "b_broken", "b_slow", "b_crash"]


@pytest.mark.parametrize(("text", "error"), [
    ("{", "the MCP configuration is not JSON"),
    ('{"servers": {}}', 'the MCP configuration needs an "mcpServers" object'),
    ('{"mcpServers": {"t": {}}}', 'mcpServers.t: give "command" (a stdio server) or "url"'),
    ('{"mcpServers": {"t": {"command": "x", "url": "http://h/mcp"}}}', "not both"),
    ('{"mcpServers": {"t": {"command": "x", "args": "--flag"}}}', "mcpServers.t.args: Input should be a valid list"),
    ('{"mcpServers": {"t": {"url": "http://h/sse", "type": "sse"}}}', "SSE servers"),
])
def test_bad_configurations_are_one_line(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(text)
    with pytest.raises(BadRequest) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ") and error in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(BadRequest, match="cannot read the MCP configuration"):
        load_config(tmp_path / "missing.json")


def test_configurations_as_other_apps_write_them(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "time": {"command": "uvx", "args": ["mcp-server-time"], "autoApprove": ["get_current_time"]},
        "fetch": {"type": "streamable-http", "url": "http://127.0.0.1:9/mcp", "headers": {"X-Key": "k"}},
        "off": {"command": "x", "disabled": True}}}))
    configs = load_config(path)
    assert list(configs) == ["time", "fetch"]
    assert (configs["time"].command, configs["time"].args, configs["fetch"].headers) == (
        "uvx", ["mcp-server-time"], {"X-Key": "k"})
