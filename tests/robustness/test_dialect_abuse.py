"""The new dialects' routes under abuse: hostile bodies get that dialect's error shape and status, a full queue is a 503
in that shape, clients that hang up stop their generation, and a seeded fuzz of each dialect's structures never gets
a 5xx. Everything runs against known-output chain models on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from localqwen.server import anthropic as anthropic_dialect
from localqwen.server import create_app
from localqwen.server import http as server_http
from localqwen.synthetic import script_chain
from tests.robustness.test_server_abuse import chunks, nested, raw, raw_http, run_threads
from tests.test_server import load_chain, running

THINKING = "The user says hi, so a short greeting fits."
ANSWER = "Hello! How can we help today?"
KEY = "sk-dialect-abuse"
HI = [{"role": "user", "content": "Hi"}]
MAX_BODY = 4 << 20
JSON = {"Content-Type": "application/json"}  # a POST without it is refused (415) before routing
ENDLESS_TOKENS = 30000
MESSAGES, COUNT, RESPONSES = "/v1/messages", "/v1/messages/count_tokens", "/v1/responses"
CHAT, GENERATE, SHOW = "/api/chat", "/api/generate", "/api/show"
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   405: "invalid_request_error", 413: "request_too_large", 503: "overloaded_error"}
# A small, valid request per route: what each hostile case spoils, and what a healthy server answers.
VALID = {MESSAGES: {"model": "m", "max_tokens": 64, "messages": HI}, COUNT: {"model": "m", "messages": HI},
         RESPONSES: {"model": "m", "input": "Hi"}, CHAT: {"model": "m", "messages": HI, "stream": False},
         GENERATE: {"model": "m", "prompt": "Hi", "stream": False}, SHOW: {"model": "m"}}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("dialect-abuse")
    scripted = load_chain(tmp, "scripted", script_chain(THINKING, ANSWER)[0])
    # Without <|im_end|> the chain runs into token 0 ("!"), which leads to itself: "Sure!!!!!..." until max_tokens.
    endless = load_chain(tmp, "endless", script_chain("Hmm", "Sure")[0][:-1], n_ctx=32768)
    with contextlib.ExitStack() as stack:
        yield SimpleNamespace(
            scripted=scripted, endless=endless,
            open=stack.enter_context(running(create_app(scripted, model_id="qwen-abuse"))),
            keyed=stack.enter_context(running(create_app(scripted, api_key=KEY))),
            busy=stack.enter_context(running(create_app(endless, max_queue=1))),
            http=stack.enter_context(httpx.Client(timeout=60)),
        )
    scripted.close()
    endless.close()


# --- helpers -----------------------------------------------------------------------------------------------------

def dialect_error(path: str, response: httpx.Response, status: int) -> str:
    """The response is `status` in the error shape of the dialect that owns `path`; its message."""
    assert response.status_code == status, response.text[:500]
    body = response.json()
    if path.startswith("/v1/messages"):
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == ANTHROPIC_TYPES[status], body
        message = body["error"]["message"]
    elif path.startswith("/api/"):
        assert set(body) == {"error"}, body
        message = body["error"]
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["type"] != "server_error", body
        message = body["error"]["message"]
    assert isinstance(message, str) and message and "internal error" not in message, body
    return message


def assert_answers(env: SimpleNamespace) -> None:
    """Every new route still answers a normal request: the server survived what came before."""
    for path, body in VALID.items():
        reply = env.http.post(f"{env.open}{path}", json={**body, "temperature": 0.0}, timeout=10)
        assert reply.status_code == 200, (path, reply.text[:500])
    assert env.http.post(f"{env.open}{CHAT}", json={**VALID[CHAT], "options": {"temperature": 0}},
                         ).json()["message"]["content"] == ANSWER


def health(env: SimpleNamespace, url: str) -> dict:
    return env.http.get(f"{url}/health", timeout=5).json()


def wait_idle(env: SimpleNamespace, url: str, timeout: float = 5.0) -> float:
    """Seconds until the server runs and queues nothing and the model's lock is free (no leaked generation)."""
    started = time.monotonic()
    while True:
        state = health(env, url)
        if not state["generating"] and state["waiting"] == 0 and env.endless.running == env.endless.waiting == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"still busy after {timeout} s: {state}"
        time.sleep(0.02)


