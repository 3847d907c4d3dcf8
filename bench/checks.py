"""The cost of localqwen's checks on a GGUF (issue #19), next to llama.cpp loading the same file.

    python bench/checks.py --shape 4b          # the 4B Q4_K_M (made on first use: ~8 GB of disk, several minutes)
    python bench/checks.py --shape tiny        # a smoke run

Measured in a fresh process per round (nothing cached in memory) with a fresh $LOCALQWEN_HOME (nothing remembered),
page cache warm (the file is read once before the rounds): the header and metadata read; the static checks
(modelcheck + loadcheck) the first time and with the vocabulary's verdict remembered; the chat template check for
the model's own template (known) and for another template (a child process renders the probes), first and remembered;
the child-process load probe, first and remembered; llama.cpp's load with Model.load's settings for a 4096-token
context, and its first decode (which touches every weight page: the probe pays it, and so does a user's first
reply); and Model.load end to end with every verdict remembered (what each later load of the file costs).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c

ROUNDS = 3
N_CTX = 4096
STEPS = ["read_metadata", "static_first", "static_remembered", "template_known", "template_probe_first",
         "template_remembered", "load_probe_first", "load_probe_remembered", "llama_load", "llama_first_decode",
         "model_load_remembered"]


def child(path_text: str) -> None:
    """One round, in this fresh process; prints the seconds per step as JSON."""
    import llama_cpp

    from localqwen.backend import load_model, new_context
    from localqwen.metadata import read_metadata
    from localqwen.model import GGML_KV_TYPE_IDS, Model, default_threads
    from localqwen.modelcheck import check_model
    from localqwen.plan import choose_plan, shape_of
    from localqwen.probe import ensure_loadable
    from localqwen.template_check import check_template

    path = Path(path_text)
    seconds: dict[str, float] = {}

    def timed(step: str, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - a tiny local helper
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[step] = time.perf_counter() - started
        return result

    meta = timed("read_metadata", read_metadata, path)
    timed("static_first", check_model, meta)
    timed("static_remembered", check_model, meta)
    timed("template_known", check_template, meta.chat_template, path)
    other = "{#- a quantizer's note -#}\n" + meta.chat_template
    timed("template_probe_first", check_template, other, path)
    timed("template_remembered", check_template, other, path)
    plan, _ = choose_plan(shape_of(meta), N_CTX, kv_type="f16", flash_attn=None, gpu_layers="auto", max_ctx=None)
    kv_type = GGML_KV_TYPE_IDS[plan.kv_type]
    settings = dict(gpu_layers=plan.gpu_layers, n_seq_max=plan.n_seq, flash_attn=plan.flash_attn, kv_type=kv_type,
                    n_threads=default_threads())
    timed("load_probe_first", ensure_loadable, meta, **settings)
    timed("load_probe_remembered", ensure_loadable, meta, **settings)

    def first_decode(context: Any) -> None:  # a first reply's first batch: llama.cpp touches every weight page
        batch = llama_cpp.llama_batch_init(4, 0, 1)
        for i in range(4):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = 100 + i, i, 1, 0
            batch.logits[i] = i == 3
        batch.n_tokens = 4
        llama_cpp.llama_decode(context.ctx, batch)
        llama_cpp.llama_batch_free(batch)

    # What Model.load asks of llama.cpp, then what the user's first reply makes it do first.
    model = timed("llama_load", load_model, path, gpu_layers=plan.gpu_layers)
    context = new_context(model, n_ctx=plan.n_ctx, n_batch=plan.n_batch, n_ubatch=plan.n_ubatch, n_seq_max=plan.n_seq,
                          flash_attn=plan.flash_attn, kv_type=kv_type, n_threads=default_threads())
    timed("llama_first_decode", first_decode, context)
    context.close()
    model.close()
    timed("model_load_remembered", Model.load, path, n_ctx=N_CTX).close()
    print(json.dumps(seconds))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2])
    p = c.parser(__doc__)
    p.add_argument("--quant", default="q4_k_m")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    args = p.parse_args()
    path = c.gguf(args.shape, args.quant, args.workdir)
    info = c.machine()
    with open(path, "rb") as f:  # page cache warm for every step alike
        while f.read(64 << 20):
            pass
    rounds = []
    with c.LoadWatch() as load:
        for i in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="localqwen-checks-home-") as home:
                done = subprocess.run([c.PYTHON, __file__, "--child", str(path)], capture_output=True, text=True,
                                      env={**os.environ, "LOCALQWEN_HOME": home})
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip()[-2000:])
            rounds.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v:.3f}s" for k, v in rounds[-1].items()), flush=True)
    rows = [{"step": step, "median_s": round(statistics.median(r[step] for r in rounds), 4),
             "min_s": round(min(r[step] for r in rounds), 4), "max_s": round(max(r[step] for r in rounds), 4)}
            for step in STEPS]
    medians = {row["step"]: row["median_s"] for row in rows}
    load_s = medians["llama_load"]
    summary = {
        "every_load_checks_s": round(medians["read_metadata"] + medians["static_remembered"]
                                     + medians["template_remembered"] + medians["load_probe_remembered"], 4),
        "first_time_checks_s": round(medians["read_metadata"] + medians["static_first"]
                                     + medians["template_probe_first"] + medians["load_probe_first"], 4),
        "llama_load_s": load_s,
        "llama_load_and_first_decode_s": round(load_s + medians["llama_first_decode"], 4),
    }
    summary["every_load_share_of_load"] = round(summary["every_load_checks_s"] / load_s, 3)
    summary["first_time_share_of_load"] = round(summary["first_time_checks_s"] / load_s, 3)
    summary["first_time_share_of_load_and_first_decode"] = round(
        summary["first_time_checks_s"] / summary["llama_load_and_first_decode_s"], 3)
    print()
    print(c.table(rows, ["step", "median_s", "min_s", "max_s"], f"{path.name}: the checks next to llama.cpp's load "
                                                               f"({args.rounds} rounds, page cache warm)"))
    print(json.dumps(summary, indent=2))
    c.save("checks", args.shape, {"machine": info, "load": load.summary(), "shape": args.shape, "gguf": str(path),
                                  "size": path.stat().st_size, "n_ctx": N_CTX, "rounds": rounds, "rows": rows,
                                  "summary": summary})


if __name__ == "__main__":
    main()
