"""One sequence's sampler: llama.cpp's sampler chain, built from its Sampling settings as llama-cpp-python builds it
(so a seed gives the same tokens as llama-cpp-python's own loop), and the grammars that may constrain a span of the
output (the answer, or a tool call's body), owned and freed here.

A grammar is applied the way llama.cpp's own sampling does it (common/sampling.cpp): the free chain samples first
and the grammar checks only that token; only when it refuses, the grammar filters the whole vocabulary and the chain
samples again from what is left. Checking one candidate is cheap; filtering 151,936 of them is not, and a model that
follows the format rarely needs it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import Any

from localqwen.errors import BadRequest
from localqwen.sampling import Sampling

PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size: the window presence_penalty looks at
GRAMMAR_ROOT = b"answer"  # the start rule of every grammar localqwen.constrain writes


class Sampler:
    """Samples the next token from one output row of a decoded batch, under a named grammar or none."""

    def __init__(self, vocab: Any, n_vocab: int, options: Sampling, seed: int, *,
                 grammars: Mapping[str, str] | None = None, banned: Sequence[int] = ()) -> None:
        import llama_cpp

        self._lib, self._vocab, self._n_vocab = llama_cpp, vocab, n_vocab
        self._options, self._seed, self._banned = options, seed, list(banned)
        self._free = self._chain(None)
        self._grammars: dict[str, tuple[Any, Any]] = {}  # name -> (checker, constrained chain)
        self._grammar_at = 0  # where the grammar sits in a constrained chain
        try:
            for name, gbnf in (grammars or {}).items():
                self._grammars[name] = self._grammar(gbnf)
        except BaseException:
            self.close()
            raise
        self._candidate = llama_cpp.llama_token_data_array(
            data=(llama_cpp.llama_token_data * 1)(), size=1, selected=-1, sorted=False)

    def _chain(self, grammar: Any) -> Any:
        lib, o = self._lib, self._options
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        parts = []
        if o.presence_penalty:  # with no penalty the sampler does nothing: leave it (and its token history) out
            parts.append(lib.llama_sampler_init_penalties(self._n_vocab, PENALTY_LAST_N, 1.0, 0.0,
                                                          o.presence_penalty))
        if self._banned:
            biases = (lib.llama_logit_bias * len(self._banned))(*[(t, float("-inf")) for t in self._banned])
            parts.append(lib.llama_sampler_init_logit_bias(self._n_vocab, len(self._banned), biases))
        if grammar is not None:
            self._grammar_at = len(parts)
            parts.append(grammar)
        if o.temperature == 0:
            parts.append(lib.llama_sampler_init_greedy())
        else:
            parts += [lib.llama_sampler_init_top_k(o.top_k), lib.llama_sampler_init_typical(1.0, 1),
                      lib.llama_sampler_init_top_p(o.top_p, 1), lib.llama_sampler_init_min_p(o.min_p, 1),
                      lib.llama_sampler_init_temp(o.temperature), lib.llama_sampler_init_dist(self._seed)]
        for part in parts:
            lib.llama_sampler_chain_add(chain, part)  # the chain owns (and frees) its parts
        return chain

    def _grammar(self, gbnf: str) -> tuple[Any, Any]:
        lib = self._lib
        checker = lib.llama_sampler_init_grammar(self._vocab, gbnf.encode(), GRAMMAR_ROOT)
        if not checker:
            raise BadRequest("the answer's grammar does not parse (llama.cpp refused it)")
        return checker, self._chain(lib.llama_sampler_clone(checker))

    def sample(self, ctx: Any, row: int, grammar: str | None = None) -> int:
        """The token sampled from output `row` of the last decoded batch, within `grammar` if named."""
        lib = self._lib
        token = lib.llama_sampler_sample(self._free, ctx, row)
        if grammar is None:
            return token
        checker, constrained = self._grammars[grammar]
        if not self._allows(checker, token):
            token = lib.llama_sampler_sample(constrained, ctx, row)  # the whole vocabulary, filtered
            lib.llama_sampler_accept(checker, token)
        else:
            lib.llama_sampler_accept(checker, token)
            lib.llama_sampler_accept(constrained, token)
        return token

    def _allows(self, checker: Any, token: int) -> bool:
        candidate = self._candidate.data[0]
        candidate.id, candidate.logit, candidate.p = token, 0.0, 0.0
        self._candidate.size, self._candidate.selected = 1, -1
        self._lib.llama_sampler_apply(checker, ctypes.byref(self._candidate))
        return candidate.logit != float("-inf")

    def accept(self, token: int) -> None:
        """A token the model did not choose (the thinking wrap-up): recorded so penalties see it."""
        self._lib.llama_sampler_accept(self._free, token)

    @property
    def grammars(self) -> set[str]:
        return set(self._grammars)

    def restart(self, grammar: str) -> None:
        """Start `grammar` over (the next tool call's body); the chain's random state goes on."""
        checker, constrained = self._grammars[grammar]
        self._lib.llama_sampler_reset(checker)
        self._lib.llama_sampler_reset(self._lib.llama_sampler_chain_get(constrained, self._grammar_at))

    def __del__(self) -> None:
        self.close()  # a request that never ran must not keep its native chains

    def close(self) -> None:
        lib = self._lib
        for chain in (self._free, *(c for pair in self._grammars.values() for c in pair)):
            if chain:
                lib.llama_sampler_free(chain)
        self._free, self._grammars = None, {}
