"""Structured answers, strict tool choices and "answer now" through the OpenAI-compatible server: real uvicorn, the
real `openai` client, a random tiny model (the grammar does all the work: tests/structured.py) and chain models whose
replies are known."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from localqwen.constants import THINKING_BUDGET_WRAP_UP
from localqwen.model import Model
from localqwen.remote import RemoteModel
from localqwen.server import create_app
from localqwen.synthetic import script_chain
from tests.structured import (
    MAX_TOKENS,
    PERSON,
    PONDER_ANSWER,
    SCHEMAS,
    THINK_BRIEFLY,
    TOOLS,
    Person,
    check_answer,
    check_call,
    mostly_complete,
    pondering_model_file,
    random_model_file,
)
from tests.test_server import (
    GREEDY,
    HI,
    KEY,
    TOOL_ANSWER,
    TOOL_CALL,
    TOOL_THINKING,
    client,
    error,
    load_chain,
    running,
    stream_parts,
)

SEEDS = range(8)
BRIEF = {"max_tokens": MAX_TOKENS, "extra_body": {"thinking_budget": THINK_BRIEFLY}}
# A call the model gets wrong: a misspelt tool, an unknown argument (the grammar of tool_choice "auto" mends it).
BAD_CALL = '{"name":"get_wether","arguments":{"town": "Paris"}}'
CITY_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("structured")
    rand = Model.load(random_model_file(tmp / "random"), n_ctx=2048, gpu_layers=0, threads=1)
    ponder = Model.load(pondering_model_file(tmp / "ponder"), n_ctx=4096, gpu_layers=0, threads=1, loop_guard=False)
    tool = load_chain(tmp, "tool", script_chain(TOOL_THINKING, TOOL_ANSWER, tool_call=BAD_CALL)[0])
    calls = load_chain(tmp, "calls", script_chain(TOOL_THINKING, "", tool_call=TOOL_CALL)[0])  # thinks, then calls
    with contextlib.ExitStack() as stack:
        urls = {
            "random": stack.enter_context(running(create_app(rand, api_key=KEY))),
            "ponder": stack.enter_context(running(create_app(ponder, api_key=KEY))),
            "tool": stack.enter_context(running(create_app(tool))),
            "calls": stack.enter_context(running(create_app(calls))),
        }
        upstream = RemoteModel.connect(urls["random"], api_key=KEY)
        stack.callback(upstream.close)
        urls["upstream"] = stack.enter_context(running(create_app(upstream)))
        ponder_upstream = RemoteModel.connect(urls["ponder"], api_key=KEY)
        stack.callback(ponder_upstream.close)
        urls["ponder-upstream"] = stack.enter_context(running(create_app(ponder_upstream, api_key=KEY)))
        yield {"urls": urls, "random": rand, "remote": upstream}
    for model in (rand, ponder, tool, calls):
        model.close()


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


# --- response_format -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEMAS)
def test_answers_match_the_schema_over_many_seeds(servers: dict, name: str) -> None:
    api, schema = client(servers["urls"]["random"]), SCHEMAS[name]
    completed = []
    for seed in SEEDS:
        stream = seed % 2 == 1
        request = {"model": "m", "messages": HI, "response_format": json_schema_format(schema), "seed": seed, **BRIEF}
        if stream:
            parts = stream_parts(api.chat.completions.create(stream=True, **request))
            content, finish, thinking = parts["content"], parts["finish"], parts["reasoning_content"]
        else:
            choice = api.chat.completions.create(**request).choices[0]
            content, finish, thinking = choice.message.content, choice.finish_reason, choice.message.reasoning_content
        assert thinking.endswith(THINKING_BUDGET_WRAP_UP.strip())  # the thinking ran free, then was wrapped up
        completed.append(check_answer(content, finish, schema))
    mostly_complete(completed)


def test_the_sdk_parses_a_pydantic_answer(servers: dict) -> None:
    api = client(servers["urls"]["random"])
    parsed = []
    for seed in range(4):
        try:
            reply = api.chat.completions.parse(model="m", messages=HI, response_format=Person, seed=seed, **BRIEF)
        except openai.LengthFinishReasonError:  # the SDK refuses an answer cut short: never broken JSON as complete
            continue
        person = reply.choices[0].message.parsed
        assert isinstance(person, Person) and reply.choices[0].finish_reason == "stop"
        jsonschema.validate(person.model_dump(), PERSON)
        parsed.append(person)
    assert len(parsed) >= 3


def test_json_object_and_raw_completions(servers: dict) -> None:
    api = client(servers["urls"]["random"])
    completed = []
    for seed in range(4):
        choice = api.chat.completions.create(model="m", messages=HI, response_format={"type": "json_object"},
                                             seed=seed, **BRIEF).choices[0]
        completed.append(check_answer(choice.message.content, choice.finish_reason, {"type": "object"}))
    # /v1/completions: a raw prompt has no thinking apart, so the grammar holds from the first token.
    for seed in range(4):
        choice = api.completions.create(model="m", prompt="Colours:", max_tokens=MAX_TOKENS, seed=seed,
                                        extra_body={"response_format": json_schema_format(SCHEMAS["colours"])}
                                        ).choices[0]
        completed.append(check_answer(choice.text, choice.finish_reason, SCHEMAS["colours"]))
    mostly_complete(completed)


def test_cut_short_says_length(servers: dict) -> None:
    api = client(servers["urls"]["random"])
    choice = api.chat.completions.create(model="m", messages=HI, response_format=json_schema_format(PERSON), seed=0,
                                         max_tokens=40, extra_body={"thinking_budget": THINK_BRIEFLY}).choices[0]
    assert choice.finish_reason == "length"
    with pytest.raises(ValueError):
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    with pytest.raises(openai.LengthFinishReasonError):
        api.chat.completions.parse(model="m", messages=HI, response_format=Person, seed=0, max_tokens=40,
                                   extra_body={"thinking_budget": THINK_BRIEFLY})


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"response_format": json_schema_format({"type": "object", "properties": {"n": {"minimum": 3}}})}, 400,
     "response_format", "response_format.json_schema.schema.properties.n.minimum is not supported"),
    ({"response_format": json_schema_format({"type": "object", "format": "email"})}, 400, "response_format",
     "response_format.json_schema.schema.format 'email' is not supported"),
    ({"response_format": {"type": "json_schema"}}, 400, "response_format",
     "response_format.json_schema.schema: required"),
    ({"response_format": {"type": "xml"}}, 400, "response_format.type", "Input should be"),
    ({"tool_choice": "required"}, 400, "tool_choice", "tool_choice 'required' needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice",
     "tool_choice names 'nope'"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, 400, None,
     "a schema for the answer and a required tool call exclude each other"),
])
def test_refusals_name_the_part(servers: dict, body: dict, status: int, param: str | None, words: str) -> None:
    response = httpx.post(f"{servers['urls']['random']}/v1/chat/completions", json={"messages": HI, **body},
                          headers={"Authorization": f"Bearer {KEY}"})
    problem = error(response, status)
    assert words in problem["message"] and problem["param"] == param
    assert "\n" not in problem["message"]


# --- tool_choice -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", ["required", "add_event"])
def test_strict_tool_choices_over_many_seeds(servers: dict, choice: str) -> None:
    api = client(servers["urls"]["random"])
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    allowed = {t["function"]["name"] for t in TOOLS} if choice == "required" else {choice}
    names = set()
    for seed in SEEDS:
        request = {"model": "m", "messages": HI, "tools": TOOLS, "tool_choice": tool_choice, "seed": seed, **BRIEF}
        if seed % 2:
            parts = stream_parts(api.chat.completions.create(stream=True, **request))
            calls = [(c.function.name, c.function.arguments) for c in parts["tool_calls"]]
            content, finish = parts["content"], parts["finish"]
        else:
            choice_ = api.chat.completions.create(**request).choices[0]
            calls = [(c.function.name, c.function.arguments) for c in choice_.message.tool_calls or []]
            content, finish = choice_.message.content or "", choice_.finish_reason
        assert calls
        for name, arguments in calls:
            check_call(name, arguments, allowed)
            names.add(name)
        # Calls and nothing else. "required" is one call or more: a random model may go on calling until max_tokens,
        # and the call cut off then stays text.
        assert (finish, content) == ("tool_calls", "") or (finish == "length" and content.startswith("<"))
    if choice == "required":
        assert len(names) >= 2  # the model chose among the tools


@pytest.mark.parametrize("stream", [False, True])
def test_strict_tool_choices_let_a_call_through(servers: dict, stream: bool) -> None:
    # A model that calls a tool after its thinking, and nothing else: its call passes unchanged, the reply ends.
    api = client(servers["urls"]["calls"])
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        request = {"model": "m", "messages": HI, "tools": [CITY_TOOL, TIME_TOOL], "tool_choice": tool_choice,
                   "max_tokens": 200, **GREEDY}
        if stream:
            parts = stream_parts(api.chat.completions.create(stream=True, **request))
            calls, content, finish = parts["tool_calls"], parts["content"], parts["finish"]
        else:
            choice = api.chat.completions.create(**request).choices[0]
            calls, content, finish = choice.message.tool_calls, choice.message.content, choice.finish_reason
        [call] = calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
        assert (content or "", finish) == ("", "tool_calls")


def test_required_keeps_the_answer_out(servers: dict) -> None:
    # The chain model answers in text before its call: under "required" the text cannot come, only calls.
    choice = client(servers["urls"]["tool"]).chat.completions.create(
        model="m", messages=HI, tools=[CITY_TOOL, TIME_TOOL], tool_choice="required", max_tokens=120,
        **GREEDY).choices[0]
    assert choice.message.tool_calls and TOOL_ANSWER not in (choice.message.content or "")
    for call in choice.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time")
        jsonschema.validate(json.loads(call.function.arguments), {"get_weather": CITY_TOOL, "get_time": TIME_TOOL}[
            call.function.name]["function"]["parameters"])


@pytest.mark.parametrize("where", ["random", "upstream"])
def test_parallel_tool_calls_false_is_one_call(servers: dict, where: str) -> None:
    # Under "required" the random model often goes on calling until max_tokens; with parallel_tool_calls false the
    # grammar allows one call, and the reply ends with it (through serve --upstream too: the field goes along).
    api, finishes = client(servers["urls"][where]), set()
    for seed in SEEDS:
        choice = api.chat.completions.create(model="m", messages=HI, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, seed=seed, temperature=0.7, **BRIEF).choices[0]
        finishes.add(choice.finish_reason)
        if choice.finish_reason == "tool_calls":
            [call] = choice.message.tool_calls
            check_call(call.function.name, call.function.arguments, {t["function"]["name"] for t in TOOLS})
        else:  # cut short inside its one call, which stays text
            assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert "tool_calls" in finishes


def test_the_choice_says_why_the_thinking_was_wrapped_up(servers: dict) -> None:
    api = client(servers["urls"]["ponder"])
    budgeted = api.chat.completions.create(model="m", messages=HI, max_tokens=200,
                                           extra_body={"thinking_budget": 8}, **GREEDY).choices[0]
    assert (budgeted.message.content, budgeted.model_extra["thinking_wrap_up"]) == (PONDER_ANSWER, "budget")
    plain = client(servers["urls"]["calls"]).chat.completions.create(model="m", messages=HI, max_tokens=200,
                                                                     **GREEDY).choices[0]
    assert "thinking_wrap_up" not in plain.model_extra


def test_tool_choice_none_keeps_calls_out(servers: dict) -> None:
    # The chain model calls a tool right after its answer; with "none" it cannot open the call, and goes on ("!").
    api = client(servers["urls"]["tool"])
    choice = api.chat.completions.create(model="m", messages=HI, tools=[CITY_TOOL], tool_choice="none", max_tokens=30,
                                         **GREEDY).choices[0]
    assert choice.message.tool_calls is None and "<tool_call>" not in choice.message.content
    assert choice.message.content.startswith(TOOL_ANSWER + "!") and choice.finish_reason == "length"


def test_tool_choice_auto_mends_the_call_the_model_opens(servers: dict) -> None:
    api = client(servers["urls"]["tool"])
    for stream in (False, True):
        request = {"model": "m", "messages": HI, "tools": [CITY_TOOL], "max_tokens": 120, **GREEDY}
        if stream:
            parts = stream_parts(api.chat.completions.create(stream=True, **request))
            calls, content = parts["tool_calls"], parts["content"]
        else:
            choice = api.chat.completions.create(**request).choices[0]
            calls, content = choice.message.tool_calls, choice.message.content
        # The model answered freely, then opened a call with a misspelt name and a wrong argument: the call's body
        # follows the tool's parameters, not the model. (Off its script, this chain model then calls again.)
        assert content.startswith(TOOL_ANSWER) and calls
        for call in calls:
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), CITY_TOOL["function"]["parameters"])
    # Without tools the same reply's call is the model's text, as it wrote it.
    text = api.chat.completions.create(model="m", messages=HI, max_tokens=120, **GREEDY).choices[0].message.content
    assert text == f"{TOOL_ANSWER}\n<tool_call>\n{BAD_CALL}\n</tool_call>"


# --- answer now ----------------------------------------------------------------------------------------------------

def answer_now(url: str, kind: str, id: str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/{kind}/{id}/answer-now", json={},
                      headers={"Authorization": f"Bearer {KEY}"} if headers is None else headers)


def ponder_then_answer_now(url: str, **request: object) -> tuple[str, dict]:
    """Stream a chat completion that thinks until told; ask it to answer now after a few chunks. Its id, and what
    came."""
    stream = client(url).chat.completions.create(model="m", messages=HI, stream=True, **request)
    chunks = iter(stream)
    first = [next(chunks) for _ in range(6)]
    response = answer_now(url, "chat/completions", first[0].id)
    assert response.status_code == 200 and response.json() == {"id": first[0].id, "answer_now": True}
    return first[0].id, stream_parts([*first, *chunks])


@pytest.mark.parametrize("where", ["ponder", "ponder-upstream"])
def test_answer_now_ends_the_thinking(servers: dict, where: str) -> None:
    url = servers["urls"][where]
    assert httpx.get(f"{url}/props").json()["answer_now"] is True
    completion_id, parts = ponder_then_answer_now(url, max_tokens=3000, **GREEDY)
    thought, _, wrap_up = parts["reasoning_content"].partition("\n\n")
    assert thought.startswith("Hmm!!") and wrap_up == THINKING_BUDGET_WRAP_UP.strip()
    assert (parts["content"], parts["finish"]) == (PONDER_ANSWER, "stop")
    # Finished: nothing runs by that id any more.
    assert error(answer_now(url, "chat/completions", completion_id), 404)["code"] == "not_found"


def test_answer_now_then_the_schema(servers: dict) -> None:
    # The answer after the wrap-up is constrained as after the model's own </think>.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    _, parts = ponder_then_answer_now(servers["urls"]["ponder"], max_tokens=3000,
                                      response_format=json_schema_format(schema), **GREEDY)
    assert check_answer(parts["content"], parts["finish"], schema)


def test_answer_now_of_a_response(servers: dict) -> None:
    url = servers["urls"]["ponder"]
    events = iter(client(url).responses.create(model="m", input="Hi", stream=True, max_output_tokens=3000,
                                               temperature=0.0))
    created = next(events)
    assert created.type == "response.created"
    while next(events).type != "response.reasoning_text.delta":
        pass
    assert answer_now(url, "responses", created.response.id).status_code == 200
    final = [e for e in events if e.type == "response.completed"][0].response
    assert final.output_text == PONDER_ANSWER and final.status == "completed"


def test_answer_now_is_guarded(servers: dict) -> None:
    url = servers["urls"]["ponder"]
    stream = client(url).chat.completions.create(model="m", messages=HI, stream=True, max_tokens=3000, **GREEDY)
    chunks = iter(stream)
    completion_id = next(chunks).id
    try:
        assert error(answer_now(url, "chat/completions", completion_id, headers={}), 401)["code"] == "invalid_api_key"
        other_site = {"Authorization": f"Bearer {KEY}", "Origin": "http://evil.test"}
        assert answer_now(url, "chat/completions", completion_id, headers=other_site).status_code == 403
        assert error(answer_now(url, "chat/completions", "chatcmpl-nope"), 404)["code"] == "not_found"
        no_type = httpx.post(f"{url}/v1/chat/completions/{completion_id}/answer-now",
                             headers={"Authorization": f"Bearer {KEY}"})  # a form or a "simple" fetch could send it
        assert no_type.status_code == 415
        assert next(chunks).choices[0].delta.reasoning_content in ("Hmm", "!")  # still thinking: nothing was ended
    finally:
        stream.close()


def test_parallel_answer_now_ends_one_generation(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Two completions think side by side in one model: answer now ends the one it names; the other thinks on until
    # its own budget (what max_tokens leaves before the answer's reserve) runs out, far later.
    path = pondering_model_file(tmp_path_factory.mktemp("ponder-parallel"))
    model = Model.load(path, n_ctx=2048, gpu_layers=0, threads=1, loop_guard=False, parallel=2)
    try:
        with running(create_app(model)) as url:
            other = client(url, key="unused").chat.completions.create(model="m", messages=HI, stream=True,
                                                                      max_tokens=300, **GREEDY)
            other_parts: dict = {}
            reader = threading.Thread(target=lambda: other_parts.update(stream_parts(other)))
            reader.start()
            _, parts = ponder_then_answer_now(url, max_tokens=3000, **GREEDY)
            reader.join(timeout=120)
        assert parts["content"] == PONDER_ANSWER and parts["reasoning_content"].count("!") < 100
        thought, _, wrap_up = other_parts["reasoning_content"].partition("\n\n")
        assert thought.count("!") > 150 and wrap_up == THINKING_BUDGET_WRAP_UP.strip()
        assert (other_parts["content"], other_parts["finish"]) == (PONDER_ANSWER, "stop")
    finally:
        model.close()


# --- through a remote backend --------------------------------------------------------------------------------------

def test_remote_model_passes_schema_and_tool_choice(servers: dict) -> None:
    from localqwen.events import Reply

    remote: RemoteModel = servers["remote"]
    for seed in range(3):
        reply = Reply.collect(remote.chat(HI, schema=Person, seed=seed, max_tokens=MAX_TOKENS,
                                          thinking_budget=THINK_BRIEFLY))
        local = Reply.collect(servers["random"].chat(HI, schema=Person, seed=seed, max_tokens=MAX_TOKENS,
                                                     thinking_budget=THINK_BRIEFLY))
        assert (reply.content, reply.stats.finish_reason) == (local.content, local.stats.finish_reason)
        assert reply.parsed == local.parsed and (reply.parsed is None) == (reply.stats.finish_reason != "stop")
        calls = Reply.collect(remote.chat(HI, tools=TOOLS, tool_choice="set_lights", seed=seed,
                                          max_tokens=MAX_TOKENS, thinking_budget=THINK_BRIEFLY)).tool_calls
        for call in calls:
            if call.error is None:
                check_call(call.name, call.arguments, {"set_lights"})


def test_serve_upstream_keeps_the_new_fields(servers: dict) -> None:
    # A localqwen server in front of another (serve --upstream): the fields go through to the engine behind.
    api = client(servers["urls"]["upstream"], key="unused")
    completed = []
    for seed in range(3):
        choice = api.chat.completions.create(model="m", messages=HI, response_format=json_schema_format(PERSON),
                                             seed=seed, **BRIEF).choices[0]
        completed.append(check_answer(choice.message.content, choice.finish_reason, PERSON))
        choice = api.chat.completions.create(model="m", messages=HI, tools=TOOLS, tool_choice="required", seed=seed,
                                             **BRIEF).choices[0]
        for call in choice.message.tool_calls or []:
            check_call(call.function.name, call.function.arguments, {t["function"]["name"] for t in TOOLS})
    assert any(completed)
