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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localqwen import paths
from localqwen.backend import Vocab, last_error, load_model, new_context
from localqwen.constants import ENDOFTEXT_ID, IM_END_ID, THINKING_WRAP_UP_TEXT, TOOL_CALL_OPEN_ID
from localqwen.constrain import AnswerFormat, call_body, calls_only, json_answer
from localqwen.engine import Engine, Request
from localqwen.errors import BadRequest, ContextOverflow, ModelFileError
from localqwen.generation import Limits, Turn
from localqwen.metadata import ModelMetadata, read_metadata
from localqwen.modelcheck import check_model
from localqwen.plan import MemoryPlan, choose_plan, shape_of, shortfall
from localqwen.probe import ensure_loadable
from localqwen.prompt_cache import DEFAULT_MAX_BYTES, PromptCache, setting_key
from localqwen.sampler import Sampler
from localqwen.sampling import Sampling
from localqwen.stream import Stream
from localqwen.template_check import chat_renderer, check_template

if TYPE_CHECKING:
    from localqwen.agent import AgentRun

# ggml type ids for the KV cache (ggml.h: GGML_TYPE_F16 = 1, GGML_TYPE_Q4_0 = 2, GGML_TYPE_Q8_0 = 8).
GGML_KV_TYPE_IDS = {"f16": 1, "q8_0": 8, "q4_0": 2}
# What closes thinking when its budget runs out.
WRAP_UP_TEXT = THINKING_WRAP_UP_TEXT


