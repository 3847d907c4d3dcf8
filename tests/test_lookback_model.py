"""The lookback model (tests/lookback_model.py) in llama.cpp: a tool call, then an answer taken from its result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localqwen.convert import convert
from localqwen.events import Reply
from localqwen.model import Model

from . import lookback_model
from .lookback_model import (
    ANSWER,
    ANSWER_THINKING,
    CALL_THINKING,
    UNKNOWN,
    VALUES,
    answer_chain,
    build_circuit,
    call_chain,
    write_lookback_checkpoint,
)
from .reference import forward

GREEDY = {"temperature": 0.0, "seed": 0}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def lookback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Model, Path]]:
    tmp = tmp_path_factory.mktemp("lookback")
    folder = write_lookback_checkpoint(tmp / "lookback")
    [path] = convert(str(folder), ["f16"], outdir=tmp, quiet=True)
    model = Model.load(path, n_ctx=1024, gpu_layers=0, threads=1)  # a tiny model: threads only add overhead
    yield model, folder
    model.close()


def chat(model: Model, messages: list[dict[str, Any]]) -> Reply:
    return Reply.collect(model.chat(messages, tools=[WEATHER_TOOL], **GREEDY))


def after_tool(messages: list[dict[str, Any]], reply: Reply, result: str) -> list[dict[str, Any]]:
    """What an agent loop appends: the assistant turn with its tool call, then the tool's result."""
    [call] = reply.tool_calls
    assistant = {"role": "assistant", "content": reply.content, "reasoning_content": reply.thinking,
                 "tool_calls": [{"id": "call_1", "type": "function",
                                 "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}]}
    return [*messages, assistant, {"role": "tool", "tool_call_id": "call_1", "content": result}]


def assert_answers(reply: Reply, value: str) -> None:
    assert (reply.thinking, reply.content, reply.tool_calls) == (ANSWER_THINKING, ANSWER.format(value), [])
    assert reply.stats.finish_reason == "stop"


def test_fresh_question_gets_the_scripted_tool_call(lookback: tuple[Model, Path]) -> None:
    model, _ = lookback
    reply = chat(model, QUESTION)
    assert (reply.thinking, reply.content) == (CALL_THINKING, "")
    [call] = reply.tool_calls
    assert (call.name, call.arguments, call.error) == ("get_weather", {"city": "Paris"}, None)
    assert reply.stats.finish_reason == "tool_calls"
    assert reply.stats.completion_tokens == len(call_chain()) - 2  # less the prompt's "\n" and <|im_end|>


@pytest.mark.parametrize("value", VALUES)
def test_answer_copies_the_tool_result(lookback: tuple[Model, Path], value: str) -> None:
    model, _ = lookback
    assert_answers(chat(model, after_tool(QUESTION, chat(model, QUESTION), value)), value)


@pytest.mark.parametrize(("result", "value"), [
    ('{"city": "Paris", "sky": "cold"}', "cold"),  # a JSON result: the value is found inside it
    ("Error: the weather service is down", UNKNOWN),  # no known value: the documented fallback
    ("hot in the morning, cold at night", "cold"),  # two values: the one nearest the end of the prompt
    ("clear cool", "cool"),  # side by side (a tie would give clear: lower id)
])
def test_answer_to_other_results(lookback: tuple[Model, Path], result: str, value: str) -> None:
    model, _ = lookback
    assert_answers(chat(model, after_tool(QUESTION, chat(model, QUESTION), result)), value)


def test_second_round_answers_from_the_last_result(lookback: tuple[Model, Path]) -> None:
    model, _ = lookback
    call = chat(model, QUESTION)
    first = after_tool(QUESTION, call, "hot")
    answer = chat(model, first)
    assert_answers(answer, "hot")
    again = [*first, {"role": "assistant", "content": answer.content, "reasoning_content": answer.thinking},
             {"role": "user", "content": "And now?"}]
    # Any tool response in the prompt makes this model answer, not call: the app calls again on its own (the same
    # call as the first), and the answer then names the newer result.
    assert_answers(chat(model, again), "hot")
    assert_answers(chat(model, after_tool(again, call, "grey")), "grey")


def test_numpy_reference_agrees(lookback: tuple[Model, Path]) -> None:
    """The float64 reference, teacher-forced with the scripted tokens, predicts each of them: the construction does
    not lean on anything llama.cpp-specific."""
    model, folder = lookback
    circuit = build_circuit()
    assert len(circuit.neurons) <= 64 and circuit.width <= 128  # the tiny shape the docstring promises
    question = model.tokenize_chat(QUESTION, [WEATHER_TOOL])
    call = call_chain()
    answered = model.tokenize_chat(after_tool(QUESTION, chat(model, QUESTION), "clear cool"), [WEATHER_TOOL])
    for prompt, chain in [(question, call), (answered, answer_chain("cool"))]:
        assert prompt[-1] == chain[0]
        predicted = forward(folder, prompt[:-1] + chain)[len(prompt) - 1:-1].argmax(-1)
        assert predicted.tolist() == chain[1:]


def test_scripts_that_break_the_construction_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookback_model, "VALUES", ("hot", "sunny"))
    with pytest.raises(ValueError, match="'sunny' must be a single token"):
        build_circuit()
    monkeypatch.setattr(lookback_model, "VALUES", VALUES)
    monkeypatch.setattr(lookback_model, "CALL_THINKING", "The weather is needed.")  # " is" leads to the value
    with pytest.raises(ValueError, match="must not occur in the call script"):
        build_circuit()
