"""Continuous batching: one llama.cpp context, N sequence slots sharing a unified KV cache, one scheduler thread.

Each step decodes one batch that holds the next token of every running sequence and chunks of the prompts being
evaluated, so a long new prompt shares steps with the running streams instead of stalling them. A sequence that
finishes or is cancelled frees its slot at once; a waiting request takes it at the next step, placed in the slot
whose cached tokens share the longest prefix with its prompt (as llama-server does). Each slot's tokens stay in the
cache after its sequence ends, for the next request that starts the same way.

Only the scheduler thread touches llama.cpp's context. Callers talk to it through `submit` (a Request in, a
Channel of events out) and the flags a `Sequence` carries (cancel, end thinking). What a reply does token by token
is generation.Turn; how a token is drawn is sampler.Sampler.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from localqwen.backend import CancelFlag, Vocab
from localqwen.errors import LocalqwenError, ModelBusy
from localqwen.events import Event, WrapUp
from localqwen.generation import Turn, timings
from localqwen.prompt_cache import PromptCache
from localqwen.sampler import Sampler
from localqwen.stream import END, MAX_AHEAD, Channel

# Prompt tokens evaluated per step while other sequences stream: a 4B model on 2 CPU cores takes ~4 s for 128, so
# running streams pause that long at most, and the prompt still advances in batches that use the matmuls well.
PROMPT_CHUNK_BESIDE_STREAMS = 128


@dataclass
class Request:
    """One generation asked of the engine."""

    prompt: list[int]
    turn: Turn
    sampler: Sampler  # with its grammars, by the span they constrain: "answer" (all after the thinking), "call"
    wait: float | None  # seconds to wait for a slot (None: as long as it takes)


@dataclass
class Slot:
    """A sequence id of the context: the tokens its KV cache holds, and the sequence running in it (if any)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    sequence: Sequence | None = None
    last_used: float = 0.0


