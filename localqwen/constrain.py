"""Grammars for what follows the thinking: an answer in a JSON Schema's shape, or tool calls only, or a valid call
body once the model opens one. The schema-to-grammar conversion is llama.cpp's own, as llama-cpp-python ships it
(llama_cpp.llama_grammar); this module checks that a schema uses only what that conversion enforces, and wraps its
grammar in the template's layout (leading whitespace after `</think>`, the `<tool_call>` markers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from localqwen.constants import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from localqwen.errors import BadRequest

# Keywords llama.cpp's conversion turns into grammar rules (others it would ignore, so the answer could break them).
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
            "maxItems", "enum", "const", "anyOf", "oneOf", "$ref", "pattern", "format", "minLength", "maxLength"}
# Keywords that constrain nothing: notes for people and tools.
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs", "definitions",
               "readOnly", "writeOnly", "deprecated"}
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
TYPES = {"string", "number", "integer", "boolean", "null", "object", "array"}
MAX_SCHEMA_BYTES = 64 << 10
# The converter's string characters let control characters through raw, which JSON does not allow; llama.cpp's own
# (C++) converter has since excluded them. This is that rule.
LOOSE_CHAR = r'char ::= [^"\\] |'
STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'
LEADING_SPACE = "[ \\t\\n]{0,4}"  # after `</think>` the template puts "\n\n": let the model keep its layout
# Around a call's JSON the template puts one newline. Bounded: a grammar that allows whitespace without end lets a
# model that does not follow it (random weights, a confused one) write whitespace until its token limit.
CALL_SPACE = "[ \\n]{0,2}"


@dataclass(frozen=True)
class AnswerFormat:
    """What the answer must look like: a JSON Schema (validated after generation too), or tool calls only."""

    grammar: str  # GBNF with its start rule "answer"
    schema: dict[str, Any] | None = None
    model: Any = None  # a pydantic model class the schema came from: parse() returns an instance of it

    def parse(self, text: str) -> Any:
        """The answer as an object, validated against the schema (or the pydantic model); ValueError if it is not
        (which the grammar rules out for an answer that was not cut short)."""
        if self.model is not None:
            return self.model.model_validate_json(text)
        import jsonschema

        value = json.loads(text)
        try:
            jsonschema.validate(value, self.schema or {})
        except jsonschema.ValidationError as exc:
            raise ValueError(f"the answer does not match the schema: {exc.message}") from None
        return value


def check_schema(schema: Any, where: str = "schema") -> None:
    """Refuse a schema that uses what llama.cpp's grammar conversion does not enforce, naming the part."""
    if isinstance(schema, bool):
        if schema is False:
            raise BadRequest(f"{where} is false: no value could match it")
        return
    if not isinstance(schema, dict):
        raise BadRequest(f"{where} must be a JSON object (a JSON Schema), not {type(schema).__name__}")
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise BadRequest(f"{where}.{key} is not supported in answer schemas (llama.cpp's grammars enforce "
                             f"{', '.join(sorted(ENFORCED))})")
        if key == "format" and value not in FORMATS:
            raise BadRequest(f"{where}.format {value!r} is not supported (supported: {', '.join(sorted(FORMATS))})")
        if key == "type":
            kinds = value if isinstance(value, list) else [value]
            if not kinds or not all(isinstance(k, str) and k in TYPES for k in kinds):
                raise BadRequest(f"{where}.type must be one of {', '.join(sorted(TYPES))} (or a list of them)")
        if key in ("minLength", "maxLength") and (schema.get("type") != "string" or "pattern" in schema):
            raise BadRequest(f"{where}.{key} is enforced only on a plain string (\"type\": \"string\", no pattern)")
    for key in ("properties", "$defs", "definitions"):
        for name, sub in _object(schema.get(key, {}), f"{where}.{key}").items():
            check_schema(sub, f"{where}.{key}.{name}")
    for key in ("anyOf", "oneOf", "prefixItems"):
        for i, sub in enumerate(_list(schema.get(key, []), f"{where}.{key}")):
            check_schema(sub, f"{where}.{key}[{i}]")
    for key in ("items", "additionalProperties"):
        if key in schema and not isinstance(schema[key], bool):
            check_schema(schema[key], f"{where}.{key}")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a list")
    return value


def schema_gbnf(schema: dict[str, Any], where: str = "schema") -> str:
    """llama.cpp's grammar for `schema` (start rule "root"), after check_schema."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    check_schema(schema, where)
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise BadRequest(f"{where} is larger than {MAX_SCHEMA_BYTES} bytes")
    try:
        gbnf = json_schema_to_gbnf(text)
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
        raise BadRequest(f"{where} cannot be turned into a grammar: {exc}") from None
    return gbnf.replace(LOOSE_CHAR, STRICT_CHAR)


def json_answer(schema: Any) -> AnswerFormat:
    """The answer is one JSON value of `schema`: a JSON Schema dict, a pydantic model class, or None for any JSON
    object (OpenAI's json_object)."""
    model = None
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        model, schema = schema, schema.model_json_schema()
    schema = {"type": "object"} if schema is None else schema
    return AnswerFormat(f"{schema_gbnf(schema)}\nanswer ::= {LEADING_SPACE} root", schema, model)


def _calls_schema(tools: list[dict[str, Any]], names: list[str] | None, *, any_arguments: bool = False,
                  ) -> dict[str, Any]:
    """The JSON of one call to any of `tools` (or only those named): {"name": ..., "arguments": {...}}, the
    arguments as each tool's parameters say (or any JSON object)."""
    options = []
    for tool in tools:
        function = tool.get("function", tool)
        if names is not None and function["name"] not in names:
            continue
        parameters = (None if any_arguments else function.get("parameters")) or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                        "required": ["name", "arguments"]})
    if not options:
        raise BadRequest("no tool matches the tool choice")
    return options[0] if len(options) == 1 else {"anyOf": options}


def calls_only(tools: list[dict[str, Any]], names: list[str] | None = None, *, one: bool = False) -> AnswerFormat:
    """The answer is one or more tool calls (`one`: exactly one) and nothing else (tool_choice "required", or a
    named function)."""
    calls = schema_gbnf(_calls_schema(tools, names), "tools")
    call = f'"{TOOL_CALL_OPEN}" {CALL_SPACE} root {CALL_SPACE} "{TOOL_CALL_CLOSE}"'
    more = "" if one else f" ({CALL_SPACE} call)*"
    return AnswerFormat(f"{calls}\ncall ::= {call}\nanswer ::= {LEADING_SPACE} call{more}")


def call_body(tools: list[dict[str, Any]]) -> str:
    """A call's body once the model has written `<tool_call>`: valid JSON for one of `tools`, then the closing tag.
    (tool_choice "auto": the model may answer instead, but every call it starts parses.) Where a tool's parameters
    use what the grammar cannot enforce, its arguments are any JSON object: the call still parses."""
    try:
        calls = schema_gbnf(_calls_schema(tools, None), "tools")
    except BadRequest:
        calls = schema_gbnf(_calls_schema(tools, None, any_arguments=True), "tools")
    return f'{calls}\nanswer ::= {CALL_SPACE} root {CALL_SPACE} "{TOOL_CALL_CLOSE}"'
