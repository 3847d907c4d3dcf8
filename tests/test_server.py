"""The OpenAI-compatible server end to end: real uvicorn, the real `openai` client, known-output chain models."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from localqwen.constants import THINK_CLOSE_ID, THINKING_BUDGET_WRAP_UP
from localqwen.convert import convert
from localqwen.model import Model
from localqwen.server import create_app
from localqwen.synthetic import script_chain, write_chain_checkpoint

THINKING = "Okay, the user greets me 🦙; I should reply politely."
ANSWER = "Hello there! What do you need today?"
TOOL_THINKING, TOOL_ANSWER = "Need weather data", "Checking now!"
TOOL_CALL = '{"name":"get_weather","arguments":{"city": "Paris"}}'
KEY = "sk-local-test"
GREEDY = {"temperature": 0.0, "seed": 0}
HI = [{"role": "user", "content": "Hi"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def load_chain(tmp: Path, name: str, chain: list[int], n_ctx: int = 512, **load: Any) -> Model:
    folder = write_chain_checkpoint(tmp / name, chain, shards=1)
    (out := tmp / f"{name}-gguf").mkdir()
    [path] = convert(str(folder), ["f16"], outdir=out, quiet=True)
    # One thread: these models are tiny, and llama.cpp's thread barriers crawl on a busy 2-core machine.
    return Model.load(path, n_ctx=n_ctx, gpu_layers=0, threads=1, **load)


@contextlib.contextmanager
def running(app: FastAPI, port: int = 0) -> Iterator[str]:
    """`app` served by uvicorn on 127.0.0.1 (`port`, or a free one) in a thread; its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("server")
    chain, _ = script_chain(THINKING, ANSWER)
    tool_chain, _ = script_chain(TOOL_THINKING, TOOL_ANSWER, tool_call=TOOL_CALL)
    # Without <|im_end|> the chain runs into token 0 ("!"), which leads to itself: "Sure!!!!!..." until max_tokens.
    endless_chain = script_chain("Hmm", "Sure")[0][:-1]
    scripted = load_chain(tmp, "scripted", chain)
    tool = load_chain(tmp, "tool", tool_chain)
    endless = load_chain(tmp, "endless", endless_chain, n_ctx=32768)
    with contextlib.ExitStack() as stack:
        urls = {
            "main": stack.enter_context(running(create_app(scripted, api_key=KEY, model_id="qwen-test"))),
            "none": stack.enter_context(running(create_app(scripted, reasoning_format="none"))),
            "tool": stack.enter_context(running(create_app(tool))),
            "endless": stack.enter_context(running(create_app(endless, max_queue=1))),
        }
        yield {"urls": urls, "scripted": scripted, "chain": chain, "tool_chain": tool_chain}
    for model in (scripted, tool, endless):
        model.close()


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def stream_parts(stream) -> dict:
    """Join a streamed chat completion's deltas the way a client would."""
    parts: dict = {"reasoning_content": "", "reasoning": "", "content": "", "tool_calls": [], "finish": None,
                   "usage": None, "roles": []}
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            parts["usage"] = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            parts["roles"] += [delta.role] if delta.role else []
            for name in ("reasoning_content", "reasoning", "content"):
                parts[name] += getattr(delta, name, None) or ""
            parts["tool_calls"] += delta.tool_calls or []
            parts["finish"] = choice.finish_reason or parts["finish"]
    return parts


def expected_usage(servers: dict, chain: list[int], messages: list, tools: list | None = None) -> tuple[int, int, int]:
    """(prompt, completion, reasoning) tokens: the chain's first token ends the prompt, its last is <|im_end|>."""
    prompt = len(servers["scripted"].tokenize_chat(messages, tools))
    return prompt, len(chain) - 2, chain.index(THINK_CLOSE_ID)


def test_chat_completion_splits_thinking_and_answer(servers: dict) -> None:
    reply = client(servers["urls"]["main"]).chat.completions.create(model="anything", messages=HI, **GREEDY)
    message = reply.choices[0].message
    assert (message.reasoning_content, message.reasoning, message.content) == (THINKING, THINKING, ANSWER)
    assert message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    assert reply.model == "qwen-test" and reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    prompt, completion, reasoning = expected_usage(servers, servers["chain"], HI)
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt, completion,
                                                                                 prompt + completion)
    assert usage.completion_tokens_details.reasoning_tokens == reasoning


