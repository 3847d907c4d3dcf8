"""Many streams at once: localqwen's continuous batching against llama.cpp's own llama-server, and the prompt cache.

    python bench/parallel.py --shape 4b                         # N = 1, 2, 4, 8 concurrent streams, Q4_K_M
    python bench/parallel.py --shape 0.6b --restore-tokens 16384

For each N, in alternating rounds on the same GGUF and threads: localqwen (Model.load(parallel=N), N threads each
streaming one generation) and llama-server at its defaults with `-np N` (`-c` sized for N slots of the same context,
`--min-p 0` as localqwen sets the card's min_p; N concurrent /completion requests). Every stream has its own prompt
of --prompt-tokens (distinct corpus windows: no shared prefix; new ones each round, so nothing is reused from a
cache) and generates exactly --gen tokens (random weights never end their turn; llama-server gets ignore_eos).
Reported per N: total generated tokens per second (all streams' tokens over the wall time from the first request to
the last token, prompts included) and the ratio; the decode throughput once every stream is generating (what
batching multiplies); each against one stream; mean time to first token.

The prompt cache: a --restore-tokens prompt evaluated from scratch (time to first token), then, in a newly loaded
model, the same prompt restored from the disk cache.
"""

from __future__ import annotations

import concurrent.futures as futures
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import _common as c
import httpx
from llama_server import LlamaServer

from localqwen.model import Model, default_threads

COLUMNS = ["streams", "localqwen_tok_s", "server_tok_s", "ratio", "localqwen_vs_one", "localqwen_decode_tok_s",
           "server_decode_tok_s", "localqwen_decode_vs_one", "server_decode_vs_one", "localqwen_ttft_s",
           "server_ttft_s"]
SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}


def windows(model: Model, n_tokens: int, count: int) -> list[list[int]]:
    tokens = model.tokenize(c.corpus())
    while len(tokens) < n_tokens + 97 * count:
        tokens += tokens
    return [tokens[97 * i:97 * i + n_tokens] for i in range(count)]


def localqwen_round(model: Model, prompts: list[list[int]], gen: int, seed: int) -> dict[str, Any]:
    def one(i: int) -> tuple[float, int, list[float]]:
        started, stamps, count = time.perf_counter(), [], 0
        for event in model.generate(prompts[i], max_tokens=gen, answer_reserve=0, seed=seed + i, **SAMPLING):
            if event.stats is not None:
                count = event.stats.completion_tokens
            else:  # one event per token here (random weights, no markers)
                stamps.append(time.perf_counter())
        return started, count, stamps

    started = time.perf_counter()
    with futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, range(len(prompts))))
    return summary(results, started)


def server_round(url: str, prompts: list[list[int]], gen: int, seed: int) -> dict[str, Any]:
    def one(i: int) -> tuple[float, int, list[float]]:
        body = {"prompt": prompts[i], "n_predict": gen, "ignore_eos": True, "stream": True, "cache_prompt": False,
                "seed": seed + i, "temperature": SAMPLING["temperature"], "top_p": SAMPLING["top_p"],
                "top_k": SAMPLING["top_k"], "min_p": SAMPLING["min_p"]}
        started, stamps = time.perf_counter(), []
        with httpx.stream("POST", f"{url}/completion", json=body, timeout=3600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: ") and '"stop":false' in line.replace(" ", ""):
                    stamps.append(time.perf_counter())
        return started, len(stamps), stamps

    started = time.perf_counter()
    with futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, range(len(prompts))))
    return summary(results, started)


def summary(results: list[tuple[float, int, list[float]]], started: float) -> dict[str, Any]:
    """Totals over the streams: tokens per second from the first request to the last token (prompts included), the
    decode throughput once every stream is generating (tokens after the last stream's first token, over that span:
    what batching multiplies), and the mean time to first token."""
    end = max(stamps[-1] for _, _, stamps in results)
    all_decoding = max(stamps[0] for _, _, stamps in results)
    decoded = sum(1 for _, _, stamps in results for t in stamps if t > all_decoding)
    tokens = sum(n for _, n, _ in results)
    return {"tokens": tokens, "wall_s": round(end - started, 3), "tokens_per_s": round(tokens / (end - started), 2),
            "decode_tok_s": round(decoded / (end - all_decoding), 2) if end > all_decoding else None,
            "ttft_s": round(statistics.mean(stamps[0] - begun for begun, _, stamps in results), 3)}