def spoiled(path: str, **fields: Any) -> dict:
    return {"json": {**VALID[path], **fields}}


def without(path: str, field: str) -> dict:
    return {"json": {k: v for k, v in VALID[path].items() if k != field}}


def anthropic_message(*blocks: Any) -> dict:
    return spoiled(MESSAGES, messages=[{"role": "user", "content": list(blocks)}])


# --- hostile request bodies ----------------------------------------------------------------------------------------

PER_ROUTE = [
    ("oversized", lambda p: raw(b'{"x": "' + b"x" * (MAX_BODY + 1) + b'"}'), 413),
    ("oversized-chunked", lambda p: {"content": "chunked"}, 413),
    ("deep-lists", lambda p: raw(b"[" * 100_000 + b"]" * 100_000), 400),
    ("deep-in-an-ignored-field", lambda p: raw(json.dumps(VALID[p]).encode()[:-1] + b', "x": '
                                               + json.dumps(nested(server_http.MAX_JSON_DEPTH + 5)).encode() + b"}"),
     400),
    ("invalid-utf8", lambda p: raw(b'{"model": "\xff\xfe"}'), 400),
    ("lone-surrogate", lambda p: raw(json.dumps(VALID[p]).encode()[:-1] + b', "model": "a\\ud800b"}'), 400),
    ("empty-body", lambda p: raw(b""), 400),
    ("truncated-json", lambda p: raw(json.dumps(VALID[p]).encode()[:-3]), 400),
    ("body-is-a-list", lambda p: {"json": [VALID[p]]}, 400),
    ("body-is-a-string", lambda p: {"json": "Hi"}, 400),
    ("body-is-null", lambda p: raw(b"null"), 400),
    ("model-a-number", lambda p: spoiled(p, model=5), 400),
]
GENERATING = (MESSAGES, RESPONSES, CHAT, GENERATE)
SAMPLING = [  # (id, field, value) for the routes that generate; Ollama takes them inside `options`
    ("temperature-negative", "temperature", -0.1), ("temperature-huge", "temperature", 1e308),
    ("temperature-string", "temperature", "hot"), ("top-p-zero", "top_p", 0), ("top-k-negative", "top_k", -1),
    ("seed-negative", "seed", -1), ("seed-too-big", "seed", 2**64), ("max-tokens-zero", "max_tokens", 0),
    ("max-tokens-fraction", "max_tokens", 1.5), ("max-tokens-bool", "max_tokens", True),
    ("thinking-budget-negative", "thinking_budget", -1),
]
SPECIFIC = [  # (id, path, httpx keywords, status)
    ("messages-missing-max-tokens", MESSAGES, without(MESSAGES, "max_tokens"), 400),
    ("messages-max-tokens-huge-negative", MESSAGES, spoiled(MESSAGES, max_tokens=-(10**30)), 400),
    ("messages-empty", MESSAGES, spoiled(MESSAGES, messages=[]), 400),
    ("messages-a-string", MESSAGES, spoiled(MESSAGES, messages="Hi"), 400),
    ("messages-role-system", MESSAGES, spoiled(MESSAGES, messages=[{"role": "system", "content": "Hi"}]), 400),
    ("messages-block-unknown", MESSAGES, anthropic_message({"type": "video", "url": "x"}), 400),
    ("messages-block-image", MESSAGES, anthropic_message({"type": "image", "source": {
        "type": "url", "url": "http://127.0.0.1/x.png"}}), 400),
    ("messages-block-without-type", MESSAGES, anthropic_message({"text": "Hi"}), 400),
    ("messages-tool-use-input-a-string", MESSAGES, spoiled(MESSAGES, messages=[*HI, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "{}"}]}]), 400),
    ("messages-tool-result-image", MESSAGES, anthropic_message({"type": "tool_result", "tool_use_id": "t",
                                                                "content": [{"type": "image"}]}), 400),
    ("messages-thinking-type-unknown", MESSAGES, spoiled(MESSAGES, thinking={"type": "maximal"}), 400),
    ("messages-thinking-without-budget", MESSAGES, spoiled(MESSAGES, thinking={"type": "enabled"}), 400),
    ("messages-thinking-budget-negative", MESSAGES, spoiled(MESSAGES, thinking={"type": "enabled",
                                                                                "budget_tokens": -5}), 400),
    ("messages-tool-choice-unknown-tool", MESSAGES, spoiled(MESSAGES, tools=[{"name": "f"}], tool_choice={
        "type": "tool", "name": "g"}), 400),
    ("messages-tools-not-a-list", MESSAGES, spoiled(MESSAGES, tools={"name": "f"}), 400),
    ("messages-stop-sequences-a-string", MESSAGES, spoiled(MESSAGES, stop_sequences="x"), 400),
    ("messages-system-a-number", MESSAGES, spoiled(MESSAGES, system=5), 400),
    ("messages-beyond-context", MESSAGES, spoiled(MESSAGES, messages=[{"role": "user", "content": "word " * 600}]),
     400),
    ("messages-beyond-context-streamed", MESSAGES, spoiled(MESSAGES, stream=True, messages=[
        {"role": "user", "content": "word " * 600}]), 400),
    ("messages-structured-output", MESSAGES, spoiled(MESSAGES, output_config={"format": {"type": "json_schema"}}),
     400),
    ("count-tokens-no-messages", COUNT, spoiled(COUNT, messages=[]), 400),
    ("responses-input-missing", RESPONSES, without(RESPONSES, "input"), 400),
    ("responses-input-a-number", RESPONSES, spoiled(RESPONSES, input=5), 400),
    ("responses-item-unknown", RESPONSES, spoiled(RESPONSES, input=[{"type": "computer_call", "id": "x"}]), 400),
    ("responses-item-not-an-object", RESPONSES, spoiled(RESPONSES, input=["Hi"]), 400),
    ("responses-item-reference", RESPONSES, spoiled(RESPONSES, input=[{"type": "item_reference", "id": "x"}]), 400),
    ("responses-part-image", RESPONSES, spoiled(RESPONSES, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://127.0.0.1/x.png"}]}]), 400),
    ("responses-function-call-arguments-an-object", RESPONSES, spoiled(RESPONSES, input=[
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]), 400),
    ("responses-previous-response", RESPONSES, spoiled(RESPONSES, previous_response_id="resp_1"), 400),
    ("responses-conversation", RESPONSES, spoiled(RESPONSES, conversation="conv_1"), 400),
    ("responses-effort-unknown", RESPONSES, spoiled(RESPONSES, reasoning={"effort": "extreme"}), 400),
    ("responses-json-schema", RESPONSES, spoiled(RESPONSES, text={"format": {"type": "json_schema"}}), 400),
    ("responses-function-tool-without-name", RESPONSES, spoiled(RESPONSES, tools=[{"type": "function"}]), 400),
    ("responses-tool-choice-unknown-tool", RESPONSES, spoiled(RESPONSES, tool_choice={"type": "function",
                                                                                      "name": "g"}), 400),
    ("responses-max-output-tokens-zero", RESPONSES, spoiled(RESPONSES, max_output_tokens=0), 400),
    ("responses-beyond-context-streamed", RESPONSES, spoiled(RESPONSES, input="word " * 600, stream=True), 400),
    ("chat-model-missing", CHAT, without(CHAT, "model"), 400),
    ("chat-role-unknown", CHAT, spoiled(CHAT, messages=[{"role": "root", "content": "Hi"}]), 400),
    ("chat-content-a-list", CHAT, spoiled(CHAT, messages=[{"role": "user", "content": [{"text": "Hi"}]}]), 400),
    ("chat-images", CHAT, spoiled(CHAT, messages=[{"role": "user", "content": "Hi", "images": ["AAAA"]}]), 400),
    ("chat-tool-arguments-a-string", CHAT, spoiled(CHAT, messages=[*HI, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}]), 400),
    ("chat-think-unknown", CHAT, spoiled(CHAT, think="max"), 400),
    ("chat-think-a-number", CHAT, spoiled(CHAT, think=2), 400),
    ("chat-format-unknown", CHAT, spoiled(CHAT, format="yaml"), 400),
    ("chat-format-schema-unenforceable", CHAT, spoiled(CHAT, format={"type": "object", "minProperties": 1}), 400),
    ("chat-options-not-an-object", CHAT, spoiled(CHAT, options=[1]), 400),
    ("chat-num-ctx-beyond-the-loaded-one", CHAT, spoiled(CHAT, options={"num_ctx": 1 << 20}), 400),
    ("chat-num-predict-zero", CHAT, spoiled(CHAT, options={"num_predict": 0}), 400),
    ("chat-num-predict-negative", CHAT, spoiled(CHAT, options={"num_predict": -3}), 400),
    ("chat-stop-a-number", CHAT, spoiled(CHAT, options={"stop": 5}), 400),
    ("chat-beyond-context-streamed", CHAT, spoiled(CHAT, stream=True, messages=[
        {"role": "user", "content": "word " * 600}]), 400),
    ("generate-suffix", GENERATE, spoiled(GENERATE, suffix="x"), 400),
    ("generate-template", GENERATE, spoiled(GENERATE, template="{{ .Prompt }}"), 400),
    ("generate-context", GENERATE, spoiled(GENERATE, context=[1, 2, 3]), 400),
    ("generate-images", GENERATE, spoiled(GENERATE, images=["AAAA"]), 400),
    ("generate-prompt-a-number", GENERATE, spoiled(GENERATE, prompt=5), 400),
    ("generate-raw-beyond-context", GENERATE, spoiled(GENERATE, raw=True, prompt="word " * 600), 400),
    ("show-model-missing", SHOW, {"json": {}}, 400),
]