class Model:
    def __init__(self, llama_model: Any, context: Any, meta: ModelMetadata, plan: MemoryPlan, load_s: float,
                 prompt_cache: PromptCache | None = None, loop_guard: bool = True) -> None:
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
        # Every end-of-generation token llama.cpp knows for this vocabulary (<|im_end|>, <|endoftext|>, and the FIM
        # ends <|fim_pad|>, <|repo_name|>, <|file_sep|>): a finished grammar allows only these.
        end_ids = {IM_END_ID, ENDOFTEXT_ID} | {i for i in range(self.n_vocab) if self._vocab.attributes(i) & special
                                               and llama_cpp.llama_vocab_is_eog(llama_model.vocab, i)}
        self.prompt_cache, self.loop_guard = prompt_cache, loop_guard
        self._engine = Engine(llama_model, context, n_slots=plan.n_seq, n_ctx_seq=plan.n_ctx_seq, n_batch=plan.n_batch,
                              end_ids=end_ids, wrap_up_ids=self.wrap_up_ids, wrap_up_text=WRAP_UP_TEXT, load_s=load_s,
                              prompt_cache=prompt_cache)

    @classmethod
    def load(cls, path: str | Path, *, n_ctx: int | str = "auto", kv_type: str = "f16", flash_attn: bool | None = None,
             gpu_layers: int | str = "auto", threads: int | None = None, max_ctx: int | None = None,
             parallel: int | str = 1, prompt_cache: str | Path | bool = False,
             prompt_cache_bytes: int = DEFAULT_MAX_BYTES, loop_guard: bool = True) -> Model:
        """Load a GGUF for `parallel` generations at once, each with a context of `n_ctx` tokens (they share one
        KV cache of parallel x n_ctx). n_ctx="auto" takes the largest that fits free memory, up to `max_ctx`;
        parallel="auto" as many generations as fit with 8K tokens each (at most 4 on the CPU, 8 on a GPU).
        prompt_cache: keep long prompts' KV cache on disk (localqwen.prompt_cache), in this folder, or in the
        store's with True; at most prompt_cache_bytes. loop_guard: the default of every generation's loop guard."""
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
            detail = last_error() or str(exc)
            raise ModelFileError(f"llama.cpp could not load the model ({detail})", path) from None
        cache = None
        if prompt_cache is not False:
            folder = paths.home() / "prompt-cache" if prompt_cache is True else Path(prompt_cache)
            key = setting_key(path, plan.kv_type, plan.flash_attn)
            cache = PromptCache(folder / key, max_bytes=prompt_cache_bytes)
        return cls(llama_model, context, meta, plan, time.perf_counter() - started, cache, loop_guard)

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

    def chat(self, messages: list[Any], *, tools: list[Any] | None = None, tool_choice: str = "auto",
             parallel_tool_calls: bool = True, schema: Any = None, max_tokens: int | None = None,
             thinking_budget: int | None = None, answer_reserve: int | None = None,
             stop: str | list[str] | None = None, loop_guard: bool | None = None, wait: float | None = None,
             **sampling: Any) -> Stream:
        """Stream the reply to `messages` as events (`for` or `async for`).

        tool_choice: "auto" (the model may call `tools`; every call it starts is a valid one), "required" (it must
        call one or more), a tool's name (it must call that one), "none" (no calls); parallel_tool_calls=False: at
        most one call (the reply ends with it). schema: a JSON Schema or a pydantic model class the answer must
        match (the thinking stays free; Reply.collect parses the answer). stop: strings that end the answer (never
        the thinking, nor an answer a schema or tool_choice constrains: the grammar ends it, a stop string would
        cut it). loop_guard: wrap up thinking that repeats itself
        (default: the model's, on unless loaded with loop_guard=False).
        wait: seconds to wait for a free slot before ModelBusy (None: as long as it takes). Sampling overrides:
        temperature, top_p, top_k, min_p, presence_penalty, seed."""
        prompt = self.tokenize_chat(messages, tools)
        return self.generate(prompt, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                             schema=schema, max_tokens=max_tokens,
                             thinking_budget=thinking_budget, answer_reserve=answer_reserve, stop=stop,
                             loop_guard=loop_guard, wait=wait, **sampling)

    achat = chat  # the same stream serves `async for`; the name reads well in async code

    def act(self, messages: list[Any], *, tools: Iterable[Any], on_call: Any = None, max_rounds: int | None = None,
            **options: Any) -> AgentRun:
        """Run the tool loop (localqwen.agent): generate, run the model's tool calls, give it their results, until
        it answers or `max_rounds` generations have run. `tools`: Python functions, localqwen Tools, MCP servers'
        tools; `on_call(call)` may approve (True), refuse (False or a reason), or change (a dict of arguments) each
        call; other options go to every round's `chat`. Iterate the run (`for` or `async for`) for its events."""
        from localqwen.agent import DEFAULT_MAX_ROUNDS, AgentRun  # imported on use: it brings in pydantic

        return AgentRun(self.chat, messages, tools, on_call=on_call,
                        max_rounds=DEFAULT_MAX_ROUNDS if max_rounds is None else max_rounds, **options)

    aact = act  # the same run serves `async for`

    def generate(self, prompt: Sequence[int], *, tools: list[Any] | None = None, tool_choice: str = "auto",
                 parallel_tool_calls: bool = True, schema: Any = None, max_tokens: int | None = None,
                 thinking_budget: int | None = None, answer_reserve: int | None = None, thinking: bool = True,
                 stop: str | list[str] | None = None, loop_guard: bool | None = None, wait: float | None = None,
             **sampling: Any) -> Stream:
        """Stream events for raw prompt tokens. `thinking`: the prompt leaves the model inside `<think>`; the other
        arguments as for chat() (`tools` here only shape the tool-call grammars: they are the prompt's business)."""
        options = self.sampling.with_overrides(**sampling)
        if not prompt:
            raise BadRequest("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(len(prompt), self.n_ctx)
        limits = Limits.for_reply(room=self.n_ctx - len(prompt), max_tokens=max_tokens,
                                  thinking_budget=thinking_budget, answer_reserve=answer_reserve,
                                  wrap_up_tokens=self.wrap_up_tokens)
        answer_format, grammars, banned = answer_constraints(tools, tool_choice, schema,
                                                             one_call=not parallel_tool_calls)
        stops = [] if answer_format else [stop] if isinstance(stop, str) else list(stop or [])
        turn = Turn(len(prompt), limits, thinking=thinking, stops=stops, one_call=not parallel_tool_calls,
                    loop_guard=self.loop_guard if loop_guard is None else loop_guard)
        seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little")
        sampler = Sampler(self._vocab.handle, self.n_vocab, options, seed, grammars=grammars, banned=banned)
        request = Request(list(prompt), turn, sampler, wait)
        return Stream(lambda: self._engine.submit(request), answer_format)

    def cancel(self) -> None:
        """Stop every generation, running or waiting (from any thread); each stream ends with "cancelled"."""
        self._engine.cancel_all()

    def end_thinking(self) -> None:
        """Ask every running generation that is thinking to answer now (from any thread): the thinking is closed
        for it with the budget's wrap-up. One stream: `stream.end_thinking()`."""
        self._engine.end_thinking_all()

    def close(self) -> None:
        self._renderer.close()
        self._engine.close()
        self._context.close()
        self._model.close()


def answer_constraints(tools: list[Any] | None, tool_choice: str, schema: Any, *, one_call: bool = False,
                       ) -> tuple[AnswerFormat | None, dict[str, str], list[int]]:
    """What constrains the output after the thinking: the answer's format, the grammars by the span they apply to
    (localqwen.constrain), and the tokens never to sample."""
    answer_format, grammars, banned = None, {}, []
    if tool_choice == "none":
        banned = [TOOL_CALL_OPEN_ID]
    elif tools:
        grammars["call"] = call_body(tools)
        if tool_choice != "auto":
            if schema is not None:
                raise BadRequest("a schema for the answer and a required tool call exclude each other")
            answer_format = calls_only(tools, None if tool_choice == "required" else [tool_choice], one=one_call)
    elif tool_choice != "auto":
        raise BadRequest(f"tool_choice {tool_choice!r} needs tools to call")
    if schema is not None:
        answer_format = json_answer(schema)
    if answer_format is not None:
        grammars["answer"] = answer_format.grammar
    return answer_format, grammars, banned


def default_threads() -> int:
    """Physical cores: decode is memory-bound and hyperthreads only add contention."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
