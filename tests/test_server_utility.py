"""The utility routes beside the dialects: /tokenize, /detokenize and the Prometheus /metrics, over real HTTP."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from localqwen.constants import IM_END_ID, IM_START_ID
from localqwen.server import create_app
from localqwen.synthetic import script_chain
from tests.test_server import ANSWER, KEY, THINKING, load_chain, running

HI = [{"role": "user", "content": "Hi"}]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("utility")
    chain = script_chain(THINKING, ANSWER)[0]
    scripted = load_chain(tmp, "scripted", chain)
    # Without <|im_end|> the chain runs into token 0 ("!"), which leads to itself: "Sure!!!!!..." until max_tokens.
    endless = load_chain(tmp, "endless", script_chain("Hmm", "Sure")[0][:-1], n_ctx=32768)
    with contextlib.ExitStack() as stack:
        yield SimpleNamespace(scripted=scripted, endless=endless, chain=chain,
                              url=stack.enter_context(running(create_app(scripted, api_key=KEY))))
    scripted.close()
    endless.close()


def test_tokenize_keeps_user_text_text(env: SimpleNamespace) -> None:
    def tokenize(**body: object) -> list[int]:
        reply = httpx.post(f"{env.url}/tokenize", json=body, headers=AUTH)
        assert reply.status_code == 200, reply.text
        assert reply.json()["count"] == len(reply.json()["tokens"])
        return reply.json()["tokens"]

    text = "<|im_start|>user<|im_end|>"
    assert IM_START_ID not in tokenize(content=text) and IM_END_ID not in tokenize(content=text)
    assert tokenize(content=text, parse_special=True)[::2] == [IM_START_ID, IM_END_ID]
    assert tokenize(messages=HI) == env.scripted.tokenize_chat(HI)
    sneaky = [{"role": "user", "content": text}]
    assert tokenize(messages=sneaky) == env.scripted.tokenize_chat(sneaky)
    assert tokenize(messages=sneaky).count(IM_START_ID) == 2  # the template's two, none from the user's text

    detokenized = httpx.post(f"{env.url}/detokenize", json={"tokens": tokenize(content="Hi 🦙")}, headers=AUTH)
    assert detokenized.json() == {"content": "Hi 🦙"}
    shown = httpx.post(f"{env.url}/detokenize", json={"tokens": [IM_START_ID]}, headers=AUTH).json()
    assert shown == {"content": "<|im_start|>"}


def test_tokenize_errors(env: SimpleNamespace) -> None:
    def refused(path: str, body: object, status: int = 400) -> str:
        reply = httpx.post(f"{env.url}{path}", json=body, headers=AUTH)
        assert reply.status_code == status, reply.text
        return reply.json()["error"]["message"]

    assert "either content" in refused("/tokenize", {})
    assert "either content" in refused("/tokenize", {"content": "Hi", "messages": HI})
    assert "token ids" in refused("/detokenize", {"tokens": [env.scripted.n_vocab]})
    assert "token ids" in refused("/detokenize", {"tokens": [-1]})
    refused("/detokenize", {"tokens": ["a"]})
    assert httpx.post(f"{env.url}/tokenize", json={"content": "Hi"}).status_code == 401


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client: {(name, labels): value}."""
    reply = httpx.get(f"{url}/metrics", headers=AUTH)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.text) for s in family.samples}


def requests(samples: dict, endpoint: str, status: int) -> float:
    return samples.get(("localqwen_requests_total", (("endpoint", endpoint), ("status", str(status)))), 0.0)


def test_metrics_count_requests_tokens_and_timings(env: SimpleNamespace) -> None:
    with running(create_app(env.scripted, api_key=KEY)) as url:  # a fresh app: a registry of its own
        before = scrape(url)
        assert before[("localqwen_prompt_tokens_total", ())] == 0 and before[("localqwen_queue_depth", ())] == 0
        bodies = [("/v1/chat/completions", {"messages": HI}), ("/v1/messages", {"messages": HI, "max_tokens": 200}),
                  ("/api/chat", {"model": "m", "messages": HI, "stream": True}), ("/v1/responses", {"input": "Hi"})]
        for path, body in bodies:
            reply = httpx.post(f"{url}{path}", json={**body, "temperature": 0.0}, headers=AUTH)
            assert reply.status_code == 200, reply.text
        assert httpx.post(f"{url}/v1/messages", json={"messages": HI}, headers=AUTH).status_code == 400
        assert httpx.get(f"{url}/v1/nowhere", headers=AUTH).status_code == 404
        assert httpx.get(f"{url}/metrics").status_code == 401
        after = scrape(url)
    for path, _ in bodies:
        assert requests(after, path, 200) == 1, path
    assert requests(after, "/v1/messages", 400) == 1 and requests(after, "unmatched", 404) == 1
    assert requests(after, "/metrics", 401) == 1 and requests(after, "/metrics", 200) == 1  # the first scrape
    prompt = len(env.scripted.tokenize_chat(HI))
    assert after[("localqwen_prompt_tokens_total", ())] == 4 * prompt
    assert after[("localqwen_cached_prompt_tokens_total", ())] >= 3 * (prompt - 1)  # the same prompt, four times
    assert after[("localqwen_generated_tokens_total", ())] == 4 * (len(env.chain) - 2)
    assert 0 < after[("localqwen_thinking_tokens_total", ())] < after[("localqwen_generated_tokens_total", ())]
    for histogram in ("localqwen_time_to_first_token_seconds", "localqwen_generation_tokens_per_second"):
        assert after[(f"{histogram}_count", ())] == 4 and after[(f"{histogram}_sum", ())] > 0
    assert after[("localqwen_running_generations", ())] == 0


def test_metrics_show_the_running_generation_and_the_queue(env: SimpleNamespace) -> None:
    endless = {"messages": HI, "max_tokens": 30000, "temperature": 0.0}
    with running(create_app(env.endless, api_key=KEY)) as url, httpx.Client(timeout=30, headers=AUTH) as http, \
            http.stream("POST", f"{url}/v1/chat/completions", json={**endless, "stream": True}) as response:
        lines = response.iter_lines()  # held: a dropped iterator closes the response
        next(lines)  # the model is busy with this one
        queued = threading.Thread(target=lambda: http.post(f"{url}/v1/chat/completions", json={
            **endless, "max_tokens": 4}))
        queued.start()
        deadline = time.monotonic() + 10
        while (samples := scrape(url))[("localqwen_queue_depth", ())] < 1:
            assert time.monotonic() < deadline, samples
            time.sleep(0.02)
        assert samples[("localqwen_running_generations", ())] == 1
        response.close()
        queued.join(timeout=20)
        # Both requests end (the stream when the server notices its client left) and the model is free.
        deadline = time.monotonic() + 10
        while not (requests(samples := scrape(url), "/v1/chat/completions", 200) == 2
                   and samples[("localqwen_running_generations", ())] == 0):
            assert time.monotonic() < deadline, samples
            time.sleep(0.02)
    assert samples[("localqwen_queue_depth", ())] == 0
