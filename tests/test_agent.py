"""The tool loop (localqwen.agent) on real llama.cpp with known-output models.

The chain model's script is a tool call: whatever the conversation, it calls get_weather for Paris, so a loop over it
runs until max_rounds. The lookback model (tests/lookback_model.py) calls get_weather on a fresh question and, once a
tool response is in the prompt, answers with the value word nearest the end of the prompt: the answer shows what the
loop fed back (a result, an error's text, a refusal).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, Literal

import pydantic
import pytest

from localqwen import BadRequest, Model
from localqwen.agent import REFUSED, AgentRun, Rounds
from localqwen.convert import convert
from localqwen.events import Event, ToolCall, ToolResult
from localqwen.prompt import render_chat
from localqwen.tools import Tool, ToolError, as_tool, function_tool, result_text

from .lookback_model import ANSWER, ANSWER_THINKING, CALL_THINKING, UNKNOWN, write_lookback_checkpoint
from .test_model import TOOL_ANSWER, TOOL_CALL, TOOL_THINKING, chain_model

GREEDY = {"temperature": 0.0, "seed": 0}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def caller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    """Calls get_weather(city="Paris") every round."""
    path, _ = chain_model(tmp_path_factory.mktemp("caller"), TOOL_THINKING, TOOL_ANSWER, TOOL_CALL)
    model = Model.load(path, n_ctx=2048, gpu_layers=0, threads=1)
    yield model
    model.close()


@pytest.fixture(scope="module")
def lookback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    tmp = tmp_path_factory.mktemp("lookback")
    [path] = convert(str(write_lookback_checkpoint(tmp / "lookback")), ["f16"], outdir=tmp, quiet=True)
    model = Model.load(path, n_ctx=2048, gpu_layers=0, threads=1)
    yield model
    model.close()


class Weather:
    """get_weather as a tool that records its calls and answers from a table (or raises)."""

    def __init__(self, sky: str = "cold", error: Exception | None = None) -> None:
        self.sky, self.error, self.cities = sky, error, []

    def tool(self) -> Tool:
        def get_weather(city: str) -> dict[str, str]:
            """The weather in a city now.

            Args:
                city: the city's name
            """
            self.cities.append(city)
            if self.error is not None:
                raise self.error
            return {"city": city, "sky": self.sky}

        return function_tool(get_weather)


def kinds(events: list[Event]) -> list[tuple[int, str]]:
    """(round, kind) in order, runs of thinking and content squeezed to one."""
    out: list[tuple[int, str]] = []
    for event in events:
        if not (out and out[-1] == (event.round, event.kind) and event.kind in ("thinking", "content")):
            out.append((event.round, event.kind))
    return out


# --- the loop with a Python function ---------------------------------------------------------------------------------

def test_answer_after_a_tool_result(lookback: Model) -> None:
    weather = Weather("cold")
    run = lookback.act(QUESTION, tools=[weather.tool()], **GREEDY)
    events = list(run)
    assert weather.cities == ["Paris"]
    assert (run.answer, run.thinking, run.finish_reason, run.rounds) == (ANSWER.format("cold"), ANSWER_THINKING,
                                                                         "stop", 2)
    assert kinds(events) == [(1, "thinking"), (1, "tool_call"), (1, "done"), (1, "tool_result"),
                             (2, "thinking"), (2, "content"), (2, "done")]
    call = next(e.tool_call for e in events if e.kind == "tool_call")
    result = next(e.tool_result for e in events if e.kind == "tool_result")
    assert (call.id, call.name, call.arguments) == ("call_1_1", "get_weather", {"city": "Paris"})
    assert (result.call, result.content, result.status) == (call, '{"city":"Paris","sky":"cold"}', "ok")
    assert [s.finish_reason for s in run.stats] == ["tool_calls", "stop"]
    assert run.messages == [
        {"role": "assistant", "content": "", "reasoning_content": CALL_THINKING, "tool_calls": [
            {"id": "call_1_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1_1", "name": "get_weather", "content": '{"city":"Paris","sky":"cold"}'},
        {"role": "assistant", "content": ANSWER.format("cold"), "reasoning_content": ANSWER_THINKING}]


def test_thinking_is_kept_within_the_turn_and_dropped_after(lookback: Model) -> None:
    run = lookback.act(QUESTION, tools=[Weather("hot").tool()], **GREEDY).collect()
    tools = [Weather().tool().schema()]

    def prompt_text(messages: list[dict[str, Any]]) -> str:
        return "".join(s.text for s in render_chat(lookback.template, messages, lookback.special_texts, tools=tools))

    second_round = [*QUESTION, *run.messages[:2]]
    assert run.stats[1].prompt_tokens == len(lookback.tokenize_chat(second_round, tools))  # what round 2 was fed
    assert CALL_THINKING in prompt_text(second_round)  # the round's own thinking, across the tool round trip
    next_turn = [*QUESTION, *run.messages, {"role": "user", "content": "Thanks!"}]
    assert CALL_THINKING not in prompt_text(next_turn) and ANSWER_THINKING not in prompt_text(next_turn)


def test_the_loop_stops_at_max_rounds(caller: Model) -> None:
    weather = Weather("hot")
    run = caller.act(QUESTION, tools=[weather.tool()], max_rounds=3, **GREEDY)
    events = list(run)
    assert (run.finish_reason, run.rounds, run.answer) == ("max_rounds", 3, TOOL_ANSWER)
    assert weather.cities == ["Paris", "Paris"]  # the third round's call is not run: nothing would read its result
    assert [e.round for e in events if e.kind == "tool_result"] == [1, 2]
    assert [e.tool_call.id for e in events if e.kind == "tool_call"] == ["call_1_1", "call_2_1", "call_3_1"]
    assert [m["role"] for m in run.messages] == ["assistant", "tool", "assistant", "tool", "assistant"]
    # Each round was fed everything before it: its prompt is the conversation so far, tokenized.
    tools = [weather.tool().schema()]
    for n, stats in enumerate(run.stats):
        prompt = [*QUESTION, *run.messages[:2 * n]]
        assert stats.prompt_tokens == len(caller.tokenize_chat(prompt, tools))


def test_a_raising_tool_gives_the_model_its_error(lookback: Model) -> None:
    weather = Weather(error=RuntimeError("the sensor is stuck on grey"))
    run = lookback.act(QUESTION, tools=[weather.tool()], **GREEDY)
    [result] = [e.tool_result for e in run if e.kind == "tool_result"]
    assert (result.status, result.content) == ("error", "Error: RuntimeError: the sensor is stuck on grey")
    assert run.answer == ANSWER.format("grey")  # the model read the error's text


def test_a_refused_call_is_not_run(lookback: Model) -> None:
    weather = Weather("hot")
    asked: list[ToolCall] = []

    def refuse(call: ToolCall) -> bool:
        asked.append(call)
        return False

    run = lookback.act(QUESTION, tools=[weather.tool()], on_call=refuse, **GREEDY)
    [result] = [e.tool_result for e in run if e.kind == "tool_result"]
    assert weather.cities == [] and [c.arguments for c in asked] == [{"city": "Paris"}]
    assert (result.status, result.content) == ("refused", REFUSED)
    assert run.answer == ANSWER.format(UNKNOWN)
    reason = lookback.act(QUESTION, tools=[weather.tool()], on_call=lambda call: "Not now: it is clear anyway",
                          **GREEDY).collect()
    assert weather.cities == [] and reason.answer == ANSWER.format("clear")


def test_on_call_may_change_the_arguments(lookback: Model) -> None:
    weather = Weather("cool")
    run = lookback.act(QUESTION, tools=[weather.tool()], on_call=lambda call: {"city": "Lyon"}, **GREEDY).collect()
    assert weather.cities == ["Lyon"]
    assert json.loads(run.messages[0]["tool_calls"][0]["function"]["arguments"]) == {"city": "Lyon"}  # as it ran
    assert run.answer == ANSWER.format("cool")


def test_the_grammar_keeps_calls_to_the_tools_given(lookback: Model) -> None:
    """A local model cannot call a tool the app does not have, nor send arguments its schema refuses: once it
    writes <tool_call>, the call's body follows the tools' grammar (issue #18). The look-back model wants
    get_weather(city=...); given only get_time(zone), the call it makes is a valid get_time call."""
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        return "noon"

    run = lookback.act(QUESTION, tools=[get_time], max_rounds=1, max_tokens=120, **GREEDY)
    [call] = [e.tool_call for e in run if e.kind == "tool_call"]
    assert call.name == "get_time" and call.error is None and call.arguments["zone"] in ("UTC", "CET")


def test_calls_that_cannot_run_are_answered_with_the_reason() -> None:
    """What a model without grammars (a remote engine) may send: the loop answers it with the reason."""
    def get_weather(town: str) -> str:
        return "hot"

    rounds = Rounds(QUESTION, {"get_weather": as_tool(get_weather)}, max_rounds=4)
    unknown = ToolCall('{"name": "get_time"}', "get_time", {}, id="call_1_1")
    unreadable = ToolCall("{", error="invalid JSON: Expecting property name", id="call_1_2")
    assert rounds.check(unknown) == ToolResult(
        unknown, "Error: there is no tool named 'get_time' (the tools: get_weather)", "error")
    assert rounds.check(unreadable).content.startswith("Error: the tool call could not be read (invalid JSON")
    with pytest.raises(ToolError, match="invalid arguments: town: Field required"):
        as_tool(get_weather).call({"city": "Paris"})


def test_cancel_in_on_call_ends_the_run(caller: Model) -> None:
    weather = Weather()

    def cancel(call: ToolCall) -> bool:
        run.cancel()
        return True

    run = caller.act(QUESTION, tools=[weather.tool()], on_call=cancel, **GREEDY)
    events = list(run)
    assert run.finish_reason == "cancelled" and weather.cities == [] and run.rounds == 1
    assert "tool_result" not in [e.kind for e in events]


def test_async_loop_with_async_tool_and_hook(lookback: Model) -> None:
    seen: list[str] = []

    async def get_weather(city: str) -> str:
        """The weather in a city now."""
        await asyncio.sleep(0)
        seen.append(city)
        return f"{city}: clear"

    async def approve(call: ToolCall) -> bool:
        await asyncio.sleep(0)
        return True

    async def main() -> tuple[AgentRun, list[Event]]:
        run = lookback.aact(QUESTION, tools=[get_weather], on_call=approve, **GREEDY)
        return run, [event async for event in run]

    run, events = asyncio.run(main())
    assert seen == ["Paris"] and run.answer == ANSWER.format("clear") and run.finish_reason == "stop"
    assert kinds(events)[-3:] == [(2, "thinking"), (2, "content"), (2, "done")]
    # A blocking tool in the async loop runs in a worker thread; the sync loop runs an async tool on a loop of its own.
    assert asyncio.run(lookback.aact(QUESTION, tools=[Weather("hot").tool()], **GREEDY).acollect()).answer == \
        ANSWER.format("hot")
    assert lookback.act(QUESTION, tools=[get_weather], **GREEDY).collect().answer == ANSWER.format("clear")


def test_bad_runs_are_refused(lookback: Model) -> None:
    with pytest.raises(BadRequest, match="max_rounds must be at least 1, got 0"):
        lookback.act(QUESTION, tools=[], max_rounds=0)
    with pytest.raises(BadRequest, match="two tools are named 'get_weather'"):
        lookback.act(QUESTION, tools=[Weather().tool(), Weather().tool()])
    with pytest.raises(BadRequest, match="a tool is a function or a localqwen Tool, got 42"):
        lookback.act(QUESTION, tools=[42])
    run = lookback.act(QUESTION, tools=[Weather().tool()], **GREEDY).collect()
    with pytest.raises(BadRequest, match="can be iterated once"):
        run.collect()


# --- tools from Python functions (no model) --------------------------------------------------------------------------

def test_schema_from_type_hints_and_docstring() -> None:
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius", days: int = 1) -> dict:
        """The weather in a city.

        Up to a week ahead.

        Args:
            city: the city's name, e.g. Paris
            unit: the temperature unit
        """
        return {"city": city, "unit": unit, "days": days}

    tool = function_tool(get_weather)
    assert tool.schema() == {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.\n\nUp to a week ahead.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"], "properties": {
            "city": {"type": "string", "description": "the city's name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius",
                     "description": "the temperature unit"},
            "days": {"type": "integer", "default": 1}}}}}
    assert json.loads(tool.call({"city": "Paris", "days": "3"})) == {"city": "Paris", "unit": "celsius", "days": 3}
    with pytest.raises(Exception, match="invalid arguments: unit: Input should be 'celsius' or 'fahrenheit'"):
        tool.call({"city": "Paris", "unit": "kelvin"})


class Search(pydantic.BaseModel):
    """A web search."""

    query: str = pydantic.Field(description="what to look for")
    title: str | None = None  # a field named title stays (only pydantic's "title" labels go)


def test_schema_from_a_pydantic_model() -> None:
    def search(request: Search) -> list[str]:
        """Search the web."""
        return [request.query, str(request.title)]

    tool = function_tool(search, name="web_search")
    assert tool.name == "web_search" and tool.description == "Search the web."
    assert tool.parameters == {"type": "object", "description": "A web search.", "required": ["query"], "properties": {
        "query": {"type": "string", "description": "what to look for"},
        "title": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}}}
    assert tool.call({"query": "llamas"}) == '["llamas","None"]'


def test_functions_that_cannot_be_tools_are_refused() -> None:
    def spread(*cities: str) -> str:
        return ""

    with pytest.raises(BadRequest, match=r"\*args, \*\*kwargs and positional-only"):
        function_tool(spread)
    with pytest.raises(BadRequest, match="a tool name is 1 to 64 letters"):
        function_tool(lambda: "x")  # "<lambda>"


def test_results_become_text() -> None:
    class Sky(pydantic.BaseModel):
        sky: str

    assert (result_text("plain"), result_text({"a": [1, 2.5, None]}), result_text(Sky(sky="grey"))) == \
        ("plain", '{"a":[1,2.5,null]}', '{"sky":"grey"}')
    assert result_text({1, 2}) in ("[1,2]", "[2,1]")  # anything pydantic can write as JSON