def hostile_cases() -> list[Any]:
    cases = [pytest.param(path, make(path), status, id=f"{path}-{name}")
             for name, make, status in PER_ROUTE for path in VALID]
    for name, field, value in SAMPLING:
        for path in GENERATING:
            kwargs = spoiled(path, options={field: value}) if path.startswith("/api/") else spoiled(path,
                                                                                                   **{field: value})
            cases.append(pytest.param(path, kwargs, 400, id=f"{path}-{name}"))
    return cases + [pytest.param(path, kwargs, status, id=name) for name, path, kwargs, status in SPECIFIC]


@pytest.mark.parametrize(("path", "kwargs", "status"), hostile_cases())
def test_hostile_request_gets_the_dialects_error(env: SimpleNamespace, path: str, kwargs: dict, status: int) -> None:
    if kwargs.get("content") == "chunked":  # no Content-Length: the server must count as it reads
        kwargs = {"content": chunks(MAX_BODY + (1 << 20)), "headers": {"Content-Type": "application/json"}}
    dialect_error(path, env.http.post(f"{env.open}{path}", timeout=30, **kwargs), status)
    assert env.http.post(f"{env.open}{path}", json=VALID[path]).status_code == 200


def test_every_route_still_answers(env: SimpleNamespace) -> None:
    assert_answers(env)


