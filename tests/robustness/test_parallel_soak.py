"""The server with 4 slots under a crowd: clients in several threads asking, streaming, hanging up and giving up at
random; every answer that completes is exact, and the process keeps its memory, threads and file descriptors.
A short run is in the default suite; `-m soak` runs thousands of requests."""

from __future__ import annotations

import contextlib
import gc
import random
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import psutil
import pytest

from localqwen import Model
from localqwen.server import create_app
from localqwen.synthetic import script_chain

from ..test_server import load_chain, running
from .test_server_abuse import ANSWER, GREEDY, HI, RSS_GROWTH_MB, THINKING, trim_malloc

CHAT = "/v1/chat/completions"
CLIENTS = 6  # more than the 4 slots: some wait


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("parallel-soak")
    models = []
    for name, chain, n_ctx in (("scripted", script_chain(THINKING, ANSWER)[0], 512),
                               ("endless", script_chain("Hmm", "Sure")[0][:-1], 4096)):
        single = load_chain(tmp, name, chain, n_ctx=n_ctx)
        path = single.path
        single.close()
        models.append(Model.load(path, n_ctx=n_ctx, gpu_layers=0, threads=1, parallel=4))
    with contextlib.ExitStack() as stack:
        yield SimpleNamespace(
            scripted=models[0], endless=models[1],
            open=stack.enter_context(running(create_app(models[0], max_queue=16))),
            busy=stack.enter_context(running(create_app(models[1], max_queue=16))))
    for model in models:
        model.close()


def one_request(env: SimpleNamespace, http: httpx.Client, rnd: random.Random) -> str:
    kind = rnd.choice(["normal", "normal", "streamed", "hang_up", "give_up"])
    if kind == "normal":
        message = http.post(f"{env.open}{CHAT}", json={"messages": HI, **GREEDY}).json()["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == (THINKING, ANSWER)
    elif kind == "streamed":
        with http.stream("POST", f"{env.open}{CHAT}", json={"messages": HI, "stream": True, **GREEDY}) as response:
            text = "".join(line for line in response.iter_lines())
        assert response.status_code == 200 and '"finish_reason":"stop"' in text.replace(" ", "")
    elif kind == "hang_up":
        with http.stream("POST", f"{env.busy}{CHAT}", json={"messages": HI, "max_tokens": 3000, "stream": True,
                                                            **GREEDY}) as response:
            lines = response.iter_lines()
            for _ in range(rnd.randint(1, 20)):
                next(lines)
    else:
        with contextlib.suppress(httpx.ReadTimeout):
            http.post(f"{env.busy}{CHAT}", json={"messages": HI, "max_tokens": 3000, **GREEDY},
                      timeout=rnd.uniform(0.05, 0.5))
    return kind


def idle(env: SimpleNamespace, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while env.scripted.running or env.scripted.waiting or env.endless.running or env.endless.waiting:
        assert time.monotonic() < deadline, "generations kept running after their clients left"
        time.sleep(0.05)


def crowd_soak(env: SimpleNamespace, seconds: float, max_requests: int) -> dict[str, int]:
    me = psutil.Process()
    counts: dict[str, int] = {}
    failures: list[str] = []
    done = [0]
    lock = threading.Lock()

    def client(seed: int, until: float, limit: int) -> None:
        rnd = random.Random(seed)
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < until:
                with lock:
                    if done[0] >= limit:
                        return
                    done[0] += 1
                try:
                    kind = one_request(env, http, rnd)
                except Exception as exc:  # noqa: BLE001 - reported below with the others
                    failures.append(f"{type(exc).__name__}: {exc}"[:300])
                    return
                with lock:
                    counts[kind] = counts.get(kind, 0) + 1

    def run(seconds: float, limit: int) -> None:
        done[0] = 0
        threads = [threading.Thread(target=client, args=(i, time.monotonic() + seconds, limit))
                   for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 120)
        idle(env)

    def sample() -> tuple[int, int, int]:
        gc.collect()
        trim_malloc()
        return me.memory_info().rss, me.num_fds(), threading.active_count()

    run(3, 60)  # warm-up: pools, executor threads, the allocator's arenas
    rss0, fds0, threads0 = sample()
    counts.clear()
    run(seconds, max_requests)
    rss1, fds1, threads1 = sample()
    assert not failures, failures[:5]
    grown = (rss1 - rss0) / 2**20
    print(f"crowd soak: {sum(counts.values())} requests, RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MB, fds "
          f"{fds0} -> {fds1}, threads {threads0} -> {threads1}: {counts}")
    assert fds1 - fds0 < 16 and threads1 - threads0 < 8
    assert grown < RSS_GROWTH_MB, f"RSS grew {grown:.1f} MB ({counts})"
    return counts


def test_short_crowd_soak(crowd: SimpleNamespace) -> None:
    counts = crowd_soak(crowd, seconds=8, max_requests=400)
    assert counts.get("normal", 0) >= 10 and counts.get("hang_up", 0) >= 2, counts


@pytest.mark.soak
def test_long_crowd_soak(crowd: SimpleNamespace, request: pytest.FixtureRequest) -> None:
    if "soak" not in (request.config.getoption("-m") or ""):
        pytest.skip("the long soak runs with -m soak")
    counts = crowd_soak(crowd, seconds=300, max_requests=3000)
    assert sum(counts.values()) >= 1000, counts