class Sequence:
    """A submitted request: what it still has to evaluate, its sampler, where its events go, and its controls."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self.engine, self.request, self.turn = engine, request, request.turn
        self.channel = Channel(on_taken=engine.notify)
        self.slot: Slot | None = None
        self.pending: list[int] = []  # tokens to evaluate next (prompt, sampled token, wrap-up)
        self.cancelled = False
        self.wants_answer = False  # end_thinking() was asked
        self.in_call = False  # inside a tool call's body at the last sample
        self.started = self.first_token_at = 0.0

    @property
    def sampler(self) -> Sampler:
        return self.request.sampler

    @property
    def runnable(self) -> bool:
        return bool(self.pending) and not self.cancelled and self.channel.backlog < MAX_AHEAD

    def cancel(self) -> None:
        self.engine.cancel(self)

    def end_thinking(self) -> None:
        self.wants_answer = True
        self.engine.notify()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class Engine:
    def __init__(self, llama_model: Any, context: Any, *, n_slots: int, n_ctx_seq: int, n_batch: int,
                 end_ids: set[int], wrap_up_ids: list[int], wrap_up_text: str, load_s: float,
                 prompt_cache: PromptCache | None = None) -> None:
        import llama_cpp

        self._lib, self._model, self._context = llama_cpp, llama_model, context
        self.ctx, self._memory = context.ctx, context.memory
        self.vocab = Vocab(llama_model)
        self.slots = [Slot(i) for i in range(n_slots)]
        self.n_batch, self.n_ctx_seq, self.end_ids, self.load_s = n_batch, n_ctx_seq, end_ids, load_s
        self.prompt_cache = prompt_cache
        self.wrap_up_ids, self.wrap_up_text = wrap_up_ids, wrap_up_text
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._abort = CancelFlag(self.ctx)  # llama_decode stops mid-batch when every sequence in it is cancelled
        self._in_flight: list[Sequence] = []
        self._waiting: deque[tuple[Sequence, float | None]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="localqwen-engine", daemon=True)
        self._thread.start()

    # --- the callers' side (any thread) ----------------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(slot.sequence is not None for slot in self.slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: Request) -> Sequence:
        """Queue a request; ModelBusy at once if it may not wait (wait=0) and every slot is taken."""
        sequence = Sequence(self, request)
        with self._wake:
            if self._closed:
                raise LocalqwenError("the model is closed")
            if request.wait == 0 and (self._waiting or self.running >= len(self.slots)):
                raise ModelBusy("the model is busy with other generations")
            deadline = None if request.wait is None else time.monotonic() + request.wait
            self._waiting.append((sequence, deadline))
            self._wake.notify()
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        sequence.cancelled = True
        with self._wake:
            if self._in_flight and all(s.cancelled for s in self._in_flight):
                self._abort.set()  # nobody wants what the batch in flight computes
            self._wake.notify()

    def end_thinking_all(self) -> None:
        with self._wake:
            for slot in self.slots:
                if slot.sequence is not None:
                    slot.sequence.wants_answer = True
            self._wake.notify()

    def cancel_all(self) -> None:
        with self._wake:
            sequences = [s.sequence for s in self.slots if s.sequence] + [s for s, _ in self._waiting]
        for sequence in sequences:
            self.cancel(sequence)

    def close(self) -> None:
        self.cancel_all()
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        self._lib.llama_batch_free(self._batch)

    def notify(self) -> None:
        with self._wake:
            self._wake.notify()

    # --- the scheduler thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                self._admit()
                active = [s.sequence for s in self.slots if s.sequence is not None]
                if self._closed and not active:
                    return
                if not any(s.runnable or s.cancelled for s in active):
                    self._wake.wait(timeout=self._next_deadline())
                    continue
            try:
                self._step(active)
            except Exception as exc:  # a bug here must not leave readers waiting forever on a dead thread
                for sequence in active:
                    sequence.channel.put(LocalqwenError(f"generation failed: {type(exc).__name__}: {exc}"))
                    sequence.cancelled = True

    def _next_deadline(self) -> float | None:
        deadlines = [d for _, d in self._waiting if d is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _admit(self) -> None:
        """Place waiting requests in free slots, in order (called holding the lock); then drop the cancelled ones
        and refuse those whose wait for a slot is over."""
        for item in [item for item in self._waiting if item[0].cancelled]:
            self._waiting.remove(item)
            item[0].turn.stop("cancelled")
            self._finish(item[0])
        while self._waiting and (free := [s for s in self.slots if s.sequence is None]):
            sequence, _ = self._waiting.popleft()
            prompt = sequence.request.prompt
            slot = max(free, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))
            self._place(sequence, slot)
        now = time.monotonic()
        for item in [item for item in self._waiting if item[1] is not None and now >= item[1]]:
            self._waiting.remove(item)
            item[0].channel.put(ModelBusy("the model is busy with other generations"))
            item[0].channel.put(END)

    def _place(self, sequence: Sequence, slot: Slot) -> None:
        prompt, turn = sequence.request.prompt, sequence.turn
        if self.prompt_cache is not None:
            self._restore(slot, prompt)
        keep = min(common_prefix(slot.tokens, prompt), len(prompt) - 1)  # the last prompt token gives the logits
        self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
        del slot.tokens[keep:]
        slot.sequence, sequence.slot = sequence, slot
        turn.stats.cached_prompt_tokens = keep
        sequence.pending = prompt[keep:]
        sequence.started = time.perf_counter()
        sequence.channel.put([])  # no events yet: it tells a reader waiting for the start that a slot was found
        if turn.budget_spent:  # a thinking budget of 0: the wrap-up follows the prompt at once
            self._wrap_up(sequence, [], "budget")

    def _restore(self, slot: Slot, prompt: list[int]) -> None:
        """Fill the slot from the prompt cache on disk when a saved prompt shares a longer start with `prompt` than
        the slot does."""
        assert self.prompt_cache is not None
        found = self.prompt_cache.best(prompt, better_than=common_prefix(slot.tokens, prompt), room=self.n_ctx_seq)
        if found is None:
            return
        self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, 0, -1)
        slot.tokens = self.prompt_cache.restore(self.ctx, slot.seq_id, found[0]) or []

    def _save(self, sequence: Sequence) -> None:
        """Save the prompt's state once it is evaluated (the slot then holds exactly the prompt)."""
        slot, prompt = sequence.slot, sequence.request.prompt
        if self.prompt_cache is not None and slot is not None and slot.tokens == prompt \
                and self.prompt_cache.wants(prompt):
            self.prompt_cache.save(self.ctx, slot.seq_id, prompt)

    def _step(self, active: list[Sequence]) -> None:
        for sequence in active:
            if sequence.cancelled:
                sequence.turn.stop("cancelled")
                self._finish(sequence)
        chunks = self._fill_batch([s for s in active if s.runnable and s.slot is not None])
        if not chunks:
            return
        with self._wake:
            self._in_flight = [s for s, _, _ in chunks]
            if all(s.cancelled for s in self._in_flight):
                self._abort.set()
        try:
            status = self._lib.llama_decode(self.ctx, self._batch)
        finally:
            with self._wake:
                self._in_flight = []
                self._abort.clear()
        if status not in (0, 2):  # 2: aborted by cancel, the whole ubatches before it are kept
            for sequence, _, _ in chunks:
                sequence.channel.put(LocalqwenError(f"llama.cpp could not evaluate the batch (llama_decode: {status})"))
                sequence.cancelled = True
            return
        for sequence, chunk, row in chunks:
            slot = sequence.slot
            assert slot is not None
            held = self._lib.llama_memory_seq_pos_max(self._memory, slot.seq_id) + 1  # what the cache now holds
            done = max(0, min(len(chunk), held - len(slot.tokens)))
            slot.tokens += chunk[:done]
            del sequence.pending[:done]
            if status == 0 and row is not None:
                self._sampled(sequence, sequence.sampler.sample(self.ctx, row, self._grammar(sequence)))

    def _fill_batch(self, runnable: list[Sequence]) -> list[tuple[Sequence, list[int], int | None]]:
        """The next batch: one token of each decoding sequence first, then prompt chunks in the room left. Returns
        (sequence, its tokens in the batch, the batch row whose logits it samples from, or None)."""
        batch, room, chunks = self._batch, self.n_batch, []
        batch.n_tokens = 0
        decoding = sum(len(s.pending) == 1 for s in runnable)
        if decoding:  # keep the running streams' steps short while a prompt is evaluated beside them
            room = min(room, decoding + PROMPT_CHUNK_BESIDE_STREAMS)
        for sequence in sorted(runnable, key=lambda s: len(s.pending) > 1):  # decoding ones first
            if room <= 0:
                break
            chunk = sequence.pending[:room]
            slot = sequence.slot
            assert slot is not None
            start = len(slot.tokens)
            for i, token in enumerate(chunk):
                j = batch.n_tokens + i
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, start + i, 1
                batch.seq_id[j][0], batch.logits[j] = slot.seq_id, False
            batch.n_tokens += len(chunk)
            room -= len(chunk)
            row = None
            if len(chunk) == len(sequence.pending):  # the chunk ends what it had to evaluate: sample after it
                row = batch.n_tokens - 1
                batch.logits[row] = True
            chunks.append((sequence, chunk, row))
        return chunks

    def _grammar(self, sequence: Sequence) -> str | None:
        """The grammar the next token must follow: the answer's, from the end of the thinking on; a tool call's
        body's, from the model's `<tool_call>` (also while thinking) to its `</tool_call>`; or none."""
        parser, grammars = sequence.turn.parser, sequence.sampler.grammars
        entered_call = parser.in_call and not sequence.in_call
        sequence.in_call = parser.in_call
        if "answer" in grammars and not parser.in_thinking:
            return "answer"
        if "call" in grammars and parser.in_call:
            if entered_call:
                sequence.sampler.restart("call")
            return "call"
        return None

    def _sampled(self, sequence: Sequence, token: int) -> None:
        turn = sequence.turn
        if not sequence.first_token_at:
            sequence.first_token_at = time.perf_counter()
            self._save(sequence)
        if sequence.cancelled:
            turn.stop("cancelled")
        elif token not in self.end_ids:
            events = turn.token(self.vocab.piece(token), token)
            if not (turn.out_of_tokens or turn.stopped):
                if (reason := self._wrap_up_reason(sequence)) is not None:
                    self._wrap_up(sequence, events, reason, token)
                else:
                    sequence.pending = [token]
                    sequence.channel.put(events)
                return
            sequence.channel.put(events)
            if turn.out_of_tokens:
                turn.stop("length")
        self._finish(sequence)

    @staticmethod
    def _wrap_up_reason(sequence: Sequence) -> WrapUp | None:
        turn = sequence.turn
        if turn.budget_spent:
            return "budget"
        if sequence.wants_answer and turn.can_wrap_up:
            return "answer_now"
        return "loop_guard" if turn.looping else None

    def _wrap_up(self, sequence: Sequence, events: list[Event], reason: WrapUp, token: int | None = None) -> None:
        """Close the thinking for the model (budget spent, asked to answer now, looping): the wrap-up is evaluated
        after `token` (the last sampled one, if any) and the model goes on from there."""
        sequence.pending = [*sequence.pending, *([token] if token is not None else []), *self.wrap_up_ids]
        for wrap_token in self.wrap_up_ids:
            sequence.sampler.accept(wrap_token)
        sequence.channel.put(events + sequence.turn.forced(self.wrap_up_text, len(self.wrap_up_ids), reason))

    def _finish(self, sequence: Sequence) -> None:
        """End a sequence: free its sampler and slot first (a reader that sees the end may submit again at once),
        then send its last events and the end of the channel."""
        turn = sequence.turn
        events = turn.finish()
        stats = turn.stats
        first = sequence.first_token_at or None
        stats.timings = timings(self.load_s, sequence.started or time.perf_counter(), first, time.perf_counter(),
                                stats.prompt_tokens - stats.cached_prompt_tokens, stats.completion_tokens)
        sequence.sampler.close()
        if sequence.slot is not None:
            sequence.slot.sequence, sequence.slot.last_used = None, time.monotonic()
        sequence.pending = []
        sequence.channel.put([*events, Event("done", stats=stats)])
        sequence.channel.put(END)
