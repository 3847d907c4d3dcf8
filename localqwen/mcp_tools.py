"""MCP servers' tools as localqwen tools, through the official `mcp` SDK.

    with McpTools.from_config("mcp.json") as mcp:
        for problem in mcp.problems:           # a server that could not start: one line each
            print(problem)
        run = model.act(messages, tools=mcp.tools)

The configuration is the usual `{"mcpServers": {NAME: {...}}}` JSON (Claude Desktop, Cursor, LM Studio, Qwen-Agent):
a stdio server has `command` (and `args`, `env`, `cwd`), a streamable-HTTP server has `url` (and `headers`);
`"disabled": true` leaves a server out.

Every session lives on one private event-loop thread (anyio's blocking portal). An MCP session belongs to the task
that opened it, so neither a synchronous caller (the terminal chat) nor the worker threads and event loop of the
server could share it otherwise; through the portal, every thread and every event loop calls the same sessions.
Servers start side by side; one that fails to start or to list its tools within `start_timeout` seconds is left
out with a one-line problem, and the rest work. A call that fails (the tool's error, a timeout, a server that
died) becomes a ToolError, whose text the tool loop gives the model. A stdio server's stderr goes to a temporary
file, not the terminal; its last line explains a failed start.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import httpx2
import pydantic
from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from localqwen.errors import BadRequest
from localqwen.tools import NAME, Tool, ToolError

START_TIMEOUT_S = 30.0  # to start a server and list its tools (a first `uvx` or `npx` run downloads for a while)
CALL_TIMEOUT_S = 120.0  # for one tool call
HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)  # the SDK's own HTTP client's: its event streams may stay open
MAX_TOOL_PAGES = 100  # tools/list pages read from one server


class ServerConfig(pydantic.BaseModel):
    """One entry of `mcpServers`; other keys that other apps write (`autoApprove`, `timeout`...) are ignored."""

    model_config = pydantic.ConfigDict(strict=True, extra="ignore")
    command: str | None = None
    args: list[str] = []
    env: dict[str, str] | None = None
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] | None = None
    type: str | None = None  # "stdio", "http", "streamable-http", "streamableHttp": told apart by command/url anyway
    disabled: bool = False

    @pydantic.model_validator(mode="after")
    def one_transport(self) -> ServerConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError('give "command" (a stdio server) or "url" (a streamable HTTP server), not both')
        if self.type in ("sse",):
            raise ValueError("SSE servers (the deprecated transport) are not supported: use the server's /mcp URL")
        return self


def load_config(path: str | Path) -> dict[str, ServerConfig]:
    """The enabled servers of an `{"mcpServers": {...}}` file; BadRequest naming the file and field otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadRequest(f"cannot read the MCP configuration ({exc.strerror})", path) from None
    except ValueError as exc:
        raise BadRequest(f"the MCP configuration is not JSON ({exc})", path) from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise BadRequest('the MCP configuration needs an "mcpServers" object', path)
    configs: dict[str, ServerConfig] = {}
    for name, entry in servers.items():
        try:
            config = ServerConfig.model_validate(entry)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(["mcpServers", name, *map(str, first["loc"])])
            raise BadRequest(f"{where}: {first['msg'].removeprefix('Value error, ')}", path) from None
        if not config.disabled:
            configs[name] = config
    return configs


def first_error(exc: BaseException) -> BaseException:
    """The first error inside (nested) exception groups: what a failed task group was really about."""
    while getattr(exc, "exceptions", None):
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return exc


def describe(exc: BaseException) -> str:
    exc = first_error(exc)
    return str(exc) or type(exc).__name__


def content_text(result: Any) -> str:
    """A CallToolResult's content as the text the model reads (non-text parts are named, not inlined)."""
    parts = []
    for block in result.content:
        if block.type == "text":
            parts.append(block.text)
        elif block.type == "resource" and hasattr(block.resource, "text"):
            parts.append(block.resource.text)
        elif block.type == "resource_link":
            parts.append(f"[resource {block.uri}]")
        else:
            parts.append(f"[{block.type}: {getattr(block, 'mime_type', None) or 'binary'}, not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def tool_name(name: str, taken: set[str], server: str) -> str:
    """A name the model can call (see tools.NAME), unique among `taken`: the server's prefix when two clash."""
    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:64] or "tool"

    chosen = clean(name)
    if chosen in taken:
        chosen = clean(f"{server}_{name}")
    while chosen in taken:
        chosen = clean(chosen[:60] + "_" + str(len(taken)))
    assert NAME.fullmatch(chosen)
    return chosen


@dataclass
class Server:
    """One configured server: its session (once started), its tools or the problem that kept it out."""

    name: str
    config: ServerConfig
    client: Client | None = None
    listed: list[Any] = field(default_factory=list)  # the server's own descriptions of its tools
    tools: list[Tool] = field(default_factory=list)
    problem: str | None = None
    stderr: IO[str] | None = None
    task: Future[None] | None = None

    def last_stderr_line(self) -> str:
        if self.stderr is None:
            return ""
        self.stderr.seek(0)
        lines = [line.strip() for line in self.stderr.read().splitlines() if line.strip()]
        return f" ({lines[-1][:200]})" if lines else ""


