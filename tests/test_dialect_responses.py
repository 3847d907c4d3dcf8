"""OpenAI's Responses API end to end: the real `openai` SDK's `responses` against the server on known-output models."""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import groupby
from types import SimpleNamespace

import httpx
import openai
import pytest

from tests.dialect_servers import (
    MODEL_ID,
    WEATHER,
    WRAP_UP,
    completion_tokens,
    dialect_servers,
    thinking_tokens,
)
from tests.lookback_model import ANSWER as LOOKBACK_ANSWER
from tests.lookback_model import ANSWER_THINKING, CALL_THINKING
from tests.test_server import ANSWER, KEY, THINKING

GREEDY = {"temperature": 0.0}
QUESTION = "What is the weather in Paris?"
TOOL = {"type": "function", **WEATHER}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    with dialect_servers(tmp_path_factory.mktemp("responses")) as servers:
        yield servers


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def items(response: openai.types.responses.Response) -> list[tuple[str, str]]:
    """(type, text) of each output item: reasoning text, message text, or a function call's name."""
    out = []
    for item in response.output:
        if item.type == "reasoning":
            out.append(("reasoning", "".join(part.text for part in item.content or [])))
        elif item.type == "message":
            out.append(("message", "".join(part.text for part in item.content)))
        else:
            out.append((item.type, item.name))
    return out


def test_response_has_reasoning_and_message_items(env: SimpleNamespace) -> None:
    response = client(env.main).responses.create(model="gpt-anything", input="Hi", **GREEDY)
    assert items(response) == [("reasoning", THINKING), ("message", ANSWER)]
    assert response.output_text == ANSWER and response.status == "completed" and response.model == MODEL_ID
    assert response.id.startswith("resp_") and response.store is False and response.incomplete_details is None
    usage = response.usage
    assert usage.input_tokens == len(env.scripted.tokenize_chat([{"role": "user", "content": "Hi"}]))
    assert usage.output_tokens == completion_tokens(env)
    assert usage.output_tokens_details.reasoning_tokens == thinking_tokens(env)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_stream_is_the_responses_event_sequence(env: SimpleNamespace) -> None:
    api = client(env.main)
    events = list(api.responses.create(model="m", input="Hi", stream=True, **GREEDY))
    assert [kind for kind, _ in groupby(e.type for e in events)] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == THINKING
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    completed = events[-1].response
    assert items(completed) == [("reasoning", THINKING), ("message", ANSWER)]
    assert completed.id == events[0].response.id and completed.usage.output_tokens == completion_tokens(env)
    # The SDK's own accumulator (responses.stream) checks the sequence as it goes.
    with api.responses.stream(model="m", input="Hi", **GREEDY) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == ANSWER and final.output_text == ANSWER


def test_instructions_effort_and_max_output_tokens(env: SimpleNamespace) -> None:
    api = client(env.main)
    instructed = api.responses.create(model="m", instructions="Be brief.", input=[
        {"role": "developer", "content": "Answer in English."}, {"role": "user", "content": "Hi"}], **GREEDY)
    expected = env.scripted.tokenize_chat([{"role": "system", "content": "Be brief."},
                                           {"role": "system", "content": "Answer in English."},
                                           {"role": "user", "content": "Hi"}])
    assert instructed.usage.input_tokens == len(expected) and instructed.instructions == "Be brief."
    none = api.responses.create(model="m", input="Hi", reasoning={"effort": "none"}, **GREEDY)  # budget 0
    assert items(none) == [("reasoning", WRAP_UP), ("message", ANSWER)] and none.reasoning.effort == "none"
    assert items(api.responses.create(model="m", input="Hi", reasoning={"effort": "xhigh"}, **GREEDY)) == [
        ("reasoning", THINKING), ("message", ANSWER)]  # as "high": no budget
    short = api.responses.create(model="m", input="Hi", max_output_tokens=5, **GREEDY)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 5 and [item.status for item in short.output] == ["incomplete"]
    events = list(api.responses.create(model="m", input="Hi", max_output_tokens=5, stream=True, **GREEDY))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"