def test_foreign_thinking_signatures_are_ignored(env: SimpleNamespace) -> None:
    # Signatures this server did not make, whatever they hold, leave the thinking out of the prompt; never a 500.
    # (The assistant turn comes after the last user query, in a tool loop: where the template keeps reasoning.)
    def count(*thinking: dict) -> int:
        call = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
        result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}
        reply = env.http.post(f"{env.open}{COUNT}", json={"tools": [{"name": "f"}], "messages": [
            *HI, {"role": "assistant", "content": [*thinking, call]}, result]})
        assert reply.status_code == 200, reply.text[:300]
        return reply.json()["input_tokens"]

    plain = count()
    assert count({"type": "thinking", "thinking": "Plan.", "signature": anthropic_dialect.sign("Plan.")}) > plain
    for signature in ("", "🦙", "x" * 10_000, "\x00", "=" * 44, "ErUBCkYIBRgCIkA" * 8):
        assert count({"type": "thinking", "thinking": "Plan.", "signature": signature}) == plain


def test_declared_oversized_body_is_refused_before_it_is_sent(env: SimpleNamespace) -> None:
    for path in (MESSAGES, RESPONSES, CHAT):
        started = time.monotonic()
        reply = raw_http(int(env.open.rsplit(":", 1)[1]), f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         "Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n".encode(), timeout=5)
        assert reply.startswith(b"HTTP/1.1 413 ") and time.monotonic() - started < 3, reply[:300]
        assert (b'"request_too_large"' in reply) == (path != CHAT), reply[:300]


