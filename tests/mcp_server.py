"""A small MCP server for the tests, written with the official SDK: `python tests/mcp_server.py` serves stdio,
`python tests/mcp_server.py http PORT` streamable HTTP at http://127.0.0.1:PORT/mcp. SKY (environment) is the
weather it reports."""

from __future__ import annotations

import os
import sys
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("test-weather")


@server.tool()
def get_weather(city: str) -> str:
    """The weather in a city now."""
    return f"{city}: {os.environ.get('SKY', 'cold')}"


@server.tool()
def broken(reason: str) -> str:
    """Always fails, saying why."""
    raise ToolError(reason)


@server.tool()
def slow(seconds: float) -> str:
    """Answers after a while."""
    time.sleep(seconds)
    return "done"


@server.tool()
def crash() -> str:
    """Ends the server's process."""
    os._exit(3)


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
