"""Inference speed: localqwen's Python API, CLI and server against a raw llama.cpp loop on the same GGUF.

    python bench/inference.py --shape 4b --reps 4            # Q4_K_M, 512-token prompt, 128 generated tokens

"raw" drives llama.cpp through its C API (llama_decode on a batch, the same sampler chain in C: top_k, top_p,
min_p, temperature, dist with the same seed) over a context opened with the same parameters and threads as
localqwen's. Each round runs raw, API, CLI (and server) alternately on a fresh prompt of the same length (a
different window of the corpus: no KV reuse between runs), and ratios are taken within a round, each front end
against a raw run next to it. The API and its raw run swap places every other round (the second run of a pair
tends to be the slower one on this machine); the CLI and the server go first, because their raw replay needs
their counts.

- API: Model.generate(prompt_tokens, max_tokens=N, answer_reserve=0): exactly N sampled tokens.
- CLI: `localqwen run --json --max-tokens N` (a new process: startup + load + the chat path). The chat path keeps
  a quarter of max_tokens for the answer, so after about half the tokens it closes the thinking by feeding the
  wrap-up sentence (~25 tokens) in one batch; its raw comparison replays exactly that (same point, same tokens).
- server: `localqwen serve`, one streaming /v1/chat/completions request per round, timed at the client.
- llama-bench: llama.cpp's own benchmark at its defaults (`-p` and `-n` set to this run's lengths, one repetition
  per round: the default five are for its own statistics), next to a raw run; what a llama.cpp user measures.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import _common as c
from llama_server import binaries

from localqwen.backend import open_llama
from localqwen.generation import DEFAULT_ANSWER_RESERVE
from localqwen.model import GGML_KV_TYPE_IDS, Model, default_threads

# --- the raw llama.cpp loop ------------------------------------------------------------------------------------

class Raw:
    """llama.cpp through its C API only: what any wrapper is measured against."""

    def __init__(self, path, plan, threads: int) -> None:
        import llama_cpp as lc

        self.lc = lc
        self.llama = open_llama(path, n_ctx=plan.n_ctx, n_batch=plan.n_batch, n_ubatch=plan.n_ubatch, n_gpu_layers=0,
                                flash_attn=plan.flash_attn, type_k=GGML_KV_TYPE_IDS[plan.kv_type],
                                type_v=GGML_KV_TYPE_IDS[plan.kv_type], n_threads=threads)
        self.ctx, self.n_batch = self.llama.ctx, plan.n_batch
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.llama.close()

    def _decode(self, tokens: list[int], pos: int) -> None:
        lc, batch = self.lc, self.batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            batch.n_tokens = len(chunk)
            for j, token in enumerate(chunk):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, pos + start + j, 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = start + j == len(tokens) - 1
            if lc.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

    def _chain(self, sampling, seed: int) -> Any:
        lc = self.lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        # llama-cpp-python's chain for these settings, minus its no-op penalties (all 1/0) and typical (p = 1).
        for sampler in (lc.llama_sampler_init_top_k(sampling.top_k), lc.llama_sampler_init_top_p(sampling.top_p, 1),
                        lc.llama_sampler_init_min_p(sampling.min_p, 1),
                        lc.llama_sampler_init_temp(sampling.temperature), lc.llama_sampler_init_dist(seed)):
            lc.llama_sampler_chain_add(chain, sampler)
        return chain

    def generate(self, prompt: list[int], n: int, sampling, seed: int, inject_at: int | None = None,
                 inject: list[int] = ()) -> dict[str, Any]:
        """Evaluate prompt, then sample n tokens; after sampled token number inject_at, feed `inject` with it."""
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        chain = self._chain(sampling, seed)
        started = time.perf_counter()
        self._decode(prompt, 0)
        token = lc.llama_sampler_sample(chain, self.ctx, -1)
        first = time.perf_counter()
        out, pos = [token], len(prompt)
        while len(out) < n:
            feed = [token, *inject] if len(out) == inject_at else [token]
            self._decode(feed, pos)
            pos += len(feed)
            token = lc.llama_sampler_sample(chain, self.ctx, -1)
            out.append(token)
        finished = time.perf_counter()
        lc.llama_sampler_free(chain)
        generated = n + (len(inject) if inject_at is not None else 0)  # counted as localqwen counts completion tokens
        return {"prompt_tokens": len(prompt), "completion_tokens": generated, "ttft_s": first - started,
                "prompt_tokens_per_s": len(prompt) / (first - started),
                "tokens_per_s": (generated - 1) / (finished - first), "tokens": out}


class RawProcess:
    """The raw loop in a process of its own. Two llama.cpp models in one process slow each other down once both
    have run (4B Q4_K_M, AMD EPYC 2 cores: 14.6-14.9 tok/s decode alone, 10.9-11.4 together), so the API's process
    holds only localqwen's model, as an app's would."""

    def __init__(self, path: Path, plan: Any, threads: int) -> None:
        settings = {key: getattr(plan, key) for key in ("n_ctx", "n_batch", "n_ubatch", "flash_attn", "kv_type")}
        spawn = multiprocessing.get_context("spawn")
        self.conn, child = spawn.Pipe()
        self.process = spawn.Process(target=_raw_worker, args=(child, str(path), settings, threads), daemon=True)
        self.process.start()
        self.load_s = self.conn.recv()

    def generate(self, prompt: list[int], n: int, sampling: Any, seed: int, inject_at: int | None = None,
                 inject: list[int] = ()) -> dict[str, Any]:
        options = {key: getattr(sampling, key) for key in ("top_k", "top_p", "min_p", "temperature")}
        self.conn.send((prompt, n, options, seed, inject_at, list(inject)))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=30)


def _raw_worker(conn: Any, path: str, settings: dict[str, Any], threads: int) -> None:
    started = time.perf_counter()
    raw = Raw(path, SimpleNamespace(**settings), threads)
    conn.send(time.perf_counter() - started)
    while (request := conn.recv()) is not None:
        prompt, n, options, seed, inject_at, inject = request
        conn.send(raw.generate(prompt, n, SimpleNamespace(**options), seed, inject_at, inject))
    raw.close()


# --- localqwen's three front ends ------------------------------------------------------------------------------

def api_run(model: Model, prompt: list[int], n: int, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    first, stats, text = None, None, []
    for event in model.generate(prompt, max_tokens=n, answer_reserve=0, seed=seed):
        first = first or time.perf_counter()
        text.append(event.text)
        stats = event.stats or stats
    finished = time.perf_counter()
    t = stats.timings
    return {"prompt_tokens": stats.prompt_tokens, "cached_prompt_tokens": stats.cached_prompt_tokens,
            "completion_tokens": stats.completion_tokens, "ttft_s": t["prompt_eval_s"],
            "prompt_tokens_per_s": t["prompt_tokens_per_s"], "tokens_per_s": t["tokens_per_s"],
            "first_event_s": first - started, "wall_s": finished - started, "text": "".join(text)}


def cli_run(path, text: str, n: int, seed: int, n_ctx: int, threads: int) -> dict[str, Any]:
    cmd = [*c.LOCALQWEN, "run", "-m", str(path), "--ctx", str(n_ctx), "--threads", str(threads),
           "--max-tokens", str(n), "--seed", str(seed), "--json", text]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    reply = json.loads(done.stdout)
    t, usage = reply["timings"], reply["usage"]
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "thinking_tokens": usage["thinking_tokens"], "ttft_s": t["prompt_eval_s"],
            "prompt_tokens_per_s": t["prompt_tokens_per_s"], "tokens_per_s": t["tokens_per_s"], "load_s": t["load_s"],
            "wall_s": wall, "overhead_s": wall - t["load_s"] - t["prompt_eval_s"] - t["generation_s"],
            "text": reply["thinking"] + reply["content"]}


def llama_bench_run(path: Path, prompt_tokens: int, n: int) -> dict[str, Any]:
    """One pp + tg measurement by llama.cpp's llama-bench (its own context, batch, threads and flash-attention
    choice), in llama-bench's words: average tokens per second of each test."""
    cmd = [str(binaries()["llama-bench"]), "-m", str(path), "-p", str(prompt_tokens), "-n", str(n), "-r", "1",
           "-o", "json"]
    tests = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    prefill = next(t["avg_ts"] for t in tests if t["n_prompt"] > 0)
    decode = next(t["avg_ts"] for t in tests if t["n_gen"] > 0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "ttft_s": prompt_tokens / prefill,
            "prompt_tokens_per_s": prefill, "tokens_per_s": decode, "threads": tests[0]["n_threads"],
            "text": ""}


