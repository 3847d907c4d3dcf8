"""Structured answers and strict tool choices through the other dialects, each with its own client library: OpenAI's
Responses (`openai`), Anthropic's Messages (`anthropic`), Ollama's chat (`ollama`), on a random tiny model (the grammar
does all the work: tests/structured.py) and a chain model whose reply is known."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Literal

import anthropic
import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel

from localqwen.model import Model
from localqwen.server import create_app
from localqwen.synthetic import script_chain
from tests.structured import (
    MAX_TOKENS,
    PERSON,
    SCHEMAS,
    THINK_BRIEFLY,
    TOOLS,
    Person,
    check_answer,
    check_call,
    mostly_complete,
    random_model_file,
)
from tests.test_server import HI, KEY, TOOL_ANSWER, TOOL_CALL, TOOL_THINKING, load_chain, running

SEEDS = range(6)
NAMES = {tool["function"]["name"] for tool in TOOLS}
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


class Switches(BaseModel):  # bounded without maxLength or maxItems, which Anthropic's SDK moves into descriptions
    room: Literal["hall", "den", "attic"]
    on: bool
    level: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("structured-dialects")
    rand = Model.load(random_model_file(tmp / "random"), n_ctx=2048, gpu_layers=0, threads=1)
    tool = load_chain(tmp, "tool", script_chain(TOOL_THINKING, TOOL_ANSWER, tool_call=TOOL_CALL)[0])
    try:
        with contextlib.ExitStack() as stack:
            yield SimpleNamespace(random=stack.enter_context(running(create_app(rand, api_key=KEY))),
                                  tool=stack.enter_context(running(create_app(tool, api_key=KEY))))
    finally:
        rand.close()
        tool.close()


def responses_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def anthropic_client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=60)


def ollama_client(url: str) -> ollama.Client:
    return ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


# --- OpenAI Responses ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["person", "order"])
def test_responses_text_format(env: SimpleNamespace, name: str) -> None:
    api, schema = responses_client(env.random), SCHEMAS[name]
    text_format = {"type": "json_schema", "name": name, "schema": schema, "strict": True}
    completed = []
    for seed in SEEDS:
        request = {"model": "m", "input": "Hi", "text": {"format": text_format}, "max_output_tokens": MAX_TOKENS,
                   "extra_body": {"thinking_budget": THINK_BRIEFLY, "seed": seed}}
        if seed % 2:
            events = list(api.responses.create(stream=True, **request))
            response = events[-1].response
            assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
        else:
            response = api.responses.create(**request)
        assert response.text.format.type == "json_schema"  # the response says what it was asked for
        finish = "stop" if response.status == "completed" else "length"
        assert finish == "stop" or response.incomplete_details.reason == "max_output_tokens"
        completed.append(check_answer(response.output_text, finish, schema))
    mostly_complete(completed)


def test_responses_parse_and_json_object(env: SimpleNamespace) -> None:
    api = responses_client(env.random)
    parsed = []
    for seed in range(4):
        response = api.responses.parse(model="m", input="Hi", text_format=Person, max_output_tokens=MAX_TOKENS,
                                       extra_body={"thinking_budget": THINK_BRIEFLY, "seed": seed})
        if response.status == "completed":
            assert isinstance(response.output_parsed, Person)
            jsonschema.validate(response.output_parsed.model_dump(), PERSON)
            parsed.append(response.output_parsed)
        response = api.responses.create(model="m", input="Hi", text={"format": {"type": "json_object"}},
                                        max_output_tokens=MAX_TOKENS,
                                        extra_body={"thinking_budget": THINK_BRIEFLY, "seed": seed})
        check_answer(response.output_text, "stop" if response.status == "completed" else "length", {"type": "object"})
    assert len(parsed) >= 3


@pytest.mark.parametrize("choice", ["required", "set_lights"])
def test_responses_tool_choice(env: SimpleNamespace, choice: str) -> None:
    api = responses_client(env.random)
    tool_choice = choice if choice == "required" else {"type": "function", "name": choice}
    for seed in range(4):
        response = api.responses.create(model="m", input="Hi", tools=RESPONSES_TOOLS, tool_choice=tool_choice,
                                        max_output_tokens=MAX_TOKENS,
                                        extra_body={"thinking_budget": THINK_BRIEFLY, "seed": seed})
        calls = [item for item in response.output if item.type == "function_call"]
        assert calls and all(item.type in ("reasoning", "function_call") or response.status == "incomplete"
                             for item in response.output)  # calls only, but for the one cut off at the end
        for call in calls:
            check_call(call.name, call.arguments, NAMES if choice == "required" else {choice})


# --- Anthropic Messages --------------------------------------------------------------------------------------------

BRIEF_THINKING = {"type": "enabled", "budget_tokens": THINK_BRIEFLY}


def test_anthropic_output_format(env: SimpleNamespace) -> None:
    api = anthropic_client(env.random)
    completed = []
    for seed in SEEDS:
        request = {"model": "claude-anything", "max_tokens": MAX_TOKENS, "messages": HI, "thinking": BRIEF_THINKING,
                   "output_config": {"format": {"type": "json_schema", "schema": PERSON}},
                   "extra_body": {"seed": seed}}
        if seed % 2:
            with api.messages.stream(**request) as stream:
                message = stream.get_final_message()
        else:
            message = api.messages.create(**request)
        assert [block.type for block in message.content] == ["thinking", "text"]
        finish = {"end_turn": "stop", "max_tokens": "length"}[message.stop_reason]
        completed.append(check_answer(message.content[1].text, finish, PERSON))
    mostly_complete(completed)


def test_anthropic_parse(env: SimpleNamespace) -> None:
    api = anthropic_client(env.random)
    for seed in range(4):
        message = api.messages.parse(model="claude-anything", max_tokens=MAX_TOKENS, messages=HI,
                                     thinking=BRIEF_THINKING, output_format=Switches, extra_body={"seed": seed})
        assert message.stop_reason == "end_turn" and isinstance(message.parsed_output, Switches)


@pytest.mark.parametrize("choice", ["any", "add_event"])
def test_anthropic_tool_choice(env: SimpleNamespace, choice: str) -> None:
    api = anthropic_client(env.random)
    tool_choice = {"type": "any"} if choice == "any" else {"type": "tool", "name": choice}
    for seed in range(4):
        message = api.messages.create(model="claude-anything", max_tokens=MAX_TOKENS, messages=HI,
                                      thinking=BRIEF_THINKING, tools=ANTHROPIC_TOOLS, tool_choice=tool_choice,
                                      extra_body={"seed": seed})
        uses = [block for block in message.content if block.type == "tool_use"]
        assert uses and message.stop_reason in ("tool_use", "max_tokens")
        if message.stop_reason == "tool_use":  # tool calls and nothing else
            assert {block.type for block in message.content} == {"thinking", "tool_use"}
        for use in uses:
            check_call(use.name, use.input, NAMES if choice == "any" else {choice})


def test_anthropic_tool_choice_none(env: SimpleNamespace) -> None:
    # The chain model calls get_weather right after its answer; with "none" it cannot open the call.
    message = anthropic_client(env.tool).messages.create(
        model="m", max_tokens=30, messages=HI, tools=ANTHROPIC_TOOLS, tool_choice={"type": "none"},
        extra_body={"temperature": 0.0})
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[1].text.startswith(TOOL_ANSWER + "!") and message.stop_reason == "max_tokens"
    strict = anthropic_client(env.tool).messages.create(
        model="m", max_tokens=200, messages=HI, tools=ANTHROPIC_TOOLS, tool_choice={"type": "tool",
                                                                                    "name": "get_weather"},
        extra_body={"temperature": 0.0})
    assert strict.stop_reason in ("tool_use", "max_tokens") and TOOL_ANSWER not in json.dumps(
        [block.model_dump() for block in strict.content if block.type != "thinking"])


# --- Ollama ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_ollama_format(env: SimpleNamespace, stream: bool) -> None:
    api = ollama_client(env.random)
    completed = []
    for seed in SEEDS:
        for fmt, schema in ((Person.model_json_schema(), PERSON), ("json", {"type": "object"})):
            options = {"seed": seed, "num_predict": MAX_TOKENS}
            # think=False: the shortest thinking the model allows (the wrap-up alone), then the constrained answer
            if stream:
                chunks = list(api.chat(model="m", messages=HI, format=fmt, think=False, options=options,
                                       stream=True))
                content, done = "".join(c.message.content for c in chunks), chunks[-1]
            else:
                done = api.chat(model="m", messages=HI, format=fmt, think=False, options=options)
                content = done.message.content
            assert done.message.thinking is None
            complete = check_answer(content, done.done_reason, schema)
            if fmt != "json":  # any object at all: a random model may well write one until num_predict runs out
                completed.append(complete)
    mostly_complete(completed)
    reply = api.generate(model="m", prompt="Hi", format=Switches.model_json_schema(), think=False,
                         options={"seed": 1, "num_predict": MAX_TOKENS})
    assert reply.done_reason == "stop" and Switches.model_validate_json(reply.response)