class McpTools:
    """The tools of some MCP servers (a context manager: `close()` stops the servers). `tools`: all of them;
    `servers`: each server with its tools or its problem; `problems`: one line per server left out."""

    def __init__(self, servers: dict[str, ServerConfig], *, start_timeout: float = START_TIMEOUT_S,
                 call_timeout: float = CALL_TIMEOUT_S) -> None:
        self.call_timeout = call_timeout
        self.servers = [Server(name, config) for name, config in servers.items()]
        self._resources = contextlib.ExitStack()  # closed by close(): the portal, then the stderr files
        for server in self.servers:
            if server.config.command is not None:  # its stderr, kept to explain a failure
                server.stderr = self._resources.enter_context(
                    tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace"))  # noqa: SIM115
        self._portal: BlockingPortal = self._resources.enter_context(start_blocking_portal(name="localqwen-mcp"))
        self._closing: anyio.Event = self._portal.call(anyio.Event)  # set by close(): the sessions end
        self._closed = False
        try:
            self._start(start_timeout)
        except BaseException:  # Ctrl+C while servers start: none may outlive us
            self.close()
            raise

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout  # the servers start side by side: one deadline for all
        started: list[tuple[Server, Future[None]]] = []
        for server in self.servers:
            ready: Future[None] = Future()
            server.task = self._portal.start_task_soon(self._run, server, ready)
            started.append((server, ready))
        taken: set[str] = set()
        for server, ready in started:
            try:
                ready.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                server.problem = f"MCP server {server.name!r} did not start within {timeout:g} s" \
                                 f"{server.last_stderr_line()}"
                assert server.task is not None
                server.task.cancel()
            except Exception as exc:
                server.problem = f"MCP server {server.name!r} could not start: {describe(exc)}" \
                                 f"{server.last_stderr_line()}"
            else:
                server.tools = [self._tool(server, listed, taken) for listed in server.listed]

    @classmethod
    def from_config(cls, path: str | Path, **kwargs: Any) -> McpTools:
        return cls(load_config(path), **kwargs)

    @property
    def tools(self) -> list[Tool]:
        return [tool for server in self.servers for tool in server.tools]

    @property
    def problems(self) -> list[str]:
        return [server.problem for server in self.servers if server.problem]

    def close(self) -> None:
        """Stop every server (a stdio server gets its stdin closed, then SIGTERM, then SIGKILL: a few seconds)."""
        if self._closed:
            return
        self._closed = True
        self._portal.call(self._closing.set)
        self._resources.close()

    def __enter__(self) -> McpTools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Tool]:
        return iter(self.tools)

    # --- on the portal's event loop ----------------------------------------------------------------------------

    async def _run(self, server: Server, ready: Future[None]) -> None:
        """Open the session, list the tools, report, then hold the session open until close()."""
        try:
            async with AsyncExitStack() as stack:
                client = await stack.enter_async_context(await self._client(server, stack))
                listed, cursor = [], None
                for _ in range(MAX_TOOL_PAGES):
                    page = await client.list_tools(cursor=cursor)
                    listed += page.tools
                    if (cursor := page.next_cursor) is None:
                        break
                server.client, server.listed = client, listed
                ready.set_result(None)
                await self._closing.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            if not isinstance(exc, Exception):
                raise
        finally:
            server.client = None

    async def _client(self, server: Server, stack: AsyncExitStack) -> Client:
        config = server.config
        if config.command is not None:
            params = StdioServerParameters(command=config.command, args=config.args, env=config.env, cwd=config.cwd)
            return Client(stdio_client(params, errlog=server.stderr), read_timeout_seconds=self.call_timeout)
        http = await stack.enter_async_context(httpx2.AsyncClient(headers=config.headers, timeout=HTTP_TIMEOUT))
        return Client(streamable_http_client(config.url or "", http_client=http),
                      read_timeout_seconds=self.call_timeout)

    async def _call(self, server: Server, name: str, arguments: dict[str, Any]) -> str:
        if server.client is None:
            raise ToolError(f"the MCP server {server.name!r} is not running")
        try:
            result = await server.client.call_tool(name, arguments)
        except Exception as exc:
            raise ToolError(f"the MCP server {server.name!r} failed: {describe(exc)}") from None
        text = content_text(result)
        if result.is_error:
            raise ToolError(text or f"the tool {name!r} of MCP server {server.name!r} failed")
        return text

    # --- the tools -------------------------------------------------------------------------------------------

    def _tool(self, server: Server, listed: Any, taken: set[str]) -> Tool:
        name = tool_name(listed.name, taken, server.name)
        taken.add(name)

        def call(arguments: dict[str, Any]) -> str:
            try:
                return self._portal.call(self._call, server, listed.name, arguments)
            except RuntimeError as exc:  # the portal stopped: close() ran
                raise ToolError(f"the MCP server {server.name!r} was stopped ({exc})") from None

        description = listed.description or listed.title or ""
        return Tool(name, description, dict(listed.input_schema), call, origin=server.name)
