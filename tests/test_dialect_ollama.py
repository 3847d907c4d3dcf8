"""Ollama's native API end to end: the real `ollama` Python client against the server on known-output models."""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import ollama
import pytest

from tests.dialect_servers import MODEL_ID, WEATHER, WRAP_UP, completion_tokens, dialect_servers, first_thinking
from tests.lookback_model import ANSWER as LOOKBACK_ANSWER
from tests.lookback_model import ANSWER_THINKING, CALL_THINKING, TOOL_CALL
from tests.test_server import ANSWER, KEY, THINKING

GREEDY = {"temperature": 0.0, "seed": 0}
HI = [{"role": "user", "content": "Hi"}]
JSON = {"Content-Type": "application/json"}  # a raw body must say it is JSON (the web guard refuses others: 415)
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL = {"type": "function", "function": WEATHER}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    with dialect_servers(tmp_path_factory.mktemp("ollama")) as servers:
        yield servers


def client(url: str) -> ollama.Client:
    return ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def check_totals(reply: ollama.ChatResponse | ollama.GenerateResponse, prompt: int, generated: int) -> None:
    """The final chunk's counts, and durations in nanoseconds."""
    assert reply.done and (reply.prompt_eval_count, reply.eval_count) == (prompt, generated)
    assert reply.load_duration == 0
    for duration in (reply.prompt_eval_duration, reply.eval_duration, reply.total_duration):
        assert isinstance(duration, int) and 0 < duration < 60 * 10**9
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration


def test_chat_with_thinking(env: SimpleNamespace) -> None:
    reply = client(env.main).chat(model="qwen3:4b", messages=HI, think=True, options=GREEDY)
    assert (reply.message.thinking, reply.message.content, reply.message.tool_calls) == (THINKING, ANSWER, None)
    assert reply.model == MODEL_ID and reply.done_reason == "stop" and reply.message.role == "assistant"
    check_totals(reply, len(env.scripted.tokenize_chat(HI)), completion_tokens(env))


def test_streamed_chat_is_ndjson(env: SimpleNamespace) -> None:
    chunks = list(client(env.main).chat(model="m", messages=HI, stream=True, options=GREEDY))
    assert "".join(c.message.thinking or "" for c in chunks) == THINKING
    assert "".join(c.message.content or "" for c in chunks) == ANSWER
    first_answer = next(i for i, c in enumerate(chunks) if c.message.content)
    assert all(c.message.thinking for c in chunks[:first_answer]) and not any(c.done for c in chunks[:-1])
    final = chunks[-1]
    assert final.message.content == "" and final.done_reason == "stop"
    check_totals(final, len(env.scripted.tokenize_chat(HI)), completion_tokens(env))
    with httpx.stream("POST", f"{env.main}/api/chat", json={"model": "m", "messages": HI},
                      headers={"Authorization": f"Bearer {KEY}"}) as response:  # streams unless told not to
        assert response.headers["content-type"] == "application/x-ndjson"
        assert sum(1 for _ in response.iter_lines()) == len(chunks)


def test_think_levels_and_false(env: SimpleNamespace) -> None:
    api = client(env.main)
    off = api.chat(model="m", messages=HI, think=False, options=GREEDY)
    assert (off.message.thinking, off.message.content) == (None, ANSWER)  # the wrap-up alone, and not shown
    assert off.eval_count == env.scripted.wrap_up_tokens + len(env.scripted.tokenize(ANSWER))
    for level in ("low", "medium", "high"):
        reply = api.chat(model="m", messages=HI, think=level, options=GREEDY)
        assert (reply.message.thinking, reply.message.content) == (THINKING, ANSWER)
    budget = api.chat(model="m", messages=HI, options={**GREEDY, "thinking_budget": 3})
    assert budget.message.thinking == f"{first_thinking(env, 3)}\n\n{WRAP_UP}"
    with pytest.raises(ollama.ResponseError, match="think must be") as failed:
        api.chat(model="m", messages=HI, think="extreme")
    assert failed.value.status_code == 400


def test_options(env: SimpleNamespace) -> None:
    api = client(env.main)
    short = api.chat(model="m", messages=HI, options={**GREEDY, "num_predict": 5})
    assert short.done_reason == "length" and short.eval_count == 5
    unlimited = api.chat(model="m", messages=HI, options={**GREEDY, "num_predict": -1, "num_ctx": 512,
                                                          "repeat_penalty": 1.1, "num_gpu": 0})
    assert unlimited.message.content == ANSWER  # Ollama's other options are accepted and change nothing here
    stopped = api.chat(model="m", messages=HI, options={**GREEDY, "stop": ["user", "What"]}, keep_alive="5m")
    assert (stopped.message.thinking, stopped.message.content) == (THINKING, "Hello there! ")
    with pytest.raises(ollama.ResponseError, match="--ctx 4096") as failed:
        api.chat(model="m", messages=HI, options={"num_ctx": 4096})
    assert failed.value.status_code == 400 and "loaded context of 512" in failed.value.error
    field = getattr(env, "schema_field", "format")  # an upstream engine names its own field
    with pytest.raises(ollama.ResponseError, match=re.escape(f"{field}.properties.n.minimum is not supported")):
        api.chat(model="m", messages=HI, format={"type": "object", "properties": {"n": {"minimum": 1}}})
    with pytest.raises(ollama.ResponseError, match="temperature"):
        api.chat(model="m", messages=HI, options={"temperature": -1})


