"""Write the latest results into docs/benchmarks.md (between its results markers) and draw bench/results/benchmarks.svg.

    python bench/report.py --shape 4b

Reads bench/results/NAME-SHAPE.json for each NAME in RESULTS; missing ones are listed as not run. The text
outside the markers in docs/benchmarks.md is left alone.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import _common as c

DOC = c.REPO / "docs" / "benchmarks.md"
PLOT = c.RESULTS / "benchmarks.svg"
START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS = ("conversion", "quantization", "inference", "parallel", "structured", "checks", "memory_plan", "quality")
COLORS = {"localqwen": "#2b7bba", "llama.cpp": "#e07b39", "copy": "#8a8a8a", "raw": "#e07b39"}


def load(name: str, shape: str) -> dict | None:
    path = c.RESULTS / f"{name}-{shape}.json"
    return json.loads(path.read_text()) if path.exists() else None


def color(label: str) -> str:
    return next((v for k, v in COLORS.items() if label.startswith(k)), COLORS["localqwen"])


# --- the plot: horizontal bar panels, plain SVG --------------------------------------------------------------

def panel(title: str, bars: list[tuple[str, float, str]], unit: str, y: int, ref: float | None = None,
          ref_label: str = "") -> tuple[list[str], int]:
    """One panel of labelled bars at height y; returns its SVG elements and the next free y."""
    left, width, bar_h = 250, 430, 20
    top = max((v for _, v, _ in bars), default=1) * 1.15 or 1
    if ref:
        top = max(top, ref * 1.15)
    out = [f'<text x="10" y="{y + 16}" font-weight="bold">{escape(title)}</text>']
    y += 26
    for label, value, note in bars:
        w = max(1.0, width * value / top)
        out += [f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{escape(label)}</text>',
                f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color(label)}"/>',
                f'<text x="{left + w + 6:.1f}" y="{y + 15}">{escape(f"{value:.3g} {unit} {note}".strip())}</text>']
        y += bar_h + 6
    if ref:
        x = left + width * ref / top
        out += [f'<line x1="{x:.1f}" y1="{y - (bar_h + 6) * len(bars) - 4}" x2="{x:.1f}" y2="{y}" stroke="#333" '
                f'stroke-dasharray="4 3"/>', f'<text x="{x + 4:.1f}" y="{y + 12}" font-size="11">{escape(ref_label)}'
                                                f'</text>']
        y += 14
    return out, y + 18


def plot(shape: str, results: dict[str, dict | None]) -> bool:
    parts: list[str] = []
    y = 10
    if conv := results["conversion"]:
        rows = conv["summary"]
        copy = next(r["wall_s"] for r in rows if r["tool"] == "copy")
        bars = [(r["tool"], r["wall_s"], f"({r['x_copy']}x copy)") for r in rows]
        elems, y = panel(f"HF -> bf16 GGUF: wall time ({shape}, lower is better)", bars, "s", y, copy * 1.2,
                         "1.2x copy (target)")
        parts += elems
        elems, y = panel("HF -> bf16 GGUF: peak RSS", [(r["tool"], r["peak_rss_gb"], "") for r in rows], "GB", y,
                         1.0, "1 GB (target)")
        parts += elems
    if quant := results["quantization"]:
        bars = [(f"{r['path']} {r['quant']}", r["wall_s"], "") for r in quant["summary"]]
        elems, y = panel(f"HF -> quantized GGUF: wall time ({shape})", bars, "s", y)
        parts += elems
    if inf := results["inference"]:
        rows = [r for r in inf["summary"] if "decode_tok_s" in r]
        bars = [(r["front_end"].replace("localqwen ", ""), r["x_raw_decode"], f"({r['decode_tok_s']} tok/s)")
                for r in rows]
        elems, y = panel(f"Decode speed relative to raw llama.cpp ({shape}, higher is better)", bars, "x", y, 0.98,
                         "0.98x (target)")
        parts += elems
        bars = [(r["front_end"].replace("localqwen ", ""), r["x_raw_prefill"], f"({r['prefill_tok_s']} tok/s)")
                for r in rows]
        elems, y = panel("Prompt processing relative to raw llama.cpp", bars, "x", y, 0.98, "0.98x")
        parts += elems
    if par := results["parallel"]:
        bars = [bar for r in par["streams"] for bar in (
            (f"localqwen, {r['streams']} streams", r["localqwen_tok_s"], f"({r['ratio']}x llama-server)"),
            (f"llama.cpp llama-server -np {r['streams']}", r["server_tok_s"], ""))]
        elems, y = panel(f"Generated tokens/s, all streams together ({shape}, higher is better)", bars, "tok/s", y)
        parts += elems
    if st := results["structured"]:
        r = st["result"]
        bars = [("localqwen, free answer", r["localqwen_free"], ""),
                ("localqwen, JSON schema", r["localqwen_schema"], f"({r['localqwen_ratio']}x free)"),
                ("llama.cpp llama-server, free", r["server_free"], ""),
                ("llama.cpp llama-server, json_schema", r["server_schema"], f"({r['server_ratio']}x free)")]
        elems, y = panel(f"Answer tokens/s with and without a schema ({shape})", bars, "tok/s", y)
        parts += elems
    if not parts:
        return False
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="900" height="{y}" font-family="sans-serif" '
           f'font-size="13"><rect width="100%" height="100%" fill="white"/>', *parts, "</svg>"]
    PLOT.write_text("\n".join(svg) + "\n", encoding="utf-8")
    return True


# --- the Markdown --------------------------------------------------------------------------------------------

def machine_line(data: dict) -> str:
    m, load = data["machine"], data.get("load", {})
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; llama-cpp-python "
            f"{m['llama_cpp_python']}, localqwen {m['localqwen_commit']}; {m['date']}; load average during the run "
            f"{load.get('loadavg_mean', '?')} (max {load.get('loadavg_max', '?')}) on {m['threads']} CPUs, other "
            f"processes took {load.get('others_cpu_pct', '?')}% of the CPU")


def section(title: str, data: dict | None, rows_key: str, columns: list[str], extra: str = "") -> str:
    if data is None:
        return f"### {title}\n\nNot run yet for these shapes.\n"
    rows = data[rows_key]
    return f"### {title}\n\n{machine_line(data)}.{extra}\n\n{c.table(rows, columns)}\n"


def python_overhead_line(inf: dict | None) -> str:
    cost = (inf or {}).get("python_overhead")
    if not cost:
        return ""
    return (f"\nModel.generate's own cost, measured directly (its wall time minus the time inside llama.cpp's decode "
            f"and sampling calls, {cost['completion_tokens']} tokens): **{cost['python_us_per_token']} us per token, "
            f"{cost['python_share_pct']}% of a {cost['decode_step_ms']} ms decode step**. That is all "
            "the API can lose to the raw loop; the ratios above move by more than that from one run to the next "
            "on this machine.\n")


def prompt_cache_line(par: dict | None) -> str:
    cache = (par or {}).get("prompt_cache")
    if not cache:
        return ""
    return (f"\nPrompt cache: a {cache['prompt_tokens']}-token prompt evaluated in {cache['evaluate']['ttft_s']} s; "
            f"in a newly loaded model, restored from the disk cache in {cache['restore']['ttft_s']} s "
            f"(**{cache['speedup']}x**; {cache['restore']['cached']} tokens cached, state "
            f"{c.gb(cache['state_bytes'])} GB).\n")


def markdown(shape: str, results: dict[str, dict | None], plotted: bool) -> str:
    conv, quant, inf, par, st, checks, plan, qual = (results[k] for k in RESULTS)
    out = [f"Results for the **{shape}** shapes, written by `python bench/report.py --shape {shape}` from "
           f"`bench/results/*-{shape}.json`."]
    if plotted:
        out.append(f"\n![benchmark plot](../bench/results/{PLOT.name})\n\nPlot: `bench/results/{PLOT.name}`.\n")
    out.append(section("Conversion: HF safetensors -> bf16 GGUF", conv, "summary",
                       ["tool", "wall_s", "x_copy", "wall_sync_s", "x_copy_sync", "peak_rss_gb", "tree_rss_gb",
                        "out_gb"],
                       f" Median of {conv['reps']} alternating rounds, page cache dropped before each run: "
                       f"{all(r['cold_cache'] for r in conv['runs'])}." if conv else ""))
    out.append(section("Quantization: HF -> Q4_K_M / Q8_0, end to end", quant, "summary",
                       ["quant", "path", "wall_s", "x_llama_2step", "peak_rss_gb", "tree_rss_gb", "out_gb"],
                       f" {quant['reps']} round(s), {quant['threads']} quantizer threads." if quant else ""))
    out.append(section("Inference", inf, "summary",
                       ["front_end", "decode_tok_s", "x_raw_decode", "prefill_tok_s", "x_raw_prefill", "ttft_s",
                        "x_raw_ttft", "load_s"],
                       f" `{Path(inf['gguf']).name}`, {inf['prompt_tokens']}-token prompt, {inf['gen_tokens']} "
                       f"generated tokens, {inf['threads']} threads, n_ctx {inf['ctx']}, median of {inf['reps']} "
                       "alternating rounds; ratios are taken within a round (x > 1: faster than raw)." if inf else "")
               + python_overhead_line(inf))
    out.append(section("Many streams at once: continuous batching against llama-server", par, "streams",
                       ["streams", "localqwen_tok_s", "server_tok_s", "ratio", "localqwen_vs_one",
                        "localqwen_decode_tok_s", "server_decode_tok_s", "localqwen_decode_vs_one",
                        "server_decode_vs_one", "localqwen_ttft_s", "server_ttft_s"],
                       f" {par['settings']['prompt_tokens']}-token prompts (no shared prefix), "
                       f"{par['settings']['gen']} tokens per stream, {par['settings']['threads']} threads, median of "
                       f"{par['settings']['reps']} alternating rounds; llama-server at its defaults with `-np N`. "
                       "`*_tok_s`: all "
                       "generated tokens over the wall time, prompts included; `*_decode_tok_s`: tokens per second "
                       "once every stream is generating."
                       if par else "") + prompt_cache_line(par))
    out.append(section("Guaranteed answer shape: the cost of a JSON schema", st, "rounds",
                       ["localqwen_free", "localqwen_schema", "server_free", "server_schema"],
                       f" Answer tokens/s, {st['settings']['gen']} tokens, worst case (random weights: the grammar "
                       f"filters every token). Medians: localqwen **{st['result']['localqwen_ratio']}x** its free "
                       f"speed with the schema, llama-server {st['result']['server_ratio']}x." if st else ""))
    out.append(section("The checks on untrusted files", checks, "rows", ["step", "median_s", "min_s", "max_s"],
                       f" `{Path(checks['gguf']).name}`; every load of a known file pays "
                       f"{checks['summary']['every_load_checks_s']} s of checks "
                       f"({checks['summary']['every_load_share_of_load']:.0%} of llama.cpp's load); the first load of "
                       f"a new file {checks['summary']['first_time_checks_s']} s, once." if checks else ""))
    out.append(section("Memory plan: planned vs allocated", plan, "rows",
                       ["n_ctx", "kv_type", "flash_attn", "planned_gib", "measured_gib", "error_pct",
                        "model_planned_mib", "model_measured_mib", "compute_planned_mib", "compute_measured_mib",
                        "rss_growth_gib", "note"],
                       f" `{Path(plan['gguf']).name}`, loaded as localqwen loads it (`open_llama`, use_mmap=False)."
                       if plan else ""))
    out.append(section("Quality against bf16 (random weights: mechanics only)", qual, "summary",
                       ["quant", "tokens_scored", "kld_mean", "kld_unc", "kld_median", "kld_99", "kld_max",
                        "same_top_pct", "rms_dp_pct", "ppl_q", "ppl_base", "ln_ppl_ratio"],
                       f" {qual['chunks']} chunks of {qual['ctx']} tokens, base `{qual['base']}`." if qual else ""))
    return "\n".join(out)


def main() -> None:
    p = c.parser(__doc__)
    args = p.parse_args()
    results = {name: load(name, args.shape) for name in RESULTS}
    plotted = plot(args.shape, results)
    body = markdown(args.shape, results, plotted)
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n## Results\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(f"{head}{START}\n{body}\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")
    print(f"wrote {DOC.relative_to(c.REPO)}" + (f" and {PLOT.relative_to(c.REPO)}" if plotted else ""))


if __name__ == "__main__":
    main()
