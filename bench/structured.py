"""The cost of a guaranteed answer shape: answer tokens per second with a JSON schema against the same answer length
without one, for localqwen and for llama.cpp's own llama-server (its `json_schema`), in the same run.

    python bench/structured.py --shape 4b

Both start the answer at once: localqwen with a thinking budget of 0 (the wrap-up, then the answer), llama-server
on the same prompt ending in the wrap-up. Both generate exactly --gen answer tokens (a random-weight model never
closes the JSON array of unbounded strings the schema asks for), in alternating rounds. On random weights the free
choice almost never fits the grammar, so this is the worst case: the grammar filters the whole vocabulary at every
token (a model that follows the format pays only a one-token check).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import _common as c
import httpx
from llama_server import LlamaServer

from localqwen.model import WRAP_UP_TEXT, Model, default_threads

SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 200}
SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
QUESTION = [{"role": "user", "content": "List the planets of the solar system as a JSON array of names."}]


def localqwen_round(model: Model, gen: int, schema: Any, seed: int) -> float:
    """Answer tokens per second as llama-server counts its `predicted_per_second` (tokens after the prompt's
    evaluation over the time they took): from the first answer token to the last, the wrap-up's batch before them
    left out as llama-server's prompt is."""
    first, answer_tokens = None, 0
    for event in model.chat(QUESTION, schema=schema, thinking_budget=0, max_tokens=gen + model.wrap_up_tokens,
                            answer_reserve=0, seed=seed, **SAMPLING):
        if event.kind == "content" and first is None:
            first = time.perf_counter()
        if event.stats is not None:
            answer_tokens = event.stats.content_tokens
    assert first is not None and answer_tokens == gen
    return (answer_tokens - 1) / (time.perf_counter() - first)


def server_round(url: str, prompt: list[int], gen: int, schema: Any, seed: int) -> float:
    body = {"prompt": prompt, "n_predict": gen, "ignore_eos": True, "cache_prompt": False, "seed": seed, **{
        "temperature": SAMPLING["temperature"], "top_p": SAMPLING["top_p"], "top_k": SAMPLING["top_k"],
        "min_p": SAMPLING["min_p"]}}
    if schema is not None:
        body["json_schema"] = schema
    reply = httpx.post(f"{url}/completion", json=body, timeout=3600).json()
    return float(reply["timings"]["predicted_per_second"])


def main() -> None:
    p = c.parser(__doc__)
    p.add_argument("--quant", default="q4_k_m")
    p.add_argument("--gen", type=int, default=48, help="answer tokens per generation")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--reps", type=int, default=4, help="alternating rounds")
    args = p.parse_args()
    path = c.gguf(args.shape, args.quant, args.workdir)
    info = c.machine()
    model = Model.load(path, n_ctx=2048, threads=args.threads)
    prompt = model.tokenize_chat(QUESTION) + model.tokenize(WRAP_UP_TEXT, special=True)
    rounds: list[dict[str, Any]] = []
    server_args = ["-np", "1", "-c", "2048", "-t", str(args.threads), "--min-p", "0", "--no-webui"]
    with c.LoadWatch() as load, LlamaServer.start(path, server_args, log=args.workdir / "llama-server-json.log") as srv:
        for rep in range(args.reps):
            seed = 7 + rep
            row: dict[str, float] = {}
            jobs = [("localqwen_free", localqwen_round, (model, args.gen, None, seed)),
                    ("localqwen_schema", localqwen_round, (model, args.gen, SCHEMA, seed)),
                    ("server_free", server_round, (srv.url, prompt, args.gen, None, seed)),
                    ("server_schema", server_round, (srv.url, prompt, args.gen, SCHEMA, seed))]
            for name, job, job_args in jobs if rep % 2 == 0 else list(reversed(jobs)):
                row[name] = round(job(*job_args), 2)
            rounds.append(row)
            print(row, flush=True)
    model.close()
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    result = {"localqwen_ratio": round(median["localqwen_schema"] / median["localqwen_free"], 3),
              "server_ratio": round(median["server_schema"] / median["server_free"], 3), **median}
    print(c.table([result], list(result), f"answer tokens/s with a JSON schema, {args.shape} {args.quant}"))
    c.save("structured", args.shape, {"machine": info, "load": load.summary(), "settings": {
        **vars(args), "workdir": str(args.workdir)}, "schema": SCHEMA, "rounds": rounds, "result": result})


if __name__ == "__main__":
    main()