def test_function_call_round_trip(env: SimpleNamespace) -> None:
    api = client(env.lookback, key="unused")
    # A hosted tool is left out (nothing here runs it); the function tool is used.
    first = api.responses.create(model="m", input=QUESTION, tools=[TOOL, {"type": "web_search"}], **GREEDY)
    assert items(first) == [("reasoning", CALL_THINKING), ("function_call", "get_weather")]
    call = first.output[1]
    assert call.arguments == '{"city": "Paris"}' and call.call_id.startswith("call_") and call.status == "completed"
    assert [tool.name for tool in first.tools] == ["get_weather"]
    # Stateless: the client sends the whole conversation back, the model's items as it got them.
    conversation = [{"role": "user", "content": QUESTION}, *[item.model_dump(exclude_none=True) for item in
                                                             first.output],
                    {"type": "function_call_output", "call_id": call.call_id, "output": "clear"}]
    second = api.responses.create(model="m", input=conversation, tools=[TOOL], **GREEDY)
    assert items(second) == [("reasoning", ANSWER_THINKING), ("message", LOOKBACK_ANSWER.format("clear"))]
    # Streamed, the arguments come as function_call_arguments events.
    events = list(api.responses.create(model="m", input=QUESTION, tools=[TOOL], stream=True, **GREEDY))
    [delta] = [e for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert delta.delta == done.arguments == '{"city": "Paris"}'
    assert items(events[-1].response) == [("reasoning", CALL_THINKING), ("function_call", "get_weather")]
    with api.responses.stream(model="m", input=conversation, tools=[TOOL], **GREEDY) as stream:
        final = stream.get_final_response()
    assert final.output_text == LOOKBACK_ANSWER.format("clear")


def test_reasoning_items_go_back_as_reasoning(env: SimpleNamespace) -> None:
    api = client(env.lookback, key="unused")
    first = api.responses.create(model="m", input=QUESTION, tools=[TOOL], **GREEDY)
    reasoning, call = (item.model_dump(exclude_none=True) for item in first.output)
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "grey"}

    def prompt(*model_items: dict) -> int:
        return api.responses.create(model="m", input=[{"role": "user", "content": QUESTION}, *model_items, result],
                                    tools=[TOOL], max_output_tokens=1, **GREEDY).usage.input_tokens

    thought = len(env.lookback_model.tokenize(f"<think>\n{CALL_THINKING}\n</think>\n\n", special=True))
    assert prompt(reasoning, call) == prompt(call) + thought
    summary_only = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": CALL_THINKING}]}
    assert prompt(summary_only, call) == prompt(call) + thought


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_errors(env: SimpleNamespace) -> None:
    api = client(env.main)
    with pytest.raises(openai.BadRequestError, match="keeps no responses"):
        api.responses.create(model="m", input="Hi", previous_response_id="resp_123")
    unenforceable = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    field = getattr(env, "schema_field", "text.format.schema")  # an upstream engine names its own field
    with pytest.raises(openai.BadRequestError, match=re.escape(f"{field}.properties.n.minimum is not supported")):
        api.responses.create(model="m", input="Hi", text={"format": {"type": "json_schema", "name": "n",
                                                                     "schema": unenforceable}})
    with pytest.raises(openai.AuthenticationError):
        client(env.main, key="wrong").responses.create(model="m", input="Hi")
    url, auth = f"{env.main}/v1/responses", {"Authorization": f"Bearer {KEY}"}
    assert openai_error(httpx.post(url, json={"input": "Hi", "reasoning": {"effort": "extreme"}}, headers=auth),
                        400)["param"] == "reasoning.effort"
    assert openai_error(httpx.post(url, json={"model": "m"}, headers=auth), 400)["param"] == "input"
    openai_error(httpx.post(url, json={"input": [{"type": "input_image", "image_url": "x"}]}, headers=auth), 400)
    openai_error(httpx.post(url, json={"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://127.0.0.1/x.png"}]}]}, headers=auth), 400)
    long = "word " * 600
    for stream in (False, True):
        assert openai_error(httpx.post(url, json={"input": long, "stream": stream}, headers=auth),
                            400)["code"] == "context_length_exceeded"
    assert "keeps no responses" in openai_error(httpx.get(f"{url}/resp_123", headers=auth), 404)["message"]
