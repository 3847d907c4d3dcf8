"""Anthropic's Messages API end to end: the real `anthropic` SDK against the real server on known-output models."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import groupby
from types import SimpleNamespace

import anthropic
import httpx
import pytest

from localqwen.server import anthropic as dialect
from tests.dialect_servers import (
    MODEL_ID,
    WEATHER,
    WRAP_UP,
    completion_tokens,
    dialect_servers,
    first_thinking,
)
from tests.lookback_model import ANSWER as LOOKBACK_ANSWER
from tests.lookback_model import ANSWER_THINKING, CALL_THINKING
from tests.test_server import ANSWER, KEY, THINKING

HI = [{"role": "user", "content": "Hi"}]
JSON = {"Content-Type": "application/json"}  # a raw body must say it is JSON (the web guard refuses others: 415)
GREEDY = {"extra_body": {"temperature": 0.0}}  # this SDK no longer has sampling arguments; the API still takes them
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL = {"name": WEATHER["name"], "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    with dialect_servers(tmp_path_factory.mktemp("anthropic")) as servers:
        yield servers


def client(url: str, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=60)


def blocks(message: anthropic.types.Message) -> list[tuple[str, str]]:
    return [(b.type, b.thinking if b.type == "thinking" else b.text if b.type == "text" else b.name)
            for b in message.content]


def prompt_tokens(env: SimpleNamespace, messages: list, tools: list | None = None) -> int:
    return len(env.scripted.tokenize_chat(messages, tools))


def test_message_has_thinking_and_text_blocks(env: SimpleNamespace) -> None:
    message = client(env.main).messages.create(model="claude-anything", max_tokens=200, messages=HI, **GREEDY)
    assert blocks(message) == [("thinking", THINKING), ("text", ANSWER)]
    assert message.content[0].signature == dialect.sign(THINKING)
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.id.startswith("msg_") and message.model == MODEL_ID and message.role == "assistant"
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == prompt_tokens(env, HI)
    assert usage.output_tokens == completion_tokens(env)


def test_stream_is_anthropics_event_sequence(env: SimpleNamespace) -> None:
    api = client(env.main)
    events = list(api.messages.create(model="m", max_tokens=200, messages=HI, stream=True, **GREEDY))
    kinds = [kind for kind, _ in groupby(e.type if e.type != "content_block_delta" else e.delta.type for e in events)]
    assert kinds == ["message_start", "content_block_start", "thinking_delta", "signature_delta", "content_block_stop",
                     "content_block_start", "text_delta", "content_block_stop", "message_delta", "message_stop"]
    assert "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                   and e.delta.type == "thinking_delta") == THINKING
    assert [e.content_block.type for e in events if e.type == "content_block_start"] == ["thinking", "text"]
    assert events[-2].delta.stop_reason == "end_turn"
    assert events[-2].usage.output_tokens == completion_tokens(env)
    assert events[-2].usage.input_tokens + events[-2].usage.cache_read_input_tokens == prompt_tokens(env, HI)
    # The SDK's own accumulator builds the same message as the whole reply.
    with api.messages.stream(model="m", max_tokens=200, messages=HI, **GREEDY) as stream:
        assert "".join(stream.text_stream) == ANSWER
        final = stream.get_final_message()
    assert blocks(final) == [("thinking", THINKING), ("text", ANSWER)]
    assert final.content[0].signature == dialect.sign(THINKING) and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == completion_tokens(env)


def test_stream_starts_with_a_ping(env: SimpleNamespace) -> None:
    body = {"model": "m", "max_tokens": 200, "messages": HI, "stream": True, "temperature": 0.0}
    with httpx.stream("POST", f"{env.main}/v1/messages", json=body, headers={"x-api-key": KEY}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        names = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"] and names[-1] == "message_stop"


def test_thinking_budget_and_disabled_thinking(env: SimpleNamespace) -> None:
    api = client(env.main)
    budget = api.messages.create(model="m", max_tokens=200, messages=HI, thinking={
        "type": "enabled", "budget_tokens": 3}, **GREEDY)
    assert blocks(budget) == [("thinking", f"{first_thinking(env, 3)}\n\n{WRAP_UP}"), ("text", ANSWER)]
    # Disabled: the shortest thinking the model allows (the wrap-up alone), and no thinking block in the reply.
    disabled = api.messages.create(model="m", max_tokens=200, messages=HI, thinking={"type": "disabled"}, **GREEDY)
    assert blocks(disabled) == [("text", ANSWER)]
    assert disabled.usage.output_tokens == env.scripted.wrap_up_tokens + len(env.scripted.tokenize(ANSWER))
    adaptive = api.messages.create(model="m", max_tokens=200, messages=HI, thinking={"type": "adaptive"}, **GREEDY)
    assert blocks(adaptive) == [("thinking", THINKING), ("text", ANSWER)]
    effort = api.messages.create(model="m", max_tokens=200, messages=HI, output_config={"effort": "low"},
                                 thinking={"type": "adaptive", "display": "omitted"}, **GREEDY)
    assert blocks(effort) == [("text", ANSWER)]


def test_stop_sequences_and_max_tokens(env: SimpleNamespace) -> None:
    api = client(env.main)
    stopped = api.messages.create(model="m", max_tokens=200, messages=HI, stop_sequences=["user", "What"], **GREEDY)
    assert blocks(stopped) == [("thinking", THINKING), ("text", "Hello there! ")]
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "What")
    short = api.messages.create(model="m", max_tokens=5, messages=HI, **GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 5
    with api.messages.stream(model="m", max_tokens=200, messages=HI, stop_sequences=["re! W"], **GREEDY) as stream:
        final = stream.get_final_message()
    assert blocks(final)[1] == ("text", "Hello the") and final.stop_sequence == "re! W"


def test_tool_use_round_trip(env: SimpleNamespace) -> None:
    api = client(env.lookback, key="unused")
    first = api.messages.create(model="m", max_tokens=300, messages=QUESTION, tools=[TOOL], **GREEDY)
    assert blocks(first) == [("thinking", CALL_THINKING), ("tool_use", "get_weather")]
    call = first.content[1]
    assert call.input == {"city": "Paris"} and call.id.startswith("toolu_") and first.stop_reason == "tool_use"
    follow_up = [*QUESTION, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "cold"}]}]
    second = api.messages.create(model="m", max_tokens=300, messages=follow_up, tools=[TOOL], **GREEDY)
    assert blocks(second) == [("thinking", ANSWER_THINKING), ("text", LOOKBACK_ANSWER.format("cold"))]
    assert second.stop_reason == "end_turn"
    # Streamed, the call's input arrives as input_json_delta and the SDK parses it.
    with api.messages.stream(model="m", max_tokens=300, messages=QUESTION, tools=[TOOL], **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [e.delta.partial_json for e in events if e.type == "content_block_delta"
            and e.delta.type == "input_json_delta"] == ['{"city": "Paris"}']
    assert final.content[1].input == {"city": "Paris"} and final.stop_reason == "tool_use"
    # Result blocks as text parts, and text beside them, work too.
    parts = [*follow_up[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "hot"}]},
        {"type": "text", "text": "Thanks."}]}]
    third = api.messages.create(model="m", max_tokens=300, messages=parts, tools=[TOOL], **GREEDY)
    assert blocks(third)[1] == ("text", LOOKBACK_ANSWER.format("hot"))


def test_signed_thinking_goes_back_into_the_prompt(env: SimpleNamespace) -> None:
    api = client(env.lookback, key="unused")
    first = api.messages.create(model="m", max_tokens=300, messages=QUESTION, tools=[TOOL], **GREEDY)
    thinking, call = first.content[0].model_dump(), first.content[1].model_dump(exclude_none=True)

    def count(*assistant: dict) -> int:
        return api.messages.count_tokens(model="m", tools=[TOOL], messages=[
            *QUESTION, {"role": "assistant", "content": list(assistant)},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "cool"}]},
        ]).input_tokens

    without = count(call)
    # The template keeps the reasoning of a turn after the last user query: the signed thinking is in the prompt.
    assert count(thinking, call) == without + len(env.lookback_model.tokenize(f"<think>\n{CALL_THINKING}\n</think>\n\n",
                                                                              special=True))
    assert count({**thinking, "signature": "forged"}, call) == without
    assert count({**thinking, "thinking": "Edited."}, call) == without
    assert count({"type": "redacted_thinking", "data": "opaque"}, call) == without


def test_tools_choices_and_text_tool_calls(env: SimpleNamespace) -> None:
    api = client(env.lookback, key="unused")
    # tool_choice none: no tools in the prompt, and the model cannot open the call it would write (off its script,
    # it says "!" until max_tokens).
    none = api.messages.create(model="m", max_tokens=300, messages=QUESTION, tools=[TOOL],
                               tool_choice={"type": "none"}, **GREEDY)
    assert [kind for kind, _ in blocks(none)] == ["thinking", "text"] and blocks(none)[0][1] == CALL_THINKING
    assert "<tool_call>" not in blocks(none)[1][1] and none.stop_reason == "max_tokens"
    named = api.messages.create(model="m", max_tokens=300, messages=QUESTION, tools=[TOOL],
                                tool_choice={"type": "tool", "name": "get_weather"}, **GREEDY)
    assert named.stop_reason == "tool_use"
    # Anthropic's server tools are left out of the prompt: nothing here runs them.
    hosted = {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}
    assert api.messages.count_tokens(model="m", messages=QUESTION, tools=[TOOL, hosted]).input_tokens == \
        api.messages.count_tokens(model="m", messages=QUESTION, tools=[TOOL]).input_tokens
    with pytest.raises(anthropic.BadRequestError, match="not among the tools"):
        api.messages.create(model="m", max_tokens=300, messages=QUESTION, tools=[TOOL],
                            tool_choice={"type": "tool", "name": "nope"})


def test_count_tokens_is_the_prompt(env: SimpleNamespace) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}]}]
    counted = client(env.main).messages.count_tokens(model="m", system=[{"type": "text", "text": "Be brief."}],
                                                     messages=messages, tools=[TOOL])
    expected = env.scripted.tokenize_chat([{"role": "system", "content": "Be brief."}, *messages[:2],
                                           {"role": "user", "content": "Weather?"}],
                                          [{"type": "function", "function": WEATHER}])
    assert counted.input_tokens == len(expected)


def test_claude_codes_billing_stamp_does_not_break_the_kv_cache(env: SimpleNamespace) -> None:
    api = client(env.main)

    def cached(system: str) -> tuple[int, int]:
        usage = api.messages.create(model="m", max_tokens=200, messages=HI, system=[
            {"type": "text", "text": system}, {"type": "text", "text": "You are a helpful agent."}], **GREEDY).usage
        return usage.cache_read_input_tokens, usage.input_tokens

    header = "x-anthropic-billing-header: cc_version=2.1.101.e51; cc_entrypoint=cli; cch={};"
    cached(header.format("a5145"))
    reused, evaluated = cached(header.format("0be17"))
    assert evaluated == 1  # everything but the last prompt token came from the cache
    cached("stamp=a5145;")
    reused, evaluated = cached("stamp=0be17;")  # any other text that changes is a different prompt
    assert evaluated > 10


def anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    return body["error"]["message"]


def test_errors_have_anthropics_shape(env: SimpleNamespace) -> None:
    url, key = f"{env.main}/v1/messages", {"x-api-key": KEY}
    assert "max_tokens" in anthropic_error(httpx.post(url, json={"messages": HI}, headers=key), 400,
                                           "invalid_request_error")
    assert "not valid JSON" in anthropic_error(httpx.post(url, content=b"{", headers={**key, **JSON}), 400,
                                               "invalid_request_error")
    anthropic_error(httpx.post(url, json={"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, headers=key),
        400, "invalid_request_error")
    long = [{"role": "user", "content": "word " * 600}]
    for stream in (False, True):  # a stream fails before its headers go out
        assert "more than the context" in anthropic_error(httpx.post(url, json={
            "max_tokens": 5, "messages": long, "stream": stream}, headers=key), 400, "invalid_request_error")
    assert "budget_tokens" in anthropic_error(httpx.post(url, json={"max_tokens": 5, "messages": HI, "thinking": {
        "type": "enabled"}}, headers=key), 400, "invalid_request_error")
    assert "output_config.format.type: Field required" in anthropic_error(httpx.post(url, json={
        "max_tokens": 5, "messages": HI, "output_config": {"format": {}}}, headers=key), 400, "invalid_request_error")
    unenforceable = {"type": "json_schema", "schema": {"type": "object", "properties": {"n": {"minimum": 1}}}}
    field = getattr(env, "schema_field", "output_config.format.schema")  # an upstream engine names its own field
    assert f"{field}.properties.n.minimum is not supported" in anthropic_error(httpx.post(url, json={
        "max_tokens": 5, "messages": HI, "output_config": {"format": unenforceable}}, headers=key), 400,
        "invalid_request_error")
    anthropic_error(httpx.post(url, json={"max_tokens": 5, "messages": HI}), 401, "authentication_error")
    anthropic_error(httpx.post(url, json={"max_tokens": 5, "messages": HI}, headers={"x-api-key": "nope"}), 401,
                    "authentication_error")
    anthropic_error(httpx.post(f"{url}/nope", json={}, headers=key), 404, "not_found_error")
    anthropic_error(httpx.post(url, content=b'{"max_tokens": 5, "x": "' + b"x" * (5 << 20) + b'"}',
                                headers={**key, **JSON}),
                    413, "request_too_large")
    with pytest.raises(anthropic.AuthenticationError) as failed:
        client(env.main, key="wrong").messages.create(model="m", max_tokens=5, messages=HI)
    assert failed.value.body["error"]["type"] == "authentication_error"
    # The bearer key works as well as x-api-key.
    reply = httpx.post(url, json={"max_tokens": 5, "messages": HI}, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200 and reply.json()["stop_reason"] == "max_tokens"


def test_pings_keep_a_quiet_stream_alive(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    # A long prompt evaluation sends nothing for minutes; pings keep clients' read timeouts from firing. Here a
    # tiny interval makes every pause between tokens (and the prompt's evaluation) long enough for one.
    monkeypatch.setattr(dialect, "PING_S", 1e-4)  # the server runs in this process and reads it at each wait
    body = {"model": "m", "max_tokens": 200, "messages": HI, "stream": True, "temperature": 0.0}
    with httpx.stream("POST", f"{env.main}/v1/messages", json=body, headers={"x-api-key": KEY}) as response:
        names = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert names.count("ping") > 1 and names[-1] == "message_stop"
    # The client library ignores them: the message is whole.
    with client(env.main).messages.stream(model="m", max_tokens=200, messages=HI, **GREEDY) as stream:
        assert blocks(stream.get_final_message()) == [("thinking", THINKING), ("text", ANSWER)]