def concurrency(path: Path, args: Any) -> list[dict[str, Any]]:
    rows = []
    for n in args.streams:
        model = Model.load(path, n_ctx=args.ctx, threads=args.threads, parallel=n)
        # New prompts every round: localqwen's slots keep the last prompt's cache, which a repeat would reuse.
        every = windows(model, args.prompt_tokens, n * args.reps)
        server_args = ["-np", str(n), "-c", str(args.ctx * n), "-t", str(args.threads), "--min-p", "0",
                       "--no-webui"]
        pairs = []
        with LlamaServer.start(path, server_args, log=args.workdir / f"llama-server-np{n}.log") as server:
            for rep in range(args.reps):
                seed, prompts = 100 * rep, every[n * rep:n * (rep + 1)]
                order = ("localqwen", "server") if rep % 2 == 0 else ("server", "localqwen")
                result = {}
                for who in order:
                    result[who] = (localqwen_round(model, prompts, args.gen, seed) if who == "localqwen"
                                   else server_round(server.url, prompts, args.gen, seed))
                pairs.append(result)
        model.close()
        ratio = statistics.median(p["localqwen"]["tokens_per_s"] / p["server"]["tokens_per_s"] for p in pairs)
        row = {"streams": n,
               "localqwen_tok_s": c.median([p["localqwen"]["tokens_per_s"] for p in pairs]),
               "server_tok_s": c.median([p["server"]["tokens_per_s"] for p in pairs]),
               "ratio": round(ratio, 3),
               "localqwen_decode_tok_s": c.median([p["localqwen"]["decode_tok_s"] for p in pairs]),
               "server_decode_tok_s": c.median([p["server"]["decode_tok_s"] for p in pairs]),
               "localqwen_ttft_s": c.median([p["localqwen"]["ttft_s"] for p in pairs]),
               "server_ttft_s": c.median([p["server"]["ttft_s"] for p in pairs]), "rounds": pairs}
        print(f"N={n}: localqwen {row['localqwen_tok_s']} tok/s, llama-server {row['server_tok_s']} tok/s, "
              f"ratio {row['ratio']}", flush=True)
        rows.append(row)
    one = rows[0] if rows and rows[0]["streams"] == 1 else None
    for row in rows:  # what N streams give over one, in total and in decode throughput (llama-server's too)
        for key in ("localqwen_tok_s", "localqwen_decode_tok_s", "server_decode_tok_s"):
            row[f"{key.removesuffix('_tok_s')}_vs_one"] = round(row[key] / one[key], 2) if one else None
    return rows


def restore(path: Path, args: Any) -> dict[str, Any]:
    cache = args.workdir / "prompt-cache-bench"
    shutil.rmtree(cache, ignore_errors=True)
    ctx = args.restore_tokens + 256
    timings = {}
    for run in ("evaluate", "restore"):
        model = Model.load(path, n_ctx=ctx, threads=args.threads, prompt_cache=cache)
        [prompt] = windows(model, args.restore_tokens, 1)
        started = time.perf_counter()
        stats = [e.stats for e in model.generate(prompt, max_tokens=1, **SAMPLING) if e.stats][0]
        timings[run] = {"ttft_s": round(time.perf_counter() - started, 3), "cached": stats.cached_prompt_tokens}
        if run == "evaluate":  # the state is written in the background: wait for it
            deadline = time.monotonic() + 600
            while not list(cache.glob("*/*.json")) and time.monotonic() < deadline:
                time.sleep(0.2)
        model.close()
    size = sum(p.stat().st_size for p in cache.glob("*/*.state"))
    shutil.rmtree(cache, ignore_errors=True)
    return {"prompt_tokens": args.restore_tokens, **timings, "state_bytes": size,
            "speedup": round(timings["evaluate"]["ttft_s"] / timings["restore"]["ttft_s"], 1)}


def main() -> None:
    p = c.parser(__doc__)
    p.add_argument("--quant", default="q4_k_m")
    p.add_argument("--streams", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen", type=int, default=64, help="tokens each stream generates")
    p.add_argument("--ctx", type=int, default=1024, help="context per stream")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--reps", type=int, default=2, help="alternating rounds per N")
    p.add_argument("--restore-tokens", type=int, default=16384, help="0: skip the prompt-cache measurement")
    args = p.parse_args()
    path = c.gguf(args.shape, args.quant, args.workdir)
    info = c.machine()
    with c.LoadWatch() as load:
        rows = concurrency(path, args) if args.streams else []
        cache = restore(path, args) if args.restore_tokens else None
    print(c.table(rows, COLUMNS, f"parallel streams, {args.shape} {args.quant}"))
    if cache:
        print(f"prompt cache, {cache['prompt_tokens']} tokens: evaluate {cache['evaluate']['ttft_s']} s, restore "
              f"{cache['restore']['ttft_s']} s ({cache['speedup']}x), state {c.gb(cache['state_bytes'])} GB")
    c.save("parallel", args.shape, {"machine": info, "load": load.summary(), "settings": vars(args) | {
        "workdir": str(args.workdir)}, "streams": rows, "prompt_cache": cache})


if __name__ == "__main__":
    main()
