"""Tools the model may call in the tool loop (localqwen.agent): a name, a description, a JSON schema of the
parameters, and the function that runs a call.

A plain Python function becomes a tool as it is:

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
        '''The weather in a city now.

        Args:
            city: the city's name, e.g. Paris
        '''

The parameters' schema comes from the type hints through pydantic (str, int, float, bool, Literal, Enum, lists,
dicts, optional values, dataclasses, pydantic models), their descriptions and the tool's from the docstring (Google,
NumPy or reST style, read by docstring_parser). A function whose only parameter is a pydantic model takes that
model's schema and is called with a validated instance. Arguments are validated before the call; the model gets
the validation errors back as the result, as it does a tool's exception. `async def` functions work too.

`Tool(name, description, parameters, function)` makes a tool of anything else: `function` takes the arguments
object (a dict) and returns the result; MCP servers' tools are made this way (localqwen.mcp_tools).
"""

from __future__ import annotations

import asyncio
import inspect
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import docstring_parser
import pydantic
import pydantic_core

from localqwen.errors import BadRequest

# The function names OpenAI's API accepts: clients that show or forward our tools keep working with them.
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolError(Exception):
    """A failure whose message is for the model as it stands (invalid arguments, an MCP server's error text)."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema of the arguments object
    function: Callable[[dict[str, Any]], Any]  # runs a call: the arguments in, the result out (or an awaitable)
    origin: str = ""  # where the tool comes from: "" for Python, else the MCP server's name

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise BadRequest(f"a tool name is 1 to 64 letters, digits, _ or -, got {self.name!r}")

    @property
    def asynchronous(self) -> bool:
        return inspect.iscoroutinefunction(self.function)

    def schema(self) -> dict[str, Any]:
        """The tool as the chat template (and OpenAI's API) lists it."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def call(self, arguments: dict[str, Any]) -> str:
        """Run a call in this thread; its result as text. An `async def` tool runs on an event loop of its own."""
        result = asyncio.run(self.function(arguments)) if self.asynchronous else self.function(arguments)
        return result_text(result)

    async def acall(self, arguments: dict[str, Any]) -> str:
        """Run a call without blocking the event loop: a blocking function runs in a worker thread."""
        result = await (self.function(arguments) if self.asynchronous else asyncio.to_thread(self.function, arguments))
        return result_text(result)


def result_text(value: Any) -> str:
    """A tool's result as the text of its tool message: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump_json()
    return pydantic_core.to_json(value, fallback=str).decode()


def without_titles(schema: Any) -> Any:
    """pydantic's JSON schema less the "title" it gives every model and field: tokens the model need not read.
    (A property *named* title maps to a schema, not a string, and stays.)"""
    if isinstance(schema, dict):
        return {k: without_titles(v) for k, v in schema.items() if not (k == "title" and isinstance(v, str))}
    if isinstance(schema, list):
        return [without_titles(v) for v in schema]
    return schema


def function_tool(function: Callable[..., Any], *, name: str | None = None,
                  description: str | None = None) -> Tool:
    """A Python function as a tool (see the module docstring); `name` and `description` override the function's."""
    name = name or function.__name__
    doc = docstring_parser.parse(inspect.getdoc(function) or "")
    try:
        hints = typing.get_type_hints(function, include_extras=True)
        signature = inspect.signature(function)
    except (NameError, TypeError, ValueError) as exc:
        raise BadRequest(f"cannot read the parameters of tool {name!r}: {exc}") from None
    parameters = list(signature.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) for p in parameters):
        raise BadRequest(f"tool {name!r}: the model passes arguments by name, so *args, **kwargs and positional-only "
                         "parameters cannot be filled")
    single = hints.get(parameters[0].name) if len(parameters) == 1 else None
    if isinstance(single, type) and issubclass(single, pydantic.BaseModel):
        model: type[pydantic.BaseModel] = single

        def arguments_of(data: pydantic.BaseModel) -> dict[str, Any]:
            return {parameters[0].name: data}
    else:
        described = {p.arg_name: p.description for p in doc.params}
        fields: dict[str, Any] = {
            p.name: (hints.get(p.name, Any), pydantic.Field(... if p.default is p.empty else p.default,
                                                            description=described.get(p.name)))
            for p in parameters}
        try:
            model = pydantic.create_model(f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"),
                                          **fields)
        except (pydantic.PydanticUserError, TypeError, NameError) as exc:
            raise BadRequest(f"tool {name!r}: its parameters have no JSON schema ({exc})") from None

        def arguments_of(data: pydantic.BaseModel) -> dict[str, Any]:
            return {field: getattr(data, field) for field in fields}

    try:
        schema = without_titles(model.model_json_schema())
    except pydantic.PydanticUserError as exc:  # e.g. a parameter typed with a class pydantic cannot describe
        raise BadRequest(f"tool {name!r}: its parameters have no JSON schema ({exc})") from None

    def validated(arguments: dict[str, Any]) -> dict[str, Any]:
        try:
            return arguments_of(model.model_validate(arguments))
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
            raise ToolError(f"invalid arguments: {problems}") from None

    if inspect.iscoroutinefunction(function):
        async def run(arguments: dict[str, Any]) -> Any:
            return await function(**validated(arguments))
    else:
        def run(arguments: dict[str, Any]) -> Any:
            return function(**validated(arguments))

    text = description if description is not None else "\n\n".join(
        part for part in (doc.short_description, doc.long_description) if part)
    return Tool(name, text, schema, run)


def as_tool(value: Tool | Callable[..., Any]) -> Tool:
    if isinstance(value, Tool):
        return value
    if callable(value):
        return function_tool(value)
    raise BadRequest(f"a tool is a function or a localqwen Tool, got {value!r}")


def tool_table(tools: Iterable[Tool | Callable[..., Any]]) -> dict[str, Tool]:
    """Tools by name; BadRequest for two with one name (the model could not tell them apart)."""
    table: dict[str, Tool] = {}
    for tool in map(as_tool, tools):
        if tool.name in table:
            raise BadRequest(f"two tools are named {tool.name!r}: give one another name")
        table[tool.name] = tool
    return table