def test_streamed_deltas_join_to_the_same_reply(servers: dict) -> None:
    stream = client(servers["urls"]["main"]).chat.completions.create(
        model="qwen-test", messages=HI, stream=True, stream_options={"include_usage": True}, **GREEDY)
    parts = stream_parts(stream)
    assert (parts["reasoning_content"], parts["reasoning"], parts["content"]) == (THINKING, THINKING, ANSWER)
    assert parts["roles"] == ["assistant"] and parts["finish"] == "stop" and parts["tool_calls"] == []
    prompt, completion, reasoning = expected_usage(servers, servers["chain"], HI)
    usage = parts["usage"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, completion)
    assert usage.completion_tokens_details.reasoning_tokens == reasoning


def test_stop_sequences_cut_the_answer_only(servers: dict) -> None:
    api = client(servers["urls"]["main"])
    reply = api.chat.completions.create(model="m", messages=HI, stop=["user", "What"], **GREEDY)
    message = reply.choices[0].message
    assert (message.reasoning_content, message.content) == (THINKING, "Hello there! ")
    assert reply.choices[0].finish_reason == "stop"
    parts = stream_parts(api.chat.completions.create(model="m", messages=HI, stop="re! W", stream=True, **GREEDY))
    assert (parts["reasoning_content"], parts["content"], parts["finish"]) == (THINKING, "Hello the", "stop")


def test_thinking_budget(servers: dict) -> None:
    api = client(servers["urls"]["main"])
    wrap_up = THINKING_BUDGET_WRAP_UP.strip()
    reply = api.chat.completions.create(model="m", messages=HI, extra_body={"thinking_budget": 3}, **GREEDY)
    first_three = servers["scripted"].detokenize(servers["chain"][1:4])
    assert reply.choices[0].message.reasoning_content == f"{first_three}\n\n{wrap_up}"
    assert reply.choices[0].message.content == ANSWER
    reply = api.chat.completions.create(model="m", messages=HI, reasoning_effort="none", **GREEDY)  # budget 0
    assert (reply.choices[0].message.reasoning_content, reply.choices[0].message.content) == (wrap_up, ANSWER)


