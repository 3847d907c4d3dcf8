"""The runtime: load a GGUF through llama.cpp and generate typed, thinking-aware events.

    model = Model.load("Qwen3-4B-Thinking-2507-Q4_K_M.gguf")
    for event in model.chat([{"role": "user", "content": "Hi"}]):
        print(event.kind, event.text)

One generation runs at a time per model (llama.cpp contexts are not thread-safe); others wait or get ModelBusy.
A generation stops when its stream is closed or `cancel()` is called from any thread.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from localqwen.backend import CancelFlag, open_llama
from localqwen.constants import (
    DEFAULT_MAX_TOKENS,
    ENDOFTEXT_ID,
    IM_END_ID,
    THINK_CLOSE,
    THINKING_BUDGET_WRAP_UP,
)
from localqwen.errors import LocalqwenError
from localqwen.events import Event, Stats
from localqwen.gguf_header import read_header
from localqwen.modelcheck import check_model
from localqwen.parser import StreamParser
from localqwen.plan import MemoryPlan, choose_plan, read_shape
from localqwen.prompt import render_chat
from localqwen.sampling import Sampling

# ggml type ids for the KV cache (ggml.h: GGML_TYPE_F16 = 1, GGML_TYPE_Q4_0 = 2, GGML_TYPE_Q8_0 = 8).
GGML_KV_TYPE_IDS = {"f16": 1, "q8_0": 8, "q4_0": 2}
# When thinking would eat all of max_tokens, this many tokens (at most a quarter of max_tokens) stay for the answer.
DEFAULT_ANSWER_RESERVE = 1024


class ModelBusy(LocalqwenError):
    """Another generation holds the model and the caller chose not to wait."""


class ContextOverflow(LocalqwenError):
    def __init__(self, prompt_tokens: int, n_ctx: int) -> None:
        self.prompt_tokens, self.n_ctx = prompt_tokens, n_ctx
        super().__init__(f"the prompt is {prompt_tokens} tokens, {prompt_tokens - n_ctx + 1} more than the context of "
                         f"{n_ctx} allows")


class Model:
    def __init__(self, llama: Any, path: Path, plan: MemoryPlan, load_s: float) -> None:
        import llama_cpp

        self.llama, self.path, self.plan, self.load_s = llama, path, plan, load_s
        self.metadata: dict[str, str] = dict(llama.metadata)
        self.template = self.metadata.get("tokenizer.chat_template")
        if not self.template:
            raise LocalqwenError("has no chat template (tokenizer.chat_template)", path)
        self.sampling = Sampling.from_metadata(self.metadata)
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        special_attrs = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        self.special_texts = [llama.detokenize([i], special=True).decode("utf-8", "replace")
                              for i in range(llama.n_vocab())
                              if llama_cpp.llama_vocab_get_attr(vocab, i) & special_attrs]
        self.end_ids = {IM_END_ID, ENDOFTEXT_ID, llama.token_eos()}
        # What closes thinking when its budget runs out: the Qwen3 report's sentence, then the template's layout
        # (the report writes "</think>.\n\n"; the chat template renders "</think>\n\n").
        self.wrap_up_text = "\n\n" + THINKING_BUDGET_WRAP_UP + THINK_CLOSE + "\n\n"
        self.wrap_up_ids = llama.tokenize(self.wrap_up_text.encode(), add_bos=False, special=True)
        self._lock = threading.Lock()
        self._cancel = CancelFlag(llama.ctx)  # also read by llama.cpp: llama_decode stops mid-batch when set

    @classmethod
    def load(cls, path: str | Path, *, n_ctx: int | str = "auto", kv_type: str = "f16", flash_attn: bool | None = None,
             gpu_layers: int | str = "auto", threads: int | None = None, max_ctx: int | None = None) -> Model:
        """Load a GGUF. n_ctx="auto" takes the largest context that fits free memory, up to `max_ctx`."""
        path = Path(path)
        if not path.is_file():
            raise LocalqwenError("model file not found", path)
        check_model(read_header(path), path)  # llama.cpp aborts the process on some bad files: refuse them first
        plan, memory = choose_plan(read_shape(path), n_ctx, kv_type=kv_type, flash_attn=flash_attn,
                                   gpu_layers=gpu_layers, max_ctx=max_ctx)
        if plan.total_cpu > memory.ram:
            raise LocalqwenError(f"a context of {plan.n_ctx} tokens needs {plan.total_cpu / 2**30:.1f} GiB of memory, "
                                 f"{memory.ram / 2**30:.1f} GiB is free: lower --ctx or use --kv-cache q8_0/q4_0", path)
        started = time.perf_counter()
        try:
            llama = open_llama(
                path, n_ctx=plan.n_ctx, n_batch=plan.n_batch, n_ubatch=plan.n_ubatch, n_gpu_layers=plan.gpu_layers,
                flash_attn=plan.flash_attn, type_k=GGML_KV_TYPE_IDS[plan.kv_type],
                type_v=GGML_KV_TYPE_IDS[plan.kv_type], n_threads=threads or default_threads())
        except (ValueError, RuntimeError) as exc:
            raise LocalqwenError(f"llama.cpp could not load the model ({exc})", path) from None
        return cls(llama, path, plan, time.perf_counter() - started)

    @property
    def wrap_up_tokens(self) -> int:
        return len(self.wrap_up_ids)

    @property
    def n_ctx(self) -> int:
        return self.llama.n_ctx()

    def tokenize_chat(self, messages: list[Any], tools: list[Any] | None = None) -> list[int]:
        """The prompt tokens: template structure as special tokens, user-supplied text never."""
        tokens: list[int] = []
        for segment in render_chat(self.template, messages, self.special_texts, tools=tools):
            tokens += self.llama.tokenize(segment.text.encode(), add_bos=False, special=segment.special)
        return tokens

    def chat(self, messages: list[Any], *, tools: list[Any] | None = None, max_tokens: int | None = None,
             thinking_budget: int | None = None, answer_reserve: int | None = None, wait: float | None = None,
             **sampling: Any) -> Iterator[Event]:
        """Stream the reply to `messages` as events; sampling overrides: temperature, top_p, top_k, min_p,
        presence_penalty, seed."""
        prompt = self.tokenize_chat(messages, tools)
        return self.generate(prompt, max_tokens=max_tokens, thinking_budget=thinking_budget,
                             answer_reserve=answer_reserve, wait=wait, **sampling)

    def cancel(self) -> None:
        """Stop the running generation (from any thread); its stream ends with finish reason "cancelled"."""
        self._cancel.set()

    def close(self) -> None:
        with self._lock:
            self.llama.close()

    def generate(self, prompt: Sequence[int], *, max_tokens: int | None = None, thinking_budget: int | None = None,
                 answer_reserve: int | None = None, thinking: bool = True, wait: float | None = None,
                 **sampling: Any) -> Iterator[Event]:
        """Stream events for raw prompt tokens. `thinking`: the prompt leaves the model inside `<think>`."""
        options = self.sampling.with_overrides(**sampling)
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(len(prompt), self.n_ctx)
        if max_tokens is not None and max_tokens < 1:
            raise LocalqwenError(f"max_tokens must be at least 1, got {max_tokens}")
        if thinking_budget is not None and thinking_budget < 0:
            raise LocalqwenError(f"thinking_budget must be 0 or more, got {thinking_budget}")
        limit = min(max_tokens or DEFAULT_MAX_TOKENS, self.n_ctx - len(prompt))
        reserve = min(limit // 4, DEFAULT_ANSWER_RESERVE) if answer_reserve is None else answer_reserve
        budget = thinking_budget if thinking_budget is not None else limit
        room = limit - reserve - self.wrap_up_tokens
        if reserve and room > 0:  # thinking stops early enough that the wrap-up and the reserved answer still fit
            budget = min(budget, room)
        return self._run(list(prompt), limit, budget, thinking, options, wait)

    @contextlib.contextmanager
    def _exclusive(self, wait: float | None) -> Iterator[None]:
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            raise ModelBusy("the model is busy with another generation")
        self._cancel.clear()
        try:
            yield
        finally:
            self._lock.release()

    def _sample(self, tokens: list[int], options: Sampling) -> Iterator[int]:
        """llama.cpp's sampled tokens after `tokens` (which grows as the caller appends); closed when abandoned.

        cancel() stops the prompt evaluation too: llama.cpp drops the unfinished batch from the KV cache, and the
        batches already evaluated stay, so a retry of the same prompt resumes from them.
        """
        stream = self.llama.generate(tokens, temp=options.temperature, top_p=options.top_p, top_k=options.top_k,
                                     min_p=options.min_p, presence_penalty=options.presence_penalty,
                                     repeat_penalty=1.0)
        try:
            yield from stream
        except RuntimeError:  # llama-cpp-python's "llama_decode returned 2": aborted by cancel()
            if not self._cancel.is_set():
                raise
        finally:
            stream.close()
            # Each generate() builds a native sampler (~1.75 MB) that Python would free only at a rare full garbage
            # collection; free it now so a busy server's memory stays flat.
            sampler, self.llama._sampler = self.llama._sampler, None
            if sampler is not None:
                sampler.close()

    def _run(self, tokens: list[int], limit: int, budget: int, thinking: bool, options: Sampling,
             wait: float | None) -> Iterator[Event]:
        with self._exclusive(wait):
            out = _Output(Stats(finish_reason="stop", prompt_tokens=len(tokens)), thinking)
            # llama.cpp keeps the KV cache of the longest common prefix with the previous generation (earlier turns).
            cached = self.llama.input_ids[: self.llama.n_tokens]  # the rest of the array is stale
            out.stats.cached_prompt_tokens = min(common_prefix(cached, tokens), len(tokens) - 1)
            started, first_token_at = time.perf_counter(), None
            self.llama.set_seed(options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little"))
            sampling = True
            while sampling:
                if out.stats.completion_tokens >= limit:
                    out.stats.finish_reason = "length"
                    break
                if out.parser.in_thinking and out.stats.thinking_tokens >= budget:
                    # Thinking budget spent: close the thinking, then let the model answer.
                    yield from out.forced(self.wrap_up_text, len(self.wrap_up_ids))
                    tokens += self.wrap_up_ids
                sampling = False
                for token in self._sample(list(tokens), options):
                    first_token_at = first_token_at or time.perf_counter()
                    if self._cancel.is_set() or token in self.end_ids:
                        break
                    tokens.append(token)
                    yield from out.token(self.llama.detokenize([token]))
                    # The budget takes effect between characters, never inside a multi-byte one.
                    over_budget = out.parser.in_thinking and out.stats.thinking_tokens >= budget and out.between_chars
                    if out.stats.completion_tokens >= limit or over_budget:
                        sampling = True  # back to the top: stop at the limit, or wrap up the thinking and go on
                        break
                if self._cancel.is_set():  # during the prompt evaluation or between tokens
                    out.stats.finish_reason = "cancelled"
                    break
            yield from out.finish()
            out.stats.timings = timings(self.load_s, started, first_token_at, time.perf_counter(),
                                        out.stats.prompt_tokens - out.stats.cached_prompt_tokens,
                                        out.stats.completion_tokens)
            yield Event("done", stats=out.stats)


class _Output:
    """The output side of one generation: bytes to text, text to events, and the token counts."""

    def __init__(self, stats: Stats, thinking: bool) -> None:
        self.stats = stats
        self.parser = StreamParser(thinking=thinking)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tool_calls = 0

    @property
    def between_chars(self) -> bool:
        return not self.decoder.getstate()[0]

    def token(self, piece: bytes) -> list[Event]:
        """One sampled token: counted as thinking if it arrived while thinking (`</think>` itself included)."""
        if self.parser.in_thinking:
            self.stats.thinking_tokens += 1
        else:
            self.stats.content_tokens += 1
        return self._events(self.parser.feed(self.decoder.decode(piece)))

    def forced(self, text: str, n_tokens: int) -> list[Event]:
        """Text we put in the model's mouth (the thinking wrap-up): shown, and counted as thinking."""
        self.stats.thinking_tokens += n_tokens
        return self._events(self.parser.feed(text))

    def finish(self) -> list[Event]:
        events = self._events(self.parser.feed(self.decoder.decode(b"", final=True)) + self.parser.finish())
        self.stats.truncated_thinking = self.parser.in_thinking
        if self.stats.finish_reason == "stop" and self.tool_calls:
            self.stats.finish_reason = "tool_calls"
        return events

    def _events(self, events: list[Event]) -> list[Event]:
        self.tool_calls += sum(e.kind == "tool_call" for e in events)
        return events


def timings(load_s: float, started: float, first: float | None, finished: float, prompt: int, generated: int,
            ) -> dict[str, float]:
    first = first or finished
    decode_s = finished - first
    return {
        "load_s": round(load_s, 4),
        "prompt_eval_s": round(first - started, 4),  # time to first token: prompt evaluation plus one sample
        "prompt_tokens_per_s": round(prompt / (first - started), 2) if first > started else 0.0,  # uncached ones
        "generation_s": round(decode_s, 4),
        "tokens_per_s": round((generated - 1) / decode_s, 2) if generated > 1 and decode_s > 0 else 0.0,
    }


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def default_threads() -> int:
    """Physical cores: decode is memory-bound and hyperthreads only add contention."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1