def test_api_key_in_every_dialect(env: SimpleNamespace) -> None:
    for path in (*VALID, "/api/tags", "/api/ps", "/api/version", "/metrics", "/v1/responses/resp_1"):
        method = "POST" if path in VALID else "GET"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"x-api-key": KEY[:-1]}):
            response = env.http.request(method, f"{env.keyed}{path}", json=VALID.get(path), headers=headers)
            dialect_error(path, response, 401)
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
            response = env.http.request(method, f"{env.keyed}{path}", json=VALID.get(path), headers=headers)
            assert response.status_code == (404 if path.startswith("/v1/responses/") else 200), response.text
    # The key is checked before the body is read: no work for a stranger's hostile body.
    dialect_error(MESSAGES, env.http.post(f"{env.keyed}{MESSAGES}", content=b"[" * 100_000,
                                          headers={"Content-Type": "application/json"}), 401)
    assert env.http.get(env.keyed).text == "Ollama is running"  # the probe needs no key and shows nothing


def test_unknown_paths_and_methods(env: SimpleNamespace) -> None:
    for path in ("/api/embed", "/api/create", "/api/delete", "/api/" + "a" * 4000, "/v1/messages/x/y"):
        dialect_error(path, env.http.post(f"{env.open}{path}", json={}), 404)
    for method, path in (("GET", MESSAGES), ("GET", RESPONSES), ("GET", CHAT), ("PUT", GENERATE),
                         ("POST", "/api/tags"), ("DELETE", "/api/show")):
        dialect_error(path, env.http.request(method, f"{env.open}{path}", headers=JSON), 405)
    assert env.http.post(env.open, headers=JSON).status_code == 405  # "/" is Ollama's probe, GET and HEAD only
    assert env.http.head(env.open).status_code == 200


# --- a full queue, hang-ups --------------------------------------------------------------------------------------

ENDLESS = {MESSAGES: {"model": "m", "max_tokens": ENDLESS_TOKENS, "messages": HI},
           RESPONSES: {"model": "m", "input": "Hi", "max_output_tokens": ENDLESS_TOKENS},
           CHAT: {"model": "m", "messages": HI, "options": {"num_predict": ENDLESS_TOKENS}},
           GENERATE: {"model": "m", "prompt": "Hi", "options": {"num_predict": ENDLESS_TOKENS}}}


