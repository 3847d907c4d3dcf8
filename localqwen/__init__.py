"""localqwen: run Qwen3-4B-Thinking-2507 on your own machine, offline, through llama.cpp.

    from localqwen import Model, Reply

    model = Model.load("Qwen3-4B-Thinking-2507-Q4_K_M.gguf")
    reply = Reply.collect(model.chat([{"role": "user", "content": "Hi"}]))
    print(reply.thinking, reply.content)

The names in `__all__` are the public API: apps may rely on them. Every other module is internal and may change.
Names load on first use, so `import localqwen` stays cheap and the runtime never loads the converter.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from localqwen.agent import AgentRun
    from localqwen.convert import convert
    from localqwen.errors import (
        BadRequest,
        CheckpointError,
        ContextOverflow,
        HubError,
        LocalqwenError,
        ModelBusy,
        ModelFileError,
        RemoteError,
    )
    from localqwen.events import Event, Reply, Stats, ToolCall, ToolResult
    from localqwen.info import model_info, plan_report
    from localqwen.mcp_tools import McpTools
    from localqwen.model import Model
    from localqwen.remote import RemoteModel
    from localqwen.sampling import OPTIONS, Sampling
    from localqwen.store import pull, resolve_model
    from localqwen.tools import Tool, ToolError

# Public name -> the module that defines it.
_EXPORTS = {
    "Model": "localqwen.model", "RemoteModel": "localqwen.remote",
    "Event": "localqwen.events", "Reply": "localqwen.events", "Stats": "localqwen.events",
    "ToolCall": "localqwen.events", "ToolResult": "localqwen.events",
    "AgentRun": "localqwen.agent", "Tool": "localqwen.tools", "ToolError": "localqwen.tools",
    "McpTools": "localqwen.mcp_tools",
    "Sampling": "localqwen.sampling", "OPTIONS": "localqwen.sampling",
    "LocalqwenError": "localqwen.errors", "ModelFileError": "localqwen.errors", "CheckpointError": "localqwen.errors",
    "HubError": "localqwen.errors", "BadRequest": "localqwen.errors", "ContextOverflow": "localqwen.errors",
    "ModelBusy": "localqwen.errors", "RemoteError": "localqwen.errors",
    "convert": "localqwen.convert",
    "pull": "localqwen.store", "resolve_model": "localqwen.store",
    "model_info": "localqwen.info", "plan_report": "localqwen.info",
}
__all__ = [
    "OPTIONS", "AgentRun", "BadRequest", "CheckpointError", "ContextOverflow", "Event", "HubError", "LocalqwenError",
    "McpTools", "Model", "ModelBusy", "ModelFileError", "RemoteError", "RemoteModel", "Reply", "Sampling", "Stats",
    "Tool", "ToolCall", "ToolError", "ToolResult", "convert", "model_info", "plan_report", "pull", "resolve_model",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'localqwen' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
