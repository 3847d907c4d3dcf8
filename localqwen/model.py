"""The runtime: load a GGUF through llama.cpp and generate typed, thinking-aware events.

    model = Model.load("Qwen3-4B-Thinking-2507-Q4_K_M.gguf")
    for event in model.chat([{"role": "user", "content": "Hi"}]):
        print(event.kind, event.text)

One generation runs at a time per model (llama.cpp contexts are not thread-safe); others wait or get ModelBusy.
A generation stops when its stream is closed or `cancel()` is called from any thread. What a reply does token by
token (its phases, limits and events) is localqwen.generation; this module evaluates and samples the tokens.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from localqwen.backend import CancelFlag, open_llama
from localqwen.constants import ENDOFTEXT_ID, IM_END_ID, THINKING_BUDGET_WRAP_UP, THINKING_CLOSER
from localqwen.errors import ContextOverflow, ModelBusy, ModelFileError
from localqwen.events import Event
from localqwen.generation import Limits, Turn, timings
from localqwen.metadata import ModelMetadata, read_metadata
from localqwen.modelcheck import check_model
from localqwen.plan import MemoryPlan, choose_plan, shape_of, shortfall
from localqwen.probe import ensure_loadable
from localqwen.prompt import render_chat
from localqwen.sampling import Sampling
from localqwen.template_check import check_template

# ggml type ids for the KV cache (ggml.h: GGML_TYPE_F16 = 1, GGML_TYPE_Q4_0 = 2, GGML_TYPE_Q8_0 = 8).
GGML_KV_TYPE_IDS = {"f16": 1, "q8_0": 8, "q4_0": 2}
# What closes thinking when its budget runs out: the Qwen3 report's sentence, then the template's layout
# (the report writes "</think>.\n\n"; the chat template renders "</think>\n\n").
WRAP_UP_TEXT = "\n\n" + THINKING_BUDGET_WRAP_UP.rstrip("\n") + THINKING_CLOSER


class Model:
    def __init__(self, llama: Any, meta: ModelMetadata, plan: MemoryPlan, load_s: float) -> None:
        import llama_cpp

        self.llama, self.meta, self.plan, self.load_s = llama, meta, plan, load_s
        self.path = meta.path
        if not meta.chat_template:
            raise ModelFileError("has no chat template (tokenizer.chat_template)", meta.path)
        self.template = meta.chat_template
        self.sampling = Sampling.from_metadata(meta.sampling)
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        special_attrs = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        self.special_texts = [llama.detokenize([i], special=True).decode("utf-8", "replace")
                              for i in range(llama.n_vocab())
                              if llama_cpp.llama_vocab_get_attr(vocab, i) & special_attrs]
        self.end_ids = {IM_END_ID, ENDOFTEXT_ID, llama.token_eos()}
        self.wrap_up_ids = self.tokenize(WRAP_UP_TEXT, special=True)
        self._lock = threading.Lock()
        self._cancel = CancelFlag(llama.ctx)  # also read by llama.cpp: llama_decode stops mid-batch when set

    @classmethod
    def load(cls, path: str | Path, *, n_ctx: int | str = "auto", kv_type: str = "f16", flash_attn: bool | None = None,
             gpu_layers: int | str = "auto", threads: int | None = None, max_ctx: int | None = None) -> Model:
        """Load a GGUF. n_ctx="auto" takes the largest context that fits free memory, up to `max_ctx`."""
        path = Path(path)
        if not path.is_file():
            raise ModelFileError("model file not found", path)
        meta = read_metadata(path)
        check_model(meta)  # llama.cpp aborts the process on some bad files: refuse them first
        check_template(meta.chat_template, path)  # untrusted code: rendered once, in a bounded child process
        plan, memory = choose_plan(shape_of(meta), n_ctx, kv_type=kv_type, flash_attn=flash_attn,
                                   gpu_layers=gpu_layers, max_ctx=max_ctx)
        if (why := shortfall(plan, memory)) is not None:
            raise ModelFileError(f"{why}: lower --ctx or use --kv-cache q8_0/q4_0", path)
        settings = dict(n_ctx=plan.n_ctx, n_batch=plan.n_batch, n_ubatch=plan.n_ubatch, n_gpu_layers=plan.gpu_layers,
                        flash_attn=plan.flash_attn, type_k=GGML_KV_TYPE_IDS[plan.kv_type],
                        type_v=GGML_KV_TYPE_IDS[plan.kv_type], n_threads=threads or default_threads())
        ensure_loadable(meta, **settings)  # for asserts nobody anticipated: a child process loads a new file first
        started = time.perf_counter()
        try:
            llama = open_llama(path, **settings)
        except (ValueError, RuntimeError) as exc:
            raise ModelFileError(f"llama.cpp could not load the model ({exc})", path) from None
        return cls(llama, meta, plan, time.perf_counter() - started)

    @property
    def wrap_up_tokens(self) -> int:
        return len(self.wrap_up_ids)

    @property
    def n_ctx(self) -> int:
        return self.llama.n_ctx()

    @property
    def n_vocab(self) -> int:
        return self.llama.n_vocab()

    @property
    def cached_tokens(self) -> int:
        """Tokens whose KV cache the context holds now (the last prompt and reply, or the evaluated part)."""
        return self.llama.n_tokens

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`. special=True lets control-token texts (`<|im_start|>`) become control tokens: only
        for text the caller wrote itself, never for a user's."""
        return self.llama.tokenize(text.encode(), add_bos=False, special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """The text of `tokens`; special=True shows control tokens too."""
        return self.llama.detokenize(list(tokens), special=special).decode("utf-8", "replace")

    def tokenize_chat(self, messages: list[Any], tools: list[Any] | None = None) -> list[int]:
        """The prompt tokens: template structure as special tokens, user-supplied text never."""
        tokens: list[int] = []
        for segment in render_chat(self.template, messages, self.special_texts, tools=tools):
            tokens += self.tokenize(segment.text, special=segment.special)
        return tokens

    def chat(self, messages: list[Any], *, tools: list[Any] | None = None, max_tokens: int | None = None,
             thinking_budget: int | None = None, answer_reserve: int | None = None, stop: str | list[str] | None = None,
             wait: float | None = None, **sampling: Any) -> Iterator[Event]:
        """Stream the reply to `messages` as events. `stop`: strings that end the answer (never the thinking);
        sampling overrides: temperature, top_p, top_k, min_p, presence_penalty, seed."""
        prompt = self.tokenize_chat(messages, tools)
        return self.generate(prompt, max_tokens=max_tokens, thinking_budget=thinking_budget,
                             answer_reserve=answer_reserve, stop=stop, wait=wait, **sampling)

    def cancel(self) -> None:
        """Stop the running generation (from any thread); its stream ends with finish reason "cancelled"."""
        self._cancel.set()

    def close(self) -> None:
        with self._lock:
            self.llama.close()

    def generate(self, prompt: Sequence[int], *, max_tokens: int | None = None, thinking_budget: int | None = None,
                 answer_reserve: int | None = None, thinking: bool = True, stop: str | list[str] | None = None,
                 wait: float | None = None, **sampling: Any) -> Iterator[Event]:
        """Stream events for raw prompt tokens. `thinking`: the prompt leaves the model inside `<think>`."""
        options = self.sampling.with_overrides(**sampling)
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(len(prompt), self.n_ctx)
        limits = Limits.for_reply(room=self.n_ctx - len(prompt), max_tokens=max_tokens,
                                  thinking_budget=thinking_budget, answer_reserve=answer_reserve,
                                  wrap_up_tokens=self.wrap_up_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return self._run(list(prompt), Turn(len(prompt), limits, thinking=thinking, stops=stops), options, wait)

    @contextlib.contextmanager
    def _exclusive(self, wait: float | None) -> Iterator[None]:
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            raise ModelBusy("the model is busy with another generation")
        self._cancel.clear()
        try:
            yield
        finally:
            self._lock.release()

    def _run(self, tokens: list[int], turn: Turn, options: Sampling, wait: float | None) -> Iterator[Event]:
        with self._exclusive(wait):
            # llama.cpp keeps the KV cache of the longest common prefix with the previous generation (earlier turns).
            cached = self.llama.input_ids[: self.llama.n_tokens]  # the rest of the array is stale
            turn.stats.cached_prompt_tokens = min(common_prefix(cached, tokens), len(tokens) - 1)
            started = time.perf_counter()
            self.llama.set_seed(options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little"))
            # Phase 1: the model thinks (and, once it closes its thinking on its own, answers) ...
            first_token_at = yield from self._decode(tokens, turn, options)
            # Phase 2: ... unless its thinking budget ran out first: then close the thinking for it and let it answer.
            if turn.budget_spent and not turn.out_of_tokens and turn.stats.finish_reason != "cancelled":
                yield from turn.forced(WRAP_UP_TEXT, self.wrap_up_tokens)
                tokens += self.wrap_up_ids
                answer_started = yield from self._decode(tokens, turn, options)
                first_token_at = first_token_at or answer_started
            if turn.out_of_tokens and turn.stats.finish_reason == "stop":
                turn.stop("length")
            yield from turn.finish()
            stats = turn.stats
            stats.timings = timings(self.load_s, started, first_token_at, time.perf_counter(),
                                    stats.prompt_tokens - stats.cached_prompt_tokens, stats.completion_tokens)
            yield Event("done", stats=stats)

    def _decode(self, tokens: list[int], turn: Turn, options: Sampling) -> Iterator[Event]:
        """Sample after `tokens` until the model ends its turn, the reply runs out of tokens, the thinking budget is
        spent, a stop string ends the answer, or cancel(); `tokens` grows with what was sampled. Returns when the first
        token came (or None)."""
        first_token_at = None
        if turn.out_of_tokens or turn.budget_spent:
            return None
        for token in self._sample(list(tokens), options):
            first_token_at = first_token_at or time.perf_counter()
            if self._cancel.is_set() or token in self.end_ids:
                break
            tokens.append(token)
            yield from turn.token(self.llama.detokenize([token]))
            if turn.out_of_tokens or turn.budget_spent or turn.stopped:
                break
        if self._cancel.is_set():  # during the prompt evaluation or between tokens
            turn.stop("cancelled")
        return first_token_at

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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def default_threads() -> int:
    """Physical cores: decode is memory-bound and hyperthreads only add contention."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
