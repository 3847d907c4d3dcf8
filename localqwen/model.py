"""The runtime: load a GGUF through llama.cpp and generate typed, thinking-aware events.

    model = Model.load("Qwen3-4B-Thinking-2507-Q4_K_M.gguf", parallel=4)
    for event in model.chat([{"role": "user", "content": "Hi"}]):
        print(event.kind, event.text)

Up to `parallel` generations run together (continuous batching in one llama.cpp context: localqwen.engine); more
wait for a slot. `chat` may be called from many threads at once, and its stream iterates with `for` or
`async for`. A generation stops when its stream is cancelled or closed; `model.cancel()` stops them all. What a
reply does token by token (its phases, limits and events) is localqwen.generation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localqwen.backend import Vocab, load_model, new_context
from localqwen.constants import ENDOFTEXT_ID, IM_END_ID, THINKING_BUDGET_WRAP_UP, THINKING_CLOSER
from localqwen.engine import Engine, Request
from localqwen.errors import BadRequest, ContextOverflow, ModelFileError
from localqwen.generation import Limits, Turn
from localqwen.metadata import ModelMetadata, read_metadata
from localqwen.modelcheck import check_model
from localqwen.plan import MemoryPlan, choose_plan, shape_of, shortfall
from localqwen.probe import ensure_loadable
from localqwen.sampling import Sampling
from localqwen.stream import Stream
from localqwen.template_check import chat_renderer, check_template

# ggml type ids for the KV cache (ggml.h: GGML_TYPE_F16 = 1, GGML_TYPE_Q4_0 = 2, GGML_TYPE_Q8_0 = 8).
GGML_KV_TYPE_IDS = {"f16": 1, "q8_0": 8, "q4_0": 2}
# What closes thinking when its budget runs out: the Qwen3 report's sentence, then the template's layout
# (the report writes "</think>.\n\n"; the chat template renders "</think>\n\n").
WRAP_UP_TEXT = "\n\n" + THINKING_BUDGET_WRAP_UP.rstrip("\n") + THINKING_CLOSER


class Model:
    def __init__(self, llama_model: Any, context: Any, meta: ModelMetadata, plan: MemoryPlan, load_s: float) -> None:
        import llama_cpp

        self.meta, self.plan, self.load_s, self.path = meta, plan, load_s, meta.path
        if not meta.chat_template:
            raise ModelFileError("has no chat template (tokenizer.chat_template)", meta.path)
        self.template = meta.chat_template
        self.sampling = Sampling.from_metadata(meta.sampling)
        self._model, self._context = llama_model, context
        self._vocab = Vocab(llama_model)
        special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        self.special_texts = [self._vocab.piece(i, special=True).decode("utf-8", "replace")
                              for i in range(self.n_vocab) if self._vocab.attributes(i) & special]
        self._renderer = chat_renderer(self.template, self.special_texts)  # another template renders in a child
        self.wrap_up_ids = self.tokenize(WRAP_UP_TEXT, special=True)
        end_ids = {IM_END_ID, ENDOFTEXT_ID, llama_cpp.llama_vocab_eos(llama_model.vocab)}
        self._engine = Engine(llama_model, context, n_slots=plan.n_seq, n_batch=plan.n_batch, end_ids=end_ids,
                              wrap_up_ids=self.wrap_up_ids, wrap_up_text=WRAP_UP_TEXT, load_s=load_s)

    @classmethod
    def load(cls, path: str | Path, *, n_ctx: int | str = "auto", kv_type: str = "f16", flash_attn: bool | None = None,
             gpu_layers: int | str = "auto", threads: int | None = None, max_ctx: int | None = None,
             parallel: int = 1) -> Model:
        """Load a GGUF for `parallel` generations at once, each with a context of `n_ctx` tokens (they share one
        KV cache of parallel x n_ctx). n_ctx="auto" takes the largest that fits free memory, up to `max_ctx`."""
        path = Path(path)
        if not path.is_file():
            raise ModelFileError("model file not found", path)
        meta = read_metadata(path)
        check_model(meta)  # llama.cpp aborts the process on some bad files: refuse them first
        check_template(meta.chat_template, path)  # untrusted code: rendered once, in a bounded child process
        plan, memory = choose_plan(shape_of(meta), n_ctx, kv_type=kv_type, flash_attn=flash_attn,
                                   gpu_layers=gpu_layers, max_ctx=max_ctx, parallel=parallel)
        if (why := shortfall(plan, memory)) is not None:
            raise ModelFileError(f"{why}: lower --ctx or use --kv-cache q8_0/q4_0", path)
        kv_type_id, n_threads = GGML_KV_TYPE_IDS[plan.kv_type], threads or default_threads()
        # For asserts nobody anticipated: a child process loads a file localqwen has not seen first.
        ensure_loadable(meta, gpu_layers=plan.gpu_layers, n_seq_max=plan.n_seq, flash_attn=plan.flash_attn,
                        kv_type=kv_type_id, n_threads=n_threads)
        started = time.perf_counter()
        try:
            llama_model = load_model(path, gpu_layers=plan.gpu_layers)
            context = new_context(llama_model, n_ctx=plan.n_ctx, n_batch=plan.n_batch, n_ubatch=plan.n_ubatch,
                                  n_seq_max=plan.n_seq, flash_attn=plan.flash_attn, kv_type=kv_type_id,
                                  n_threads=n_threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelFileError(f"llama.cpp could not load the model ({exc})", path) from None
        return cls(llama_model, context, meta, plan, time.perf_counter() - started)

    # --- what the model is ---------------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """The context one generation may use (prompt and reply), in tokens."""
        return self.plan.n_ctx_seq

    @property
    def parallel(self) -> int:
        return self.plan.n_seq

    @property
    def n_vocab(self) -> int:
        return self._vocab.n_vocab

    @property
    def wrap_up_tokens(self) -> int:
        return len(self.wrap_up_ids)

    @property
    def running(self) -> int:
        """Generations running now."""
        return self._engine.running

    @property
    def waiting(self) -> int:
        """Generations waiting for a slot."""
        return self._engine.waiting

    @property
    def cached_tokens(self) -> int:
        """Tokens whose KV cache the context holds now, over all slots (for one slot: the last prompt and reply,
        or the part of a prompt evaluated so far)."""
        return sum(len(slot.tokens) for slot in self._engine.slots)

    # --- text ----------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`. special=True lets control-token texts (`<|im_start|>`) become control tokens: only
        for text the caller wrote itself, never for a user's."""
        return self._vocab.tokenize(text.encode(), special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """The text of `tokens`; special=True shows control tokens too."""
        return self._vocab.detokenize(list(tokens), special=special).decode("utf-8", "replace")

    def tokenize_chat(self, messages: list[Any], tools: list[Any] | None = None) -> list[int]:
        """The prompt tokens: template structure as special tokens, user-supplied text never."""
        tokens: list[int] = []
        for segment in self._renderer.render(messages, tools):
            tokens += self.tokenize(segment.text, special=segment.special)
        return tokens

    # --- generation ----------------------------------------------------------------------------------------------

    def chat(self, messages: list[Any], *, tools: list[Any] | None = None, max_tokens: int | None = None,
             thinking_budget: int | None = None, answer_reserve: int | None = None, stop: str | list[str] | None = None,
             wait: float | None = None, **sampling: Any) -> Stream:
        """Stream the reply to `messages` as events (`for` or `async for`). `stop`: strings that end the answer
        (never the thinking); `wait`: seconds to wait for a free slot before ModelBusy (None: as long as it takes);
        sampling overrides: temperature, top_p, top_k, min_p, presence_penalty, seed."""
        prompt = self.tokenize_chat(messages, tools)
        return self.generate(prompt, max_tokens=max_tokens, thinking_budget=thinking_budget,
                             answer_reserve=answer_reserve, stop=stop, wait=wait, **sampling)

    achat = chat  # the same stream serves `async for`; the name reads well in async code

    def generate(self, prompt: Sequence[int], *, max_tokens: int | None = None, thinking_budget: int | None = None,
                 answer_reserve: int | None = None, thinking: bool = True, stop: str | list[str] | None = None,
                 wait: float | None = None, **sampling: Any) -> Stream:
        """Stream events for raw prompt tokens. `thinking`: the prompt leaves the model inside `<think>`."""
        options = self.sampling.with_overrides(**sampling)
        if not prompt:
            raise BadRequest("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(len(prompt), self.n_ctx)
        limits = Limits.for_reply(room=self.n_ctx - len(prompt), max_tokens=max_tokens,
                                  thinking_budget=thinking_budget, answer_reserve=answer_reserve,
                                  wrap_up_tokens=self.wrap_up_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        turn = Turn(len(prompt), limits, thinking=thinking, stops=stops)
        seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little")
        request = Request(list(prompt), turn, options, seed, wait)
        return Stream(lambda: self._engine.submit(request))

    def cancel(self) -> None:
        """Stop every generation, running or waiting (from any thread); each stream ends with "cancelled"."""
        self._engine.cancel_all()

    def close(self) -> None:
        self._renderer.close()
        self._engine.close()
        self._context.close()
        self._model.close()


def default_threads() -> int:
    """Physical cores: decode is memory-bound and hyperthreads only add contention."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