def test_tool_calls_are_parsed(servers: dict) -> None:
    api = client(servers["urls"]["tool"])
    question = [{"role": "user", "content": "Weather in Paris?"}]
    reply = api.chat.completions.create(model="m", messages=question, tools=[WEATHER_TOOL], **GREEDY)
    choice = reply.choices[0]
    assert (choice.message.reasoning_content, choice.message.content) == (TOOL_THINKING, TOOL_ANSWER)
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and len(call.id) > 10 and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert choice.finish_reason == "tool_calls"
    prompt, completion, _ = expected_usage(servers, servers["tool_chain"], question, [WEATHER_TOOL])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, completion)

    parts = stream_parts(api.chat.completions.create(model="m", messages=question, tools=[WEATHER_TOOL],
                                                     tool_choice="auto", stream=True, **GREEDY))
    assert (parts["reasoning_content"], parts["content"], parts["finish"]) == (TOOL_THINKING, TOOL_ANSWER,
                                                                               "tool_calls")
    [delta] = parts["tool_calls"]
    assert delta.index == 0 and delta.id.startswith("call_") and delta.type == "function"
    assert (delta.function.name, json.loads(delta.function.arguments)) == ("get_weather", {"city": "Paris"})

    # The call's result goes back as a tool message after the assistant turn that made it.
    follow_up = [*question, {"role": "assistant", "content": TOOL_ANSWER, "reasoning_content": TOOL_THINKING,
                             "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    again = api.chat.completions.create(model="m", messages=follow_up, tools=[WEATHER_TOOL], **GREEDY)
    assert again.usage.prompt_tokens == len(servers["scripted"].tokenize_chat(follow_up, [WEATHER_TOOL]))


def test_without_tools_a_tool_call_stays_text(servers: dict) -> None:
    # No tools: the client parses the text itself, as Qwen-Agent does.
    reply = client(servers["urls"]["tool"]).chat.completions.create(model="m", messages=HI, **GREEDY)
    choice = reply.choices[0]
    assert choice.message.content == f"{TOOL_ANSWER}\n<tool_call>\n{TOOL_CALL}\n</tool_call>"
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    # tool_choice "none": the model cannot open a call (off its script, this one then says "!" to the limit).
    none = client(servers["urls"]["tool"]).chat.completions.create(
        model="m", messages=HI, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=40, **GREEDY).choices[0]
    assert none.message.content.startswith(TOOL_ANSWER + "!") and "<tool_call>" not in none.message.content
    assert none.message.tool_calls is None and none.finish_reason == "length"


def test_reasoning_format_none_keeps_thinking_in_content(servers: dict) -> None:
    api = client(servers["urls"]["none"], key="unused")
    expected = f"<think>\n{THINKING}\n</think>\n\n{ANSWER}"
    message = api.chat.completions.create(model="m", messages=HI, **GREEDY).choices[0].message
    assert message.content == expected
    assert getattr(message, "reasoning_content", None) is None
    parts = stream_parts(api.chat.completions.create(model="m", messages=HI, stream=True, **GREEDY))
    assert (parts["content"], parts["reasoning_content"]) == (expected, "")


def test_raw_completion(servers: dict) -> None:
    api = client(servers["urls"]["main"])
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    reply = api.completions.create(model="m", prompt=prompt, **GREEDY)
    assert reply.choices[0].text == f"{THINKING}</think>\n\n{ANSWER}" and reply.choices[0].finish_reason == "stop"
    # The caller's special tokens count as special tokens: the prompt is the chat template's exactly.
    assert reply.usage.prompt_tokens == len(servers["scripted"].tokenize_chat(HI))
    stream = api.completions.create(model="m", prompt=prompt, max_tokens=4, stream=True, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == servers["scripted"].detokenize(servers["chain"][1:5])
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_and_health(servers: dict) -> None:
    url = servers["urls"]["main"]
    [model] = client(url).models.list().data
    assert model.id == "qwen-test" and model.owned_by == "localqwen"
    health = httpx.get(f"{url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["generating"] is False


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_errors_have_openai_shape(servers: dict) -> None:
    url = servers["urls"]["main"]
    chat = f"{url}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    raw = {**auth, "Content-Type": "application/json"}  # a raw body must still say it is JSON (localqwen.web.guard)
    assert "not valid JSON" in error(httpx.post(chat, content=b'{"messages": [', headers=raw), 400)["message"]
    assert error(httpx.post(chat, json={"messages": "Hi"}, headers=auth), 400)["param"] == "messages"
    assert error(httpx.post(chat, json={"messages": HI, "temperature": "hot"}, headers=auth), 400)["param"] == \
        "temperature"
    assert error(httpx.post(chat, json={"messages": HI, "n": 2}, headers=auth), 400)["param"] == "n"
    assert "top_p" in error(httpx.post(chat, json={"messages": HI, "top_p": 1.5}, headers=auth), 400)["message"]

    long = [{"role": "user", "content": "word " * 600}]
    over = len(servers["scripted"].tokenize_chat(long)) - 512 + 1
    body = error(httpx.post(chat, json={"messages": long}, headers=auth), 400)
    assert f"{over} more than the context of 512" in body["message"] and body["code"] == "context_length_exceeded"
    assert error(httpx.post(chat, json={"messages": long, "stream": True}, headers=auth), 400)["code"] == \
        "context_length_exceeded"  # a stream fails before its headers go out

    assert error(httpx.post(chat, json={"messages": HI}), 401)["code"] == "invalid_api_key"
    assert error(httpx.post(chat, json={"messages": HI}, headers={"Authorization": "Bearer nope"}), 401)
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()

    huge = b'{"messages": [{"role": "user", "content": "' + b"x" * (5 << 20) + b'"}]}'
    assert error(httpx.post(chat, content=huge, headers=raw), 413)["code"] == "request_too_large"
    assert error(httpx.get(f"{url}/v1/nothing", headers=auth), 404)


def wait_idle(url: str, timeout: float = 10) -> float:
    """Seconds until the server runs no generation."""
    started = time.monotonic()
    while httpx.get(f"{url}/health").json()["generating"]:
        assert time.monotonic() - started < timeout, "the generation kept running"
        time.sleep(0.05)
    return time.monotonic() - started


def test_disconnects_stop_generation(servers: dict) -> None:
    url = servers["urls"]["endless"]
    api = client(url)
    endless = {"model": "m", "messages": HI, "max_tokens": 30000, **GREEDY}  # minutes of "!!!!" if not stopped
    stream = api.chat.completions.create(stream=True, **endless)
    for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    stream.close()
    wait_idle(url)
    reply = api.chat.completions.create(model="m", messages=HI, max_tokens=8, **GREEDY)
    assert reply.choices[0].message.content.startswith("Sure!") and reply.choices[0].finish_reason == "length"

    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{url}/v1/chat/completions", json=endless, timeout=1.0)
    wait_idle(url)


def test_concurrent_clients_take_turns(servers: dict) -> None:
    api = client(servers["urls"]["main"])
    replies: list = []

    def ask(stream: bool) -> None:
        if stream:
            parts = stream_parts(api.chat.completions.create(model="m", messages=HI, stream=True, **GREEDY))
            replies.append((parts["reasoning_content"], parts["content"]))
        else:
            message = api.chat.completions.create(model="m", messages=HI, **GREEDY).choices[0].message
            replies.append((message.reasoning_content, message.content))

    threads = [threading.Thread(target=ask, args=(i % 2 == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert replies == [(THINKING, ANSWER)] * 4


def test_full_queue_is_503(servers: dict) -> None:
    url = servers["urls"]["endless"]  # max_queue=1
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/chat/completions", json={
            "messages": HI, "max_tokens": 30000, "stream": True, **GREEDY}) as running_stream:
        lines = running_stream.iter_lines()  # held: a dropped iterator closes the response
        next(lines)  # the model is busy with this one
        with pytest.raises(httpx.ReadTimeout):  # a queued client that gives up leaves the queue
            httpx.post(f"{url}/v1/chat/completions", json={"messages": HI, "max_tokens": 8}, timeout=0.5)
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/health").json()["waiting"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        waiting: list = []
        queued = threading.Thread(target=lambda: waiting.append(httpx.post(
            f"{url}/v1/chat/completions", json={"messages": HI, "max_tokens": 8, **GREEDY}, timeout=30)))
        queued.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": HI, "max_tokens": 3})
        assert error(refused, 503)["code"] == "queue_full" and int(refused.headers["Retry-After"]) > 0
    queued.join(timeout=20)  # the stream was closed: the queued request runs
    [done] = waiting
    assert done.status_code == 200 and done.json()["choices"][0]["message"]["content"].startswith("Sure!")


def test_qwen_agent_client(servers: dict) -> None:
    # qwen-agent 0.0.34 also imports soundfile and python-dateutil without declaring them.
    pytest.importorskip("qwen_agent", reason="needs qwen-agent (+ soundfile, python-dateutil)")
    from qwen_agent.llm import get_chat_model

    def llm(url: str, **cfg):
        return get_chat_model({"model": "qwen-test", "model_server": f"{url}/v1", "api_key": KEY,
                               "generate_cfg": {**GREEDY, **cfg}})

    [reply] = llm(servers["urls"]["main"]).chat(messages=HI, stream=False)
    assert (reply["reasoning_content"], reply["content"]) == (THINKING, ANSWER)
    # Qwen-Agent puts the tools in the prompt itself and finds the <tool_call> in the content (no `tools` sent).
    question = [{"role": "user", "content": "Weather in Paris?"}]
    for stream in (False, True):
        replies = llm(servers["urls"]["tool"]).chat(messages=question, functions=[WEATHER_TOOL["function"]],
                                                    stream=stream)
        thought, answer, call = list(replies)[-1] if stream else replies
        assert (thought["reasoning_content"], answer["content"].strip()) == (TOOL_THINKING, TOOL_ANSWER)
        assert call["function_call"]["name"] == "get_weather"
        assert json.loads(call["function_call"]["arguments"]) == {"city": "Paris"}
    # thought_in_content: the server leaves the thinking in the content (reasoning_format="none").
    [reply] = llm(servers["urls"]["none"], thought_in_content=True).chat(
        messages=HI, functions=[WEATHER_TOOL["function"]], stream=False)
    assert reply["content"] == f"<think>\n{THINKING}\n</think>\n\n{ANSWER}"
