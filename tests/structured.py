"""What the front-end tests of structured answers, strict tools and "answer now" share: the models, the schemas and
the tools, and the checks of a reply against them.

A random tiny model (real tokenizer, random weights) answers with arbitrary tokens, so whatever shape its answer has
is the grammar's doing. Its thinking never ends on its own (`</think>` is one token in 151,936): a small thinking
budget wraps it up, and the constrained answer follows. Bounded schemas (enums, maxLength, maxItems, no extra
properties) keep a random answer short enough to finish well within max_tokens most of the time.

The pondering chain model thinks "Hmm" then "!" forever (greedy, with its loop guard off) until it is asked to
answer now; after the wrap-up (which ends in `</think>` "\\n\\n") it answers PONDER_ANSWER.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, Field
from tokenizers import Tokenizer

from localqwen.constants import IM_END_ID
from localqwen.convert import convert
from localqwen.synthetic import DOUBLE_NEWLINE_ID, NEWLINE_ID, tokenizer_json, write_chain_checkpoint, write_checkpoint
from tests.conftest import QUANT_SHAPE

PONDER_THINKING, PONDER_ANSWER = "Hmm", "Fine, here it is."
THINK_BRIEFLY = 4  # the random model's thinking budget: then the wrap-up, then the constrained answer
MAX_TOKENS = 400  # thinking, wrap-up and answer; a random answer that runs past it is reported cut short ("length")

# Nested objects, arrays, enums, required fields, a pattern, alternatives: the shapes an app asks for.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "address"], "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"enum": ["A1", "B2", "C3"]}, "quantity": {"type": "integer"}},
            "required": ["sku", "quantity"], "additionalProperties": False}},
        "express": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
    },
    "required": ["items", "express", "note"], "additionalProperties": False,
}
COLOURS = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4}
SCHEMAS = {"person": PERSON, "order": ORDER, "colours": COLOURS}


class Person(BaseModel):  # PERSON as an app writes it (the SDKs send its strict JSON Schema)
    class Address(BaseModel):
        city: str = Field(max_length=10)
        zip: str = Field(pattern="^[0-9]{5}$")

    name: str = Field(max_length=12)
    age: int
    role: Literal["admin", "user", "guest"]
    address: Address


# Several tools with required, enum and nested arguments: strict tool choices pick among them.
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 10},
                                          "unit": {"enum": ["c", "f"]}},
                                          "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add_event", "description": "Put an event in the calendar",
                                      "parameters": {"type": "object", "properties": {
                                          "title": {"type": "string", "maxLength": 10},
                                          "when": {"type": "object", "properties": {
                                              "day": {"type": "integer"}, "month": {"type": "integer"}},
                                              "required": ["day", "month"], "additionalProperties": False}},
                                          "required": ["title", "when"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "set_lights", "description": "Switch lights on or off",
                                      "parameters": {"type": "object", "properties": {
                                          "rooms": {"type": "array", "items": {"enum": ["hall", "den"]},
                                                    "maxItems": 2},
                                          "on": {"type": "boolean"}},
                                          "required": ["rooms", "on"], "additionalProperties": False}}},
]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


def random_model_file(tmp: Path) -> Path:
    checkpoint = write_checkpoint(tmp / "checkpoint" / "Qwen3-Tiny-Thinking", QUANT_SHAPE, seed=7, shards=1)
    [path] = convert(str(checkpoint), ["f16"], outdir=tmp, quiet=True)
    return path


def pondering_model_file(tmp: Path) -> Path:
    """The pondering chain: "\\n\\n" -> the answer -> <|im_end|>, then "\\n" -> "Hmm" -> nothing ("!" forever). The
    prompt ends with "\\n", so the reply thinks "Hmm!!!..."; the wrap-up ends with "\\n\\n", so the answer follows."""
    tokenizer = Tokenizer.from_str(tokenizer_json())

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    chain = [DOUBLE_NEWLINE_ID, *ids(PONDER_ANSWER), IM_END_ID, NEWLINE_ID, *ids(PONDER_THINKING)]
    folder = write_chain_checkpoint(tmp / "chain", chain, shards=1)
    [path] = convert(str(folder), ["f16"], outdir=tmp, quiet=True)
    return path


def check_answer(content: str, finish_reason: str, schema: dict[str, Any]) -> bool:
    """A reply's answer against its schema: complete ("stop") means valid; otherwise it must say it was cut short.
    Whether it completed."""
    if finish_reason == "stop":
        jsonschema.validate(json.loads(content), schema)
        return True
    assert finish_reason == "length", finish_reason
    return False


def check_call(name: str, arguments: Any, allowed: set[str]) -> None:
    """A tool call is to an allowed tool, with arguments (an object or its JSON text) that match its parameters."""
    assert name in allowed, name
    jsonschema.validate(json.loads(arguments) if isinstance(arguments, str) else arguments, PARAMETERS[name])


def mostly_complete(completed: list[bool]) -> None:
    """The grammar guarantees the shape, not the length: with these bounded schemas most random answers finish."""
    assert sum(completed) >= 0.75 * len(completed), completed