def test_tool_call_round_trip(env: SimpleNamespace) -> None:
    api = client(env.lookback)
    first = api.chat(model="m", messages=QUESTION, tools=[TOOL], options=GREEDY)
    assert (first.message.thinking, first.message.content) == (CALL_THINKING, "")
    [call] = first.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", {"city": "Paris"})
    follow_up = [*QUESTION, first.message, {"role": "tool", "tool_name": "get_weather", "content": "cool"}]
    second = api.chat(model="m", messages=follow_up, tools=[TOOL], options=GREEDY)
    assert (second.message.thinking, second.message.content) == (ANSWER_THINKING, LOOKBACK_ANSWER.format("cool"))
    streamed = list(api.chat(model="m", messages=QUESTION, tools=[TOOL], stream=True, options=GREEDY))
    [call_chunk] = [c for c in streamed if c.message.tool_calls]
    assert call_chunk.message.tool_calls[0].function.arguments == {"city": "Paris"} and not call_chunk.done
    # Without tools, the call the model writes stays text.
    plain = api.chat(model="m", messages=QUESTION, options=GREEDY)
    assert plain.message.content == f"<tool_call>\n{TOOL_CALL}\n</tool_call>" and plain.message.tool_calls is None


def test_generate(env: SimpleNamespace) -> None:
    api = client(env.main)
    reply = api.generate(model="m", prompt="Hi", options=GREEDY)
    assert (reply.thinking, reply.response, reply.done_reason) == (THINKING, ANSWER, "stop")
    check_totals(reply, len(env.scripted.tokenize_chat(HI)), completion_tokens(env))
    system = api.generate(model="m", prompt="Hi", system="Be brief.", options=GREEDY)
    assert system.prompt_eval_count == len(env.scripted.tokenize_chat([{"role": "system", "content": "Be brief."},
                                                                       *HI]))
    chunks = list(api.generate(model="m", prompt="Hi", stream=True, options=GREEDY))
    assert "".join(c.thinking or "" for c in chunks) == THINKING and "".join(c.response for c in chunks) == ANSWER
    # raw: the prompt as given, special tokens and all, and no thinking split.
    raw = api.generate(model="m", prompt="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n",
                       raw=True, options=GREEDY)
    assert (raw.thinking, raw.response) == (None, f"{THINKING}</think>\n\n{ANSWER}")
    assert raw.prompt_eval_count == len(env.scripted.tokenize_chat(HI))
    loaded = api.generate(model="m", prompt="")  # what apps send to load a model
    assert loaded.done and loaded.done_reason == "load"
    with pytest.raises(ollama.ResponseError, match="suffix"):
        api.generate(model="m", prompt="def f(", suffix="return 1")


def test_model_listing(env: SimpleNamespace) -> None:
    api = client(env.main)
    [model] = api.list().models
    assert model.model == MODEL_ID and model.size == env.scripted.path.stat().st_size and len(model.digest) == 64
    assert (model.details.format, model.details.family, model.details.quantization_level) == ("gguf", "qwen3", "F16")
    shown = api.show(MODEL_ID)
    assert shown.template == env.scripted.template and {"thinking", "tools"} <= set(shown.capabilities)
    assert shown.modelinfo["qwen3.context_length"] == env.scripted.n_ctx == 512  # the loaded context
    assert shown.modelinfo["general.architecture"] == "qwen3" and "num_ctx" in shown.parameters
    [running] = api.ps().models
    assert running.model == MODEL_ID and running.context_length == 512 and running.size > model.size
    assert httpx.get(f"{env.main}/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()["version"]
    root = httpx.get(env.main)  # apps probe for Ollama here, without a key
    assert (root.status_code, root.text) == (200, "Ollama is running")


def ollama_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


def test_errors_have_ollamas_shape(env: SimpleNamespace) -> None:
    url, auth = env.main, {"Authorization": f"Bearer {KEY}"}
    assert "not valid JSON" in ollama_error(httpx.post(f"{url}/api/chat", content=b"{", headers={**auth, **JSON}), 400)
    assert "model" in ollama_error(httpx.post(f"{url}/api/chat", json={"messages": HI}, headers=auth), 400)
    ollama_error(httpx.post(f"{url}/api/chat", json={"model": "m", "messages": [
        {"role": "user", "content": "Hi", "images": ["AAAA"]}]}, headers=auth), 400)
    long = [{"role": "user", "content": "word " * 600}]
    for stream in (False, True):  # a stream fails before its first line
        assert "more than the context" in ollama_error(httpx.post(f"{url}/api/chat", json={
            "model": "m", "messages": long, "stream": stream}, headers=auth), 400)
    ollama_error(httpx.post(f"{url}/api/chat", json={"model": "m", "messages": HI}), 401)
    ollama_error(httpx.post(f"{url}/api/pull", json={"model": "qwen3"}, headers=auth), 404)
    ollama_error(httpx.get(f"{url}/api/chat", headers=auth), 405)
    with pytest.raises(ollama.ResponseError) as failed:
        ollama.Client(host=url).list()
    assert failed.value.status_code == 401 and "API key" in failed.value.error
