"""What follows the thinking, guaranteed: JSON-schema answers and strict tool calls (random-weight models: the grammar
does all the work), calls opened while thinking, "answer now" and the loop guard (known-output chain models)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pydantic
import pytest
from tokenizers import Tokenizer

from localqwen import BadRequest, Model, Reply
from localqwen.constants import (
    IM_END_ID,
    THINK_CLOSE_ID,
    THINKING_BUDGET_WRAP_UP,
    TOOL_CALL_CLOSE_ID,
    TOOL_CALL_OPEN_ID,
)
from localqwen.convert import convert
from localqwen.synthetic import DOUBLE_NEWLINE_ID, NEWLINE_ID, chain_shape, chain_weights, write_checkpoint
from localqwen.tokenizer_data import tokenizer_json

from .test_server import WEATHER_TOOL

HI = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0.0, "seed": 0}
WRAP_UP = THINKING_BUDGET_WRAP_UP.strip()
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}},
                                       "required": ["zone"]}}}
SUM_TOOL = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"]}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL, SUM_TOOL]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    role: Literal["admin", "user", "guest"]
    age: int


@pytest.fixture(scope="module")
def random_model(gguf_files: dict[str, Path]) -> Iterator[Model]:
    """A random-weight model: it never means to close its thinking or write JSON; a budget of 4 ends the former,
    the grammar makes the latter."""
    model = Model.load(gguf_files["q8_0"], n_ctx=1024, gpu_layers=0, threads=1, parallel=4)
    yield model
    model.close()


def ids(text: str) -> list[int]:
    return Tokenizer.from_str(tokenizer_json()).encode(text, add_special_tokens=False).ids


def chain_gguf(tmp: Path, chain: list[int], loop: tuple[int, int] | None = None) -> Path:
    """A chain model (chain[k] -> chain[k + 1]); `loop` = (i, j) sends chain[i] back to chain[j] instead."""
    shape = chain_shape(len(chain))
    weights = chain_weights(shape, chain)
    if loop is not None:
        i, j = loop
        head = weights["lm_head.weight"]
        head[chain[i + 1], i], head[chain[j], i] = 0.0, 8.0
    folder = write_checkpoint(tmp / "chain", shape, weights=weights, shards=1)
    [path] = convert(str(folder), ["f16"], outdir=tmp, quiet=True)
    return Path(path)


# --- JSON-schema answers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema", [PERSON, {"type": "array", "items": {"type": "object", "properties": {
    "k": {"enum": [1, 2, 3]}, "v": {"type": ["number", "null"]}}, "required": ["k"]}, "minItems": 1, "maxItems": 4}])
def test_a_schema_answer_validates_whenever_it_ends(random_model: Model, schema: dict[str, Any]) -> None:
    finished = 0
    for seed in range(16):
        stream = random_model.chat(HI, schema=schema, thinking_budget=4, max_tokens=300, temperature=0.8, seed=seed)
        reply = Reply.collect(stream)
        assert reply.stats.wrap_up == "budget"  # the thinking stayed free: the budget, not the grammar, ended it
        if reply.stats.finish_reason == "stop":
            finished += 1
            jsonschema.validate(reply.parsed, schema)
            assert reply.parsed is not None
        else:
            assert reply.stats.finish_reason == "length" and reply.parsed is None  # cut: never passed off as done
    assert finished >= 12


def test_stop_strings_do_not_cut_a_schema_answer(random_model: Model) -> None:
    """Every JSON answer has '"' and '{': as stop strings they would cut it, so they apply to free answers only."""
    for seed in range(4):
        reply = Reply.collect(random_model.chat(HI, schema=PERSON, stop=['"', "{"], thinking_budget=2,
                                                max_tokens=300, seed=seed))
        if reply.stats.finish_reason == "stop":
            assert reply.stats.stop_sequence is None
            jsonschema.validate(reply.parsed, PERSON)
    free = Reply.collect(random_model.chat(HI, stop=["a", "e", "o"], thinking_budget=2, max_tokens=300, seed=0))
    assert free.stats.stop_sequence in ("a", "e", "o")  # the same strings end a free answer


def test_a_pydantic_model_is_a_schema(random_model: Model) -> None:
    replies = [Reply.collect(random_model.chat(HI, schema=Person, thinking_budget=2, max_tokens=200, seed=seed))
               for seed in range(6)]
    parsed = [r.parsed for r in replies if r.stats.finish_reason == "stop"]
    assert len(parsed) >= 4 and all(isinstance(p, Person) for p in parsed)


@pytest.mark.parametrize(("schema", "part"), [
    ({"type": "integer", "minimum": 3}, "schema.minimum"),
    ({"type": "object", "properties": {"when": {"type": "string", "format": "email"}}}, "schema.properties.when"),
    ({"type": "object", "properties": {"x": {"not": {"type": "null"}}}}, "schema.properties.x.not"),
    ({"type": "strange"}, "schema.type"),
    ({"allOf": [{"type": "object"}]}, "schema.allOf"),
    ("not a schema", "schema must be a JSON object"),
])
def test_a_schema_the_grammar_cannot_enforce_is_refused(random_model: Model, schema: Any, part: str) -> None:
    with pytest.raises(BadRequest, match=part.replace(".", r"\.")):
        random_model.chat(HI, schema=schema)


# --- strict tool calls ------------------------------------------------------------------------------------------

def check_calls(reply: Reply, allowed: set[str]) -> None:
    assert reply.stats.finish_reason == "tool_calls" and reply.tool_calls and reply.content == ""
    for call in reply.tool_calls:
        assert call.error is None and call.name in allowed
        jsonschema.validate(call.arguments, PARAMETERS[call.name])


def test_required_tool_choice_makes_only_valid_calls(random_model: Model) -> None:
    ended = 0
    for seed in range(10):
        reply = Reply.collect(random_model.chat(HI, tools=TOOLS, tool_choice="required", thinking_budget=3,
                                                max_tokens=300, temperature=0.7, seed=seed))
        if reply.stats.finish_reason != "length":
            ended += 1
            check_calls(reply, {"get_weather", "get_time", "add"})
    assert ended >= 6


def test_a_named_tool_is_the_one_called(random_model: Model) -> None:
    for seed in range(4):
        reply = Reply.collect(random_model.chat(HI, tools=TOOLS, tool_choice="get_time", thinking_budget=2,
                                                max_tokens=200, seed=seed))
        check_calls(reply, {"get_time"})
    with pytest.raises(BadRequest, match="no tool matches"):
        random_model.chat(HI, tools=TOOLS, tool_choice="nope")
    with pytest.raises(BadRequest, match="needs tools"):
        random_model.chat(HI, tool_choice="required")


def test_one_call_when_parallel_calls_are_off(random_model: Model) -> None:
    """parallel_tool_calls=False: the grammar allows one call and the reply ends with it (a random model under
    "required" otherwise often goes on calling until max_tokens)."""
    finishes = set()
    for seed in range(6):
        reply = Reply.collect(random_model.chat(HI, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                                thinking_budget=3, max_tokens=300, temperature=0.7, seed=seed))
        finishes.add(reply.stats.finish_reason)
        assert len(reply.tool_calls) <= 1  # a call still open at max_tokens counts as the one
        if reply.stats.finish_reason != "length":
            check_calls(reply, {"get_weather", "get_time", "add"})
            assert len(reply.tool_calls) == 1
    assert "tool_calls" in finishes  # (seeds 1, 3 and 5 end on their call; the others run long inside it)


CITY_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}}, "required": ["city"]}}}


def test_none_keeps_calls_out_and_auto_makes_started_calls_valid(tmp_path: Path) -> None:
    """A chain model scripted to answer, then write a call whose JSON is broken (a bare word for the city)."""
    broken = '{"name":"get_weather","arguments":{"city": Paris}}'
    chain = [NEWLINE_ID, *ids("Need weather data"), THINK_CLOSE_ID, DOUBLE_NEWLINE_ID, *ids("Checking now!"),
             TOOL_CALL_OPEN_ID, *ids(broken), TOOL_CALL_CLOSE_ID, IM_END_ID]
    model = Model.load(chain_gguf(tmp_path, chain), n_ctx=512, gpu_layers=0, threads=1)
    try:
        free = Reply.collect(model.chat(HI, **GREEDY))  # no tools: nothing constrains the call
        assert free.tool_calls[0].error and free.tool_calls[0].raw == broken
        auto = Reply.collect(model.chat(HI, tools=[CITY_TOOL], max_tokens=60, **GREEDY))
        call = auto.tool_calls[0]  # (after it the model, off its script, wanders on to the token limit)
        assert call.error is None and call.name == "get_weather" and call.arguments["city"] in ("Paris", "Lyon")
        assert call.raw.startswith('{"name":"get_weather","arguments":{"city":')  # as scripted up to the flaw
        none = Reply.collect(model.chat(HI, tools=[CITY_TOOL], tool_choice="none", max_tokens=20, **GREEDY))
        assert none.tool_calls == [] and none.content.startswith("Checking now!")
    finally:
        model.close()


# --- calls opened while thinking --------------------------------------------------------------------------------

def test_a_call_opened_while_thinking(tmp_path: Path) -> None:
    call = '{"name":"get_weather","arguments":{"city": "Paris"}}'
    thinking = ids("I will check the weather")
    real = [NEWLINE_ID, *thinking, TOOL_CALL_OPEN_ID, *ids(call), TOOL_CALL_CLOSE_ID, IM_END_ID]
    model = Model.load(chain_gguf(tmp_path / "real", real), n_ctx=512, gpu_layers=0, threads=1)
    try:
        events = list(model.chat(HI, tools=[WEATHER_TOOL], **GREEDY))
        reply = Reply.collect(events)
        assert (reply.thinking, reply.content) == ("I will check the weather", "")
        assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", {"city": "Paris"})]
        assert reply.stats.finish_reason == "tool_calls" and not reply.stats.truncated_thinking
        assert not any("<tool_call>" in e.text or "Paris" in e.text for e in events if e.kind == "thinking")
    finally:
        model.close()
    later = [NEWLINE_ID, *ids("Maybe"), TOOL_CALL_OPEN_ID, *ids(call), TOOL_CALL_CLOSE_ID, *ids(" not yet"),
             THINK_CLOSE_ID, DOUBLE_NEWLINE_ID, *ids("Sunny I think."), IM_END_ID]
    model = Model.load(chain_gguf(tmp_path / "thought", later), n_ctx=512, gpu_layers=0, threads=1)
    try:
        reply = Reply.collect(model.chat(HI, tools=[WEATHER_TOOL], **GREEDY))
        assert reply.thinking == f"Maybe<tool_call>{call}</tool_call> not yet" and reply.tool_calls == []
        assert reply.content == "Sunny I think." and reply.stats.finish_reason == "stop"
    finally:
        model.close()


# --- answer now and the loop guard ------------------------------------------------------------------------------

THOUGHTS = "First I list every option, then weigh each carefully before settling anything at all"


@pytest.fixture(scope="module")
def long_thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    chain = [NEWLINE_ID, *ids(THOUGHTS), THINK_CLOSE_ID, DOUBLE_NEWLINE_ID, *ids("Done."), IM_END_ID]
    model = Model.load(chain_gguf(tmp_path_factory.mktemp("thinker"), chain), n_ctx=512, gpu_layers=0, threads=1)
    yield model
    model.close()


def test_answer_now_closes_the_thinking_and_the_model_answers(long_thinker: Model) -> None:
    stream = long_thinker.chat(HI, **GREEDY)
    first = next(stream)
    assert first.kind == "thinking"
    stream.end_thinking()
    reply = Reply.collect([first, *stream])
    assert reply.thinking.endswith(WRAP_UP) and len(reply.thinking) < len(THOUGHTS) + len(WRAP_UP)
    assert reply.content == "Done." and reply.stats.wrap_up == "answer_now" and reply.stats.finish_reason == "stop"
    alone = Reply.collect(long_thinker.chat(HI, **GREEDY))  # nobody asked: the whole thought
    assert (alone.thinking, alone.stats.wrap_up) == (THOUGHTS, None)


def test_the_model_wide_answer_now(long_thinker: Model) -> None:
    stream = long_thinker.chat(HI, **GREEDY)
    next(stream)
    long_thinker.end_thinking()
    assert Reply.collect(stream).stats.wrap_up == "answer_now"


def test_the_loop_guard_wraps_up_thinking_that_repeats_itself(tmp_path: Path) -> None:
    loop = ids(" so I check each premise again and compare it with what my notes said")
    chain = [NEWLINE_ID, *loop, THINK_CLOSE_ID, DOUBLE_NEWLINE_ID, *ids("Enough."), IM_END_ID]
    model = Model.load(chain_gguf(tmp_path, chain, loop=(len(loop), 1)), n_ctx=2048, gpu_layers=0, threads=1)
    try:
        reply = Reply.collect(model.chat(HI, max_tokens=1500, answer_reserve=0, **GREEDY))
        assert reply.stats.wrap_up == "loop_guard" and reply.content == "Enough."
        assert reply.thinking.count("compare it with") >= 3 and reply.thinking.endswith(WRAP_UP)
        unguarded = Reply.collect(model.chat(HI, max_tokens=300, answer_reserve=0, loop_guard=False, **GREEDY))
        assert unguarded.stats.finish_reason == "length" and unguarded.stats.truncated_thinking
    finally:
        model.close()