def test_full_queue_is_a_503_in_each_dialects_shape(env: SimpleNamespace) -> None:
    url = env.busy  # max_queue=1
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}{CHAT}", json=ENDLESS[CHAT]) as holder:
        lines = holder.iter_lines()  # held: a dropped iterator closes the response
        next(lines)  # the model is busy with this one
        waiting: list[httpx.Response] = []
        queued = threading.Thread(target=lambda: waiting.append(httpx.post(
            f"{url}{MESSAGES}", json={**ENDLESS[MESSAGES], "max_tokens": 8, "temperature": 0.0}, timeout=30)))
        queued.start()
        deadline = time.monotonic() + 10
        while health(env, url)["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for path in GENERATING:
            refused = httpx.post(f"{url}{path}", json={**ENDLESS[path], "stream": False})
            dialect_error(path, refused, 503)
            assert int(refused.headers["Retry-After"]) > 0
    queued.join(timeout=20)  # the holder hung up: the queued request runs
    [done] = waiting
    assert done.status_code == 200 and done.json()["content"][-1]["text"].startswith("Sure!")
    wait_idle(env, url)


def test_hang_ups_stop_generation(env: SimpleNamespace) -> None:
    with running(create_app(env.endless, max_queue=32)) as url:
        wait_idle(env, url)

        def reader(path: str) -> Callable[[], None]:  # reads the first chunk of an endless stream, then hangs up
            def run() -> None:
                with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}{path}", json={
                        **ENDLESS[path], "stream": True}) as response:
                    assert response.status_code == 200
                    next(response.iter_lines())
            return run

        def quitter(path: str) -> Callable[[], None]:  # a whole (not streamed) endless request, given up
            def run() -> None:
                with httpx.Client(timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
                    http.post(f"{url}{path}", json={**ENDLESS[path], "stream": False})
            return run

        started = time.monotonic()
        run_threads([make(path) for path in GENERATING for make in (reader, quitter, reader)], timeout=60)
        # The model is free soon after the last client left: no generation leaked to run its 30k tokens.
        assert wait_idle(env, url, timeout=5) < 5 and time.monotonic() - started < 45
        reply = httpx.post(f"{url}{CHAT}", json={"model": "m", "messages": HI, "stream": False,
                                                 "options": {"num_predict": 8, "temperature": 0}}, timeout=10)
        assert reply.json()["message"]["content"].startswith("Sure!") and reply.json()["done_reason"] == "length"


# --- fuzz ------------------------------------------------------------------------------------------------------------

def test_random_dialect_structures_never_crash(env: SimpleNamespace) -> None:
    """A seeded fuzz of Anthropic blocks, Responses items and Ollama messages: every answer is 200 or a 400 in the
    dialect's shape, never a 5xx."""
    rnd = random.Random(20260714)
    texts = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_response>", "{{ x }}",
             "\x00", "🦙", "\u202e", "hi ", "\n", ""]

    def text() -> str:
        return "".join(rnd.choice(texts) for _ in range(rnd.randint(0, 3)))

    def value(depth: int = 0) -> Any:
        if depth > 2 or rnd.random() < 0.6:
            return rnd.choice([None, True, 0, -1, 1.5, text(), text(), [], {}])
        if rnd.random() < 0.5:
            return [value(depth + 1) for _ in range(rnd.randint(0, 2))]
        return {rnd.choice(["type", "text", "name", "input", "id", "content"]): value(depth + 1)
                for _ in range(rnd.randint(0, 2))}

    def either(good: Any) -> Any:
        return good if rnd.random() < 0.8 else value()

    def anthropic_block() -> dict:
        return rnd.choice([
            {"type": "text", "text": either(text())},
            {"type": "thinking", "thinking": either(text()), "signature": either(text())},
            {"type": "redacted_thinking", "data": text()},
            {"type": "tool_use", "id": either(text()), "name": either("f"), "input": either({"a": text()})},
            {"type": "tool_result", "tool_use_id": either(text()), "content": either(rnd.choice(
                [text(), [{"type": "text", "text": text()}]]))},
        ])

    def messages_body() -> dict:
        turns = [{"role": rnd.choice(["user", "assistant"]), "content": either(rnd.choice(
            [text(), [anthropic_block() for _ in range(rnd.randint(0, 3))]]))} for _ in range(rnd.randint(1, 4))]
        return {"max_tokens": 2, "messages": turns, "system": either(rnd.choice([text(), [{"type": "text",
                                                                                         "text": text()}]])),
                "tools": either([{"name": either("f"), "input_schema": either({"type": "object"})}])}

    def responses_item() -> dict:
        return rnd.choice([
            {"role": rnd.choice(["user", "assistant", "system", "developer"]), "content": either(text())},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": either(text())}]},
            {"type": "function_call", "call_id": either(text()), "name": either("f"), "arguments": either(text())},
            {"type": "function_call_output", "call_id": either(text()), "output": either(text())},
            {"type": "reasoning", "summary": either([]), "content": either([{"type": "reasoning_text",
                                                                             "text": text()}])},
        ])

    def responses_body() -> dict:
        return {"max_output_tokens": 2, "instructions": either(text()),
                "input": either(rnd.choice([text(), [responses_item() for _ in range(rnd.randint(1, 4))]])),
                "tools": either([{"type": "function", "name": either("f"), "parameters": either({})}])}

    def chat_body() -> dict:
        turns = [{"role": either(rnd.choice(["system", "user", "assistant", "tool"])), "content": either(text()),
                  **({"thinking": either(text())} if rnd.random() < 0.3 else {}),
                  **({"tool_calls": [{"function": {"name": either("f"), "arguments": either({"a": text()})}}]}
                     if rnd.random() < 0.3 else {})} for _ in range(rnd.randint(0, 4))]
        return {"model": either("m"), "messages": turns, "stream": False, "think": either(rnd.choice([True, False,
                                                                                                       "low"])),
                "options": {"num_predict": 2}}

    seen: dict[int, int] = {}
    deadline = time.monotonic() + 30
    for i in range(240):
        assert time.monotonic() < deadline, f"the fuzz took too long ({seen})"
        path, body = [(MESSAGES, messages_body), (RESPONSES, responses_body), (CHAT, chat_body)][i % 3]
        response = env.http.post(f"{env.open}{path}", json=body())
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400), (response.status_code, response.text[:300])
        if response.status_code == 400:
            dialect_error(path, response, 400)
    assert seen.get(200, 0) > 40 and seen.get(400, 0) > 40, seen  # the fuzz reaches both sides
    assert_answers(env)