class Server:
    """`localqwen serve` in a child process; one streaming chat completion per call, timed at the client."""

    def __init__(self, path, n_ctx: int, threads: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.child = subprocess.Popen([*c.LOCALQWEN, "serve", "-m", str(path), "--ctx", str(n_ctx), "--threads",
                                       str(threads), "--port", str(self.port)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        import httpx

        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600)
        for _ in range(600):
            try:
                if self.http.get("/v1/models").status_code == 200:
                    return
            except httpx.TransportError:
                if self.child.poll() is not None:
                    raise RuntimeError("localqwen serve exited") from None
            time.sleep(0.5)
        raise RuntimeError("localqwen serve did not come up")

    def close(self) -> None:
        self.http.close()
        self.child.terminate()
        try:
            self.child.wait(30)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()

    def run(self, text: str, n: int, seed: int) -> dict[str, Any]:
        body = {"model": "local", "messages": [{"role": "user", "content": text}], "max_tokens": n, "seed": seed,
                "stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        first = last = None
        usage, parts = {}, []
        with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    piece = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
                    if piece:
                        first, last = first or time.perf_counter(), time.perf_counter()
                        parts.append(piece)
        completion = usage.get("completion_tokens", 0)
        thinking = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
        return {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": completion,
                "thinking_tokens": thinking, "ttft_s": first - started,
                "prompt_tokens_per_s": (usage.get("prompt_tokens") or 0) / (first - started),
                "tokens_per_s": (completion - 1) / (last - first) if last > first else 0.0, "text": "".join(parts)}


def python_overhead(model: Model, prompt: list[int], n: int, seed: int) -> dict[str, Any]:
    """Model.generate's own cost per token: its wall time minus the time spent inside llama.cpp's decode and
    sampling calls. Unlike the ratios above it does not depend on the machine's mood."""
    import llama_cpp as native  # the runtime calls llama.cpp through the package's names

    inside = [0.0]
    originals = {name: getattr(native, name) for name in ("llama_decode", "llama_sampler_sample")}

    def timed(fn: Any) -> Any:
        def call(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                inside[0] += time.perf_counter() - started
        return call

    for name, fn in originals.items():
        setattr(native, name, timed(fn))
    try:
        started = time.perf_counter()
        stats = [e.stats for e in model.generate(prompt, max_tokens=n, answer_reserve=0, seed=seed) if e.stats][-1]
        wall = time.perf_counter() - started
    finally:
        for name, fn in originals.items():
            setattr(native, name, fn)
    per_token_us = (wall - inside[0]) / stats.completion_tokens * 1e6
    step_ms = stats.timings["generation_s"] / max(stats.completion_tokens - 1, 1) * 1e3
    return {"completion_tokens": stats.completion_tokens, "python_us_per_token": round(per_token_us, 1),
            "decode_step_ms": round(step_ms, 2), "python_share_pct": round(per_token_us / (step_ms * 10), 3)}


# --- the benchmark ---------------------------------------------------------------------------------------------

def bare(text: str) -> str:
    return "".join(text.replace("</think>", "").split())


def prompt_windows(model: Model, n_tokens: int, rounds: int) -> list[list[int]]:
    """Distinct n_tokens-long windows of the corpus (repeated if short), one per round."""
    tokens = model.tokenize(c.corpus())
    while len(tokens) < n_tokens + 64 * rounds:
        tokens += tokens
    return [tokens[64 * i:64 * i + n_tokens] for i in range(rounds)]


def chat_text(model: Model, window: list[int], n_tokens: int) -> tuple[str, list[int]]:
    """A user message whose chat prompt is about n_tokens long, and that prompt's tokens."""
    overhead = len(model.tokenize_chat([{"role": "user", "content": "x"}])) - 1
    text = model.detokenize(window[:n_tokens - overhead])
    return text, model.tokenize_chat([{"role": "user", "content": text}])


def chat_replay(model: Model, result: dict[str, Any], n: int) -> tuple[int, list[int]] | None:
    """Where the chat path fed its thinking wrap-up (sampled tokens before it) and which tokens, from its counts."""
    reserve = min(n // 4, DEFAULT_ANSWER_RESERVE)
    if not reserve or n - reserve - model.wrap_up_tokens <= 0:
        return None
    return result["thinking_tokens"] - model.wrap_up_tokens, list(model.wrap_up_ids)


def main() -> None:
    p = c.parser(__doc__)
    p.add_argument("--quant", default="q4_k_m", help="GGUF type to run (made by localqwen convert on first use)")
    p.add_argument("--gguf", help="run this GGUF instead of the synthetic one")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen", type=int, default=128, help="tokens to generate")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--reps", type=int, default=4, help="rounds (even: the API and its raw run swap order)")
    p.add_argument("--skip", nargs="*", default=[], choices=["cli", "server", "llama-bench"])
    args = p.parse_args()
    path = Path(args.gguf) if args.gguf else c.gguf(args.shape, args.quant, args.workdir)
    n = args.gen
    info = c.machine()
    with open(path, "rb") as f:  # warm the page cache: loads below then compare like with like
        while f.read(64 << 20):
            pass

    loads = {"raw": [], "api": []}
    for _ in range(2):
        started = time.perf_counter()
        model = Model.load(path, n_ctx=args.ctx, threads=args.threads)
        loads["api"].append(time.perf_counter() - started)
        raw = RawProcess(path, model.plan, args.threads)
        loads["raw"].append(raw.load_s)
        if _ == 0:
            raw.close()
            model.close()
    sampling = model.sampling
    windows = prompt_windows(model, args.prompt_tokens, args.reps)
    fronts = ["api"] + [f for f in ("cli", "server", "llama-bench") if f not in args.skip]
    server = Server(path, args.ctx, args.threads) if "server" in fronts else None
    rounds: list[dict[str, Any]] = []
    with c.LoadWatch() as load, contextlib.ExitStack() as cleanup:
        if server:
            cleanup.callback(server.close)
        for rep, window in enumerate(windows):
            seed = 1000 + rep
            text, chat_prompt = chat_text(model, window, args.prompt_tokens)
            order = fronts[rep % len(fronts):] + fronts[:rep % len(fronts)]
            entry: dict[str, Any] = {"rep": rep, "loadavg": round(os.getloadavg()[0], 2)}
            for front in order:  # each front end next to its own raw run: pairs share the machine's mood
                if front == "api":  # the second run of a pair tends to be slower here: alternate who goes first
                    if rep % 2:
                        mine = api_run(model, window, n, seed)
                        base = raw.generate(window, n, sampling, seed)
                    else:
                        base = raw.generate(window, n, sampling, seed)
                        mine = api_run(model, window, n, seed)
                    # Same sampler, same seed: the same text (the API's events drop the </think> marker and trim
                    # whitespace at its edges, so compare without them).
                    mine["same_tokens_as_raw"] = bare(mine["text"]) == bare(model.detokenize(base["tokens"]))
                elif front == "cli":
                    mine = cli_run(path, text, n, seed, args.ctx, args.threads)
                    at, inject = chat_replay(model, mine, n) or (None, [])
                    sampled = mine["completion_tokens"] - len(inject)
                    base = raw.generate(chat_prompt, sampled, sampling, seed, at, inject)
                    mine["prompt_matches"] = mine["prompt_tokens"] == len(chat_prompt)
                elif front == "llama-bench":
                    mine = llama_bench_run(path, args.prompt_tokens, n)
                    base = raw.generate(window, n, sampling, seed)
                else:
                    mine = server.run(text, n, seed)
                    at, inject = chat_replay(model, mine, n) or (None, [])
                    sampled = mine["completion_tokens"] - len(inject)
                    base = raw.generate(chat_prompt, sampled, sampling, seed, at, inject)
                    mine["prompt_matches"] = mine["prompt_tokens"] == len(chat_prompt)
                base.pop("tokens")
                mine.pop("text")
                mine["x_raw_decode"] = round(mine["tokens_per_s"] / base["tokens_per_s"], 3)
                mine["x_raw_prefill"] = round(mine["prompt_tokens_per_s"] / base["prompt_tokens_per_s"], 3)
                mine["x_raw_ttft"] = round(base["ttft_s"] / mine["ttft_s"], 3)
                entry[front], entry[f"raw_for_{front}"] = mine, base
                print(f"round {rep + 1} {front:6} decode {mine['tokens_per_s']:6.2f} tok/s (raw "
                      f"{base['tokens_per_s']:6.2f}, x{mine['x_raw_decode']:.3f})  prefill "
                      f"{mine['prompt_tokens_per_s']:6.1f} tok/s (raw {base['prompt_tokens_per_s']:6.1f})  ttft "
                      f"{mine['ttft_s']:.2f} s", flush=True)
            rounds.append(entry)
        overhead = python_overhead(model, windows[0][:64], 64, seed=7)
    raw.close()
    model.close()

    rows = []
    for front in ["raw", *fronts]:
        if front == "raw":
            runs = [r["raw_for_api"] for r in rounds]
            ratios = {"x_raw_decode": 1.0, "x_raw_prefill": 1.0, "x_raw_ttft": 1.0}
        else:
            runs = [r[front] for r in rounds]
            ratios = {k: round(c.median([run[k] for run in runs]), 3)
                      for k in ("x_raw_decode", "x_raw_prefill", "x_raw_ttft")}
        row = {"front_end": {"raw": "raw llama.cpp (C API)", "api": "localqwen API (Model.generate)",
                             "cli": "localqwen run --json", "server": "localqwen serve (stream)",
                             "llama-bench": "llama.cpp's llama-bench (defaults)"}[front],
               "decode_tok_s": round(c.median([r["tokens_per_s"] for r in runs]), 2),
               "prefill_tok_s": round(c.median([r["prompt_tokens_per_s"] for r in runs]), 1),
               "ttft_s": round(c.median([r["ttft_s"] for r in runs]), 3), **ratios}
        if front in ("raw", "api"):
            row["load_s"] = round(min(loads[front]), 3)
        elif front == "cli":
            row["load_s"] = round(c.median([r["load_s"] for r in runs]), 3)
            row["process_wall_s"] = round(c.median([r["wall_s"] for r in runs]), 2)
        rows.append(row)
    columns = ["front_end", "decode_tok_s", "x_raw_decode", "prefill_tok_s", "x_raw_prefill", "ttft_s", "x_raw_ttft",
               "load_s"]
    print()
    print(c.table(rows, columns, f"{path.name}: {args.prompt_tokens}-token prompt, "
                                 f"{n} tokens, {args.threads} threads, ctx {args.ctx}, median of {args.reps} rounds"))
    print(f"Model.generate's own cost: {overhead['python_us_per_token']} us per token, "
          f"{overhead['python_share_pct']}% of a {overhead['decode_step_ms']} ms decode step")
    c.save("inference", args.shape, {
        "machine": info, "load": load.summary(), "shape": args.shape, "gguf": str(path), "quant": args.quant,
        "prompt_tokens": args.prompt_tokens, "gen_tokens": n, "threads": args.threads, "ctx": args.ctx,
        "reps": args.reps, "plan": model.plan.to_dict(), "sampling": sampling.to_dict(), "loads_s": loads,
        "server": "skipped" if "server" in args.skip else "run", "summary": rows, "python_overhead": overhead,
        "rounds": rounds})


if __name__ == "__main__":
    main()
