"""Many generations at once (continuous batching in one llama.cpp context), on known-output models: each stream gets
exactly its own reply whatever runs beside it; cancel touches only its own; the asyncio API; prefix reuse per slot."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from localqwen import Model, ModelBusy, Reply
from localqwen.convert import convert
from localqwen.server import create_app
from localqwen.synthetic import script_chain

from .lookback_model import ANSWER, ANSWER_THINKING, VALUES, write_lookback_checkpoint
from .test_lookback_model import QUESTION, WEATHER_TOOL, after_tool
from .test_model import ANSWER as CHAIN_ANSWER
from .test_model import THINKING as CHAIN_THINKING
from .test_model import chain_model
from .test_server import load_chain, running

GREEDY = {"temperature": 0.0, "seed": 0}
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    path, _ = chain_model(tmp_path_factory.mktemp("parallel-chain"), CHAIN_THINKING, CHAIN_ANSWER)
    model = Model.load(path, n_ctx=512, gpu_layers=0, threads=1, parallel=4)
    yield model
    model.close()


@pytest.fixture(scope="module")
def lookback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    tmp = tmp_path_factory.mktemp("parallel-lookback")
    [path] = convert(str(write_lookback_checkpoint(tmp / "lookback")), ["f16"], outdir=tmp, quiet=True)
    model = Model.load(path, n_ctx=1024, gpu_layers=0, threads=1, parallel=4)
    yield model
    model.close()


def together(jobs: list[Any]) -> list[Any]:
    """Run the zero-argument callables in threads at the same moment; their results in order."""
    results: list[Any] = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        start.wait()
        results[i] = jobs[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_the_plan_shares_one_cache(chain: Model) -> None:
    plan = chain.plan
    assert (plan.n_seq, plan.n_ctx, plan.n_ctx_seq, chain.n_ctx, chain.parallel) == (4, 2048, 512, 512, 4)
    assert plan.output == 4 * chain.n_vocab * 4  # a row of f32 logits per sequence


def test_streams_with_different_settings_get_exactly_their_own_replies(chain: Model) -> None:
    """The same jobs alone, one after the other, then four at a time: every reply is the same."""
    jobs = [dict(thinking_budget=3), dict(stop=["What"]), dict(max_tokens=5, answer_reserve=0),
            dict(temperature=0.9, top_k=1, seed=7), dict(), dict(thinking_budget=0), dict(stop="need")]
    alone = [Reply.collect(chain.chat(HI, **{**GREEDY, **job})) for job in jobs]
    assert alone[0].content == CHAIN_ANSWER and alone[0].thinking.endswith("directly now.")
    assert alone[1].content == "Hello there! " and alone[1].stats.stop_sequence == "What"
    assert alone[2].stats.finish_reason == "length" and alone[2].stats.truncated_thinking
    for _ in range(2):
        beside = together([lambda job=job: Reply.collect(chain.chat(HI, **{**GREEDY, **job})) for job in jobs])
        for a, b in zip(alone, beside, strict=True):
            assert (b.thinking, b.content, b.stats.finish_reason, b.stats.completion_tokens) == \
                (a.thinking, a.content, a.stats.finish_reason, a.stats.completion_tokens)


def test_cancel_touches_only_its_own_stream(chain: Model) -> None:
    streams = [chain.chat(HI, **GREEDY) for _ in range(4)]
    firsts = [next(stream) for stream in streams]  # all four are running
    assert all(event.kind == "thinking" for event in firsts) and chain.running == 4
    streams[1].cancel()
    rest = [[firsts[i], *stream] for i, stream in enumerate(streams)]
    assert rest[1][-1].stats.finish_reason == "cancelled"
    for i in (0, 2, 3):
        reply = Reply.collect(rest[i])
        assert (reply.thinking, reply.content, reply.stats.finish_reason) == (CHAIN_THINKING, CHAIN_ANSWER, "stop")


def test_no_cross_talk_between_conversations(lookback: Model) -> None:
    """A model whose answer copies a word from the conversation's tool result: four conversations at once, each
    with its own result, each answer names its own (a sequence that saw another's cache cells would not)."""
    call = Reply.collect(lookback.chat(QUESTION, tools=[WEATHER_TOOL], **GREEDY))
    histories = [after_tool(QUESTION, call, f"It is {value} today.") for value in VALUES[:4]]
    for _ in range(3):
        replies = together([lambda h=h: Reply.collect(lookback.chat(h, tools=[WEATHER_TOOL], **GREEDY))
                            for h in histories])
        assert [(r.thinking, r.content) for r in replies] == \
            [(ANSWER_THINKING, ANSWER.format(value)) for value in VALUES[:4]]


def test_a_request_goes_where_its_prefix_is_cached(lookback: Model) -> None:
    """Three conversations that differ from their first message call the tool at once; their second rounds (the
    first round's prompt, the call, the result) come one by one, in another order: each finds its own first round
    in the cache, which it could not in another conversation's slot."""
    questions = [[{"role": "user", "content": f"{word}: what is the weather in Paris?"}]
                 for word in ("Hi", "Yo", "Hey")]
    calls = together([lambda q=q: Reply.collect(lookback.chat(q, tools=[WEATHER_TOOL], **GREEDY)) for q in questions])
    for question, call in reversed(list(zip(questions, calls, strict=True))):
        reply = Reply.collect(lookback.chat(after_tool(question, call, "cold"), tools=[WEATHER_TOOL], **GREEDY))
        assert reply.content == ANSWER.format("cold")
        assert reply.stats.cached_prompt_tokens >= len(lookback.tokenize_chat(question, [WEATHER_TOOL]))


def test_busy_only_when_every_slot_is_taken(chain: Model) -> None:
    streams = [chain.chat(HI, **GREEDY) for _ in range(4)]
    for stream in streams:
        next(stream)
    with pytest.raises(ModelBusy):
        next(chain.chat(HI, wait=0, **GREEDY))
    waiting = chain.chat(HI, wait=5, **GREEDY)  # waits for a slot
    streams[0].close()
    assert Reply.collect(waiting).content == CHAIN_ANSWER
    for stream in streams[1:]:
        stream.close()


def test_asyncio_api(chain: Model) -> None:
    async def reply(**options: Any) -> Reply:
        return Reply.collect([event async for event in chain.achat(HI, **{**GREEDY, **options})])

    async def cancelled_by_its_task() -> list[str]:
        kinds: list[str] = []

        async def consume() -> None:
            async for event in chain.achat(HI, **GREEDY):
                kinds.append(event.kind)
                await asyncio.sleep(0.05)

        task = asyncio.ensure_future(consume())
        while not kinds:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return kinds

    async def main() -> tuple[list[Reply], list[str]]:
        replies = await asyncio.gather(*(reply(thinking_budget=b) for b in (None, 2, None, 4)))
        return list(replies), await cancelled_by_its_task()

    replies, kinds = asyncio.run(main())
    assert [r.content for r in replies] == [CHAIN_ANSWER] * 4
    assert replies[0].thinking == CHAIN_THINKING and replies[1].thinking.endswith("directly now.")
    assert "done" not in kinds
    deadline = time.monotonic() + 10
    while chain.running and time.monotonic() < deadline:  # the cancelled task's sequence has left its slot
        time.sleep(0.01)
    assert chain.running == 0


def test_the_single_stream_path_is_unchanged(tmp_path: Path) -> None:
    path, _ = chain_model(tmp_path, CHAIN_THINKING, CHAIN_ANSWER)
    model = Model.load(path, n_ctx=512, gpu_layers=0, threads=1)
    try:
        assert (model.parallel, model.plan.n_ctx, model.n_ctx) == (1, 512, 512)
        reply = Reply.collect(model.chat(HI, **GREEDY))
        assert (reply.thinking, reply.content) == (CHAIN_THINKING, CHAIN_ANSWER)
    finally:
        model.close()


def test_the_server_runs_requests_together(tmp_path: Path) -> None:
    """An endless model (it never ends its turn) with 3 slots: three streamed clients run at once, a fourth waits;
    one client hanging up ends its own generation only, and the waiting one takes its slot."""
    endless_chain = script_chain("Hmm", "Sure")[0][:-1]
    model = load_chain(tmp_path, "endless", endless_chain, n_ctx=4096)
    model.close()
    model = Model.load(model.path, n_ctx=4096, gpu_layers=0, threads=1, parallel=3)
    body = {"messages": HI, "max_tokens": 3000, "stream": True, **GREEDY}
    try:
        with running(create_app(model, max_queue=4)) as url, httpx.Client(timeout=60) as http, \
                contextlib.ExitStack() as streams:
            lines = [streams.enter_context(http.stream("POST", f"{url}/v1/chat/completions", json=body)).iter_lines()
                     for _ in range(3)]
            for stream in lines:
                next(stream)  # each has started
            assert httpx.get(f"{url}/health").json() | {"waiting": 0} == {
                "status": "ok", "model": model.path.stem, "generating": True, "running": 3, "waiting": 0, "slots": 3}
            queued: list[httpx.Response] = []
            waiter = threading.Thread(target=lambda: queued.append(http.post(
                f"{url}/v1/chat/completions", json={"messages": HI, "max_tokens": 4, **GREEDY})))
            waiter.start()
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/health").json()["waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            streams.close()  # the three clients hang up: their generations end, the waiting request runs
            waiter.join(30)
            assert queued[0].json()["choices"][0]["message"]["content"].startswith("Sure")
            deadline = time.monotonic() + 10
            while model.running:
                assert time.monotonic() < deadline
                time.sleep(0.02)
    finally:
        model.close()
