"""Long prompts' KV cache on disk: saved once evaluated, restored in a later load (another process too), never from
a damaged file or into another model or setting."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localqwen import Model, Reply
from localqwen.convert import convert
from localqwen.prompt_cache import MIN_TOKENS, file_sha256, setting_key
from localqwen.synthetic import write_chain_checkpoint

from .test_model import ANSWER, THINKING, chain_model

GREEDY = {"temperature": 0.0, "seed": 0}
# A user message whose chat prompt is well over MIN_TOKENS: a document pasted in, then a question.
DOCUMENT = [{"role": "user", "content": "Summarise: " + " ".join(f"line {i} of the report." for i in range(400))}]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = chain_model(tmp_path_factory.mktemp("prompt-cache"), THINKING, ANSWER)
    return path


def load(path: Path, cache: Path, **kwargs: object) -> Model:
    return Model.load(path, n_ctx=4096, gpu_layers=0, threads=1, prompt_cache=cache, **kwargs)


def entries(cache: Path) -> list[Path]:
    """The saved entries (a sidecar appears once the state file is written and hashed, in the background)."""
    return sorted(cache.glob("*/*.json"))


def wait_for_entries(cache: Path, n: int) -> list[Path]:
    deadline = time.monotonic() + 30
    while len(entries(cache)) < n:
        assert time.monotonic() < deadline, "the prompt was not saved"
        time.sleep(0.05)
    return entries(cache)


def test_a_long_prompt_is_saved_and_restored_by_the_next_load(chain: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    model = load(chain, cache)
    try:
        prompt = model.tokenize_chat(DOCUMENT)
        assert len(prompt) > MIN_TOKENS
        first = Reply.collect(model.chat(DOCUMENT, **GREEDY))
        assert first.stats.cached_prompt_tokens == 0 and (first.thinking, first.content) == (THINKING, ANSWER)
        [sidecar] = wait_for_entries(cache, 1)
        assert json.loads(sidecar.read_text())["tokens"] == prompt
        short = Reply.collect(model.chat([{"role": "user", "content": "Hi"}], **GREEDY))
        assert short.content == ANSWER and len(entries(cache)) == 1  # a short prompt is not worth saving
    finally:
        model.close()
    again = load(chain, cache)
    try:
        follow_up = [*DOCUMENT, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And then?"}]
        reply = Reply.collect(again.chat(follow_up, **GREEDY))
        # Restored from disk: everything the two prompts share (the template drops the earlier thinking, so they
        # part where the first prompt's "<think>\n" was).
        assert reply.stats.cached_prompt_tokens == len(prompt) - 2 and reply.content == ANSWER
    finally:
        again.close()


def test_restored_in_another_process(chain: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    script = ("import json, sys; from localqwen import Model, Reply; "
              f"m = Model.load(sys.argv[1], n_ctx=4096, gpu_layers=0, threads=1, prompt_cache=sys.argv[2]); "
              f"r = Reply.collect(m.chat({DOCUMENT!r}, temperature=0.0, seed=0)); "
              "print(json.dumps([r.stats.cached_prompt_tokens, r.content])); m.close()")

    def run() -> list:
        done = subprocess.run([sys.executable, "-c", script, str(chain), str(cache)], capture_output=True, text=True,
                              timeout=120, check=True)
        return json.loads(done.stdout)

    assert run() == [0, ANSWER]
    wait_for_entries(cache, 1)
    cached, content = run()
    assert cached > MIN_TOKENS and content == ANSWER


def test_a_damaged_entry_is_removed_with_a_warning(chain: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                   ) -> None:
    cache = tmp_path / "cache"
    model = load(chain, cache)
    try:
        Reply.collect(model.chat(DOCUMENT, **GREEDY))
        [sidecar] = wait_for_entries(cache, 1)
    finally:
        model.close()
    state = sidecar.with_suffix(".state")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a full disk
    again = load(chain, cache)
    try:
        with caplog.at_level("WARNING", logger="localqwen"):
            reply = Reply.collect(again.chat(DOCUMENT, **GREEDY))
        assert reply.stats.cached_prompt_tokens == 0 and (reply.thinking, reply.content) == (THINKING, ANSWER)
        assert "damaged or incomplete; removed" in caplog.text
        # The prompt, evaluated again, is saved afresh in place of the damaged entry.
        deadline = time.monotonic() + 30
        while not (sidecar.exists() and state.exists()
                   and file_sha256(state) == json.loads(sidecar.read_text())["sha256"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        again.close()


def test_never_restored_into_another_model_or_setting(chain: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    model = load(chain, cache)
    try:
        Reply.collect(model.chat(DOCUMENT, **GREEDY))
        wait_for_entries(cache, 1)
    finally:
        model.close()
    # Another model of the very same shapes and metadata, with other weights (its chain says other words).
    other_chain = [198, 9707, 151668, 271, 13048, 151645]  # "\n", "Hello", </think>, "\n\n", "Hi", <|im_end|>
    folder = write_chain_checkpoint(tmp_path / "other", other_chain, shards=1)
    [other] = convert(str(folder), ["f16"], outdir=tmp_path, quiet=True)
    assert setting_key(Path(other), "f16", False) != setting_key(chain, "f16", False)
    assert setting_key(chain, "q8_0", True) != setting_key(chain, "f16", False)
    for path, kwargs in ((Path(other), {}), (chain, {"kv_type": "q8_0"})):
        again = load(path, cache, **kwargs)
        try:
            assert Reply.collect(again.chat(DOCUMENT, **GREEDY)).stats.cached_prompt_tokens == 0
        finally:
            again.close()
