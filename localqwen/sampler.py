"""One sequence's sampler: llama.cpp's sampler chain, built from its Sampling settings as llama-cpp-python builds
it (so a seed gives the same tokens as llama-cpp-python's own loop), owned and freed here."""

from __future__ import annotations

from typing import Any

from localqwen.sampling import Sampling

PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size: the window presence_penalty looks at


class Sampler:
    """Samples the next token from one output row of a decoded batch; `accept` records tokens it did not choose
    (the thinking wrap-up), so penalties see the whole text."""

    def __init__(self, n_vocab: int, options: Sampling, seed: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        parts = [llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, 1.0, 0.0, options.presence_penalty)]
        if options.temperature == 0:
            parts.append(llama_cpp.llama_sampler_init_greedy())
        else:
            parts += [llama_cpp.llama_sampler_init_top_k(options.top_k),
                      llama_cpp.llama_sampler_init_typical(1.0, 1),
                      llama_cpp.llama_sampler_init_top_p(options.top_p, 1),
                      llama_cpp.llama_sampler_init_min_p(options.min_p, 1),
                      llama_cpp.llama_sampler_init_temp(options.temperature),
                      llama_cpp.llama_sampler_init_dist(seed)]
        for part in parts:
            llama_cpp.llama_sampler_chain_add(chain, part)  # the chain owns (and frees) its parts
        self._chain: Any = chain

    def sample(self, ctx: Any, row: int) -> int:
        """The token sampled from output `row` of the last decoded batch (accepted into the chain's history)."""
        return self._lib.llama_sampler_sample(self._chain, ctx, row)

    def accept(self, token: int) -> None:
        self._lib.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None
