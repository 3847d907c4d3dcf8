"""Quantization quality: KL divergence, top-1 agreement and perplexity of each quant against the bf16 GGUF.

    python bench/quality.py --shape 4b --quants q8_0 q4_k_m --chunks 6

Computed as llama.cpp's perplexity tool does with --kl-divergence: the corpus is cut into chunks of --ctx tokens,
each chunk is evaluated from an empty KV cache, and only the second half of each chunk is scored (token i + 1
predicted from the logits at i, for i from ctx/2 to ctx - 2). The bf16 log-probabilities are kept on disk (float32,
exact; llama.cpp stores them as 16-bit and skips p < e^-16 in the KL sum, so its last digits can differ).
The corpus is the model card and config text in ../shared/seeds. On random-weight checkpoints these numbers say
how far each quant moves the logits, not how good the model is: perplexities of random models are meaningless.
"""

from __future__ import annotations

import math

import _common as c
import numpy as np

from localqwen.backend import open_llama
from localqwen.model import default_threads


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def chunk_log_probs(path, chunks: list[list[int]], ctx: int, threads: int):
    """Yield, per chunk, the log-softmax at positions ctx/2 .. ctx-2 (float64, [ctx/2 - 1, n_vocab])."""
    llama = open_llama(path, n_ctx=ctx, n_batch=ctx, n_ubatch=min(ctx, 512), logits_all=True, n_threads=threads)
    first = ctx // 2
    try:
        for chunk in chunks:
            llama.reset()
            llama.eval(chunk)
            yield log_softmax(llama.scores[first:ctx - 1])
    finally:
        llama.close()


def mean_unc(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as llama.cpp's mean_and_uncertainty."""
    return float(values.mean()), float(values.std() / math.sqrt(len(values) - 1))


def compare(base_path, quant_path, chunks, ctx: int, threads: int, store: np.memmap, base_done: bool) -> dict:
    """Stats of quant against base (base log-probs computed into `store` unless base_done)."""
    first = ctx // 2
    if not base_done:
        for k, logp in enumerate(chunk_log_probs(base_path, chunks, ctx, threads)):
            store[k] = logp
    nll, nll_base, kld, p_diff, same = [], [], [], [], []
    for k, logp in enumerate(chunk_log_probs(quant_path, chunks, ctx, threads)):
        base = np.asarray(store[k], dtype=np.float64)
        targets = np.asarray(chunks[k][first + 1:ctx])
        rows = np.arange(len(targets))
        nll.append(-logp[rows, targets])
        nll_base.append(-base[rows, targets])
        kld.append((np.exp(base) * (base - logp)).sum(axis=1))
        p_diff.append(np.exp(logp[rows, targets]) - np.exp(base[rows, targets]))
        same.append(logp.argmax(axis=1) == base.argmax(axis=1))
    nll, nll_base, kld, p_diff, same = map(np.concatenate, (nll, nll_base, kld, p_diff, same))
    ln_ppl, ln_ppl_unc = mean_unc(nll)
    ln_base, ln_base_unc = mean_unc(nll_base)
    cov = float(np.cov(nll, nll_base)[0, 1]) / (len(nll) - 1)
    kld_mean, kld_unc = mean_unc(kld)
    top = float(same.mean())
    return {"tokens_scored": int(len(nll)), "ppl_q": math.exp(ln_ppl), "ppl_q_unc": math.exp(ln_ppl) * ln_ppl_unc,
            "ppl_base": math.exp(ln_base), "ppl_base_unc": math.exp(ln_base) * ln_base_unc,
            "cor_ln_ppl": cov / (ln_ppl_unc * ln_base_unc) if ln_ppl_unc and ln_base_unc else float("nan"),
            "ln_ppl_ratio": ln_ppl - ln_base,
            "ln_ppl_ratio_unc": math.sqrt(max(0.0, ln_ppl_unc ** 2 + ln_base_unc ** 2 - 2 * cov)),
            "kld_mean": kld_mean, "kld_unc": kld_unc, "kld_median": float(np.median(kld)),
            "kld_99": float(np.percentile(kld, 99)), "kld_99_9": float(np.percentile(kld, 99.9)),
            "kld_max": float(kld.max()), "rms_dp_pct": 100 * float(np.sqrt((p_diff ** 2).mean())),
            "same_top_pct": 100 * top, "same_top_unc_pct": 100 * math.sqrt(top * (1 - top) / (len(same) - 1))}


def main() -> None:
    p = c.parser(__doc__)
    p.add_argument("--quants", nargs="+", default=["q8_0", "q4_k_m"])
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama.cpp's -c)")
    p.add_argument("--chunks", type=int, default=6, help="at most this many chunks of the corpus")
    p.add_argument("--threads", type=int, default=default_threads())
    args = p.parse_args()
    base_path, *paths = c.ggufs(args.shape, ["bf16", *args.quants], args.workdir)
    quant_paths = dict(zip(args.quants, paths, strict=True))
    info = c.machine()
    from localqwen.plan import read_shape

    probe = open_llama(base_path, n_ctx=256, n_threads=1)
    tokens = probe.tokenize(c.corpus().encode(), add_bos=False, special=False)
    probe.close()
    n_chunks = min(args.chunks, len(tokens) // args.ctx)
    if n_chunks < 1:
        raise SystemExit(f"the corpus has {len(tokens)} tokens: less than one chunk of {args.ctx}")
    chunks = [tokens[k * args.ctx:(k + 1) * args.ctx] for k in range(n_chunks)]
    n_vocab = read_shape(base_path).n_vocab
    store_path = args.workdir / "scratch" / f"base-logprobs-{args.shape}.f32"
    store_path.parent.mkdir(parents=True, exist_ok=True)
    store = np.memmap(store_path, dtype=np.float32, mode="w+", shape=(n_chunks, args.ctx // 2 - 1, n_vocab))
    rows = []
    try:
        with c.LoadWatch() as load:
            for i, (quant, path) in enumerate(quant_paths.items()):
                stats = compare(base_path, path, chunks, args.ctx, args.threads, store, base_done=i > 0)
                rows.append({"quant": quant, **{k: round(v, 6) if isinstance(v, float) else v
                                                for k, v in stats.items()}})
                print(f"{quant}: mean KLD {stats['kld_mean']:.6f} ± {stats['kld_unc']:.6f}, same top "
                      f"{stats['same_top_pct']:.2f}%, PPL(Q) {stats['ppl_q']:.4g} vs PPL(base) {stats['ppl_base']:.4g}",
                      flush=True)
    finally:
        del store
        store_path.unlink(missing_ok=True)
    print()
    print(c.table(rows, ["quant", "tokens_scored", "kld_mean", "kld_unc", "kld_99", "same_top_pct", "rms_dp_pct",
                         "ppl_q", "ppl_base", "ln_ppl_ratio"],
                  f"against {base_path.name}: {n_chunks} chunks of {args.ctx} tokens (random weights: not a quality "
                  "verdict)"))
    c.save("quality", args.shape, {"machine": info, "load": load.summary(), "shape": args.shape, "ctx": args.ctx,
                                   "chunks": n_chunks, "corpus_tokens": len(tokens), "base": base_path.name,
                                   "summary": rows})


if __name__ == "__main__":
    main()
