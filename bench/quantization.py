"""End-to-end HF -> Q4_K_M / Q8_0: `localqwen convert --quant` against llama.cpp's two steps.

    python bench/quantization.py --shape 4b --reps 1

llama.cpp's path is convert_hf_to_gguf.py --outtype bf16, then llama_model_quantize (there is no llama-quantize
binary in llama-cpp-python; `python -m localqwen.convert.quantize SRC DST FTYPE` calls the same C function, with
the same thread count, in a child process). For Q8_0, llama.cpp's converter can also quantize in one step
(its numpy Q8_0 quantizer): that row is included. Paths alternate; page cache dropped before each where allowed.
"""

from __future__ import annotations

import os

import _common as c

from localqwen.convert.quantize import QUANT_TYPES


def paths(quant: str) -> list[str]:
    rows = ["localqwen", "llama.cpp 2-step"]
    return rows + ["llama.cpp 1-step"] if quant == "q8_0" else rows


def run_path(path: str, quant: str, source, folder, python: str, tree) -> dict:
    out = folder / "out.gguf"
    if path == "localqwen":
        steps = [([*c.LOCALQWEN, "convert", str(source), "--quant", quant, "--outfile", str(out), "--quiet"], None)]
    elif path == "llama.cpp 1-step":
        steps = [c.llama_cpp_convert_cmd(python, tree, source, quant, out)]
    else:
        bf16 = folder / "bf16.gguf"
        steps = [c.llama_cpp_convert_cmd(python, tree, source, "bf16", bf16),
                 ([c.PYTHON, "-m", "localqwen.convert.quantize", str(bf16), str(out), str(int(QUANT_TYPES[quant]))],
                  None)]
    results = [c.measure(cmd, env=env, cwd=folder) for cmd, env in steps]
    return {"wall_s": round(sum(r["wall_s"] for r in results), 3),
            "wall_sync_s": round(sum(r["wall_sync_s"] for r in results), 3),
            "peak_rss": max(r["peak_rss"] for r in results), "tree_rss": max(r["tree_rss"] for r in results),
            "steps_s": [r["wall_s"] for r in results], "out_bytes": out.stat().st_size}


def main() -> None:
    p = c.parser(__doc__)
    p.add_argument("--quants", nargs="+", default=["q4_k_m", "q8_0"], choices=["q4_k_m", "q8_0"])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--no-drop-caches", action="store_true")
    args = p.parse_args()
    source = c.checkpoint(args.shape, args.workdir)
    python, tree = c.reference_python(), c.llama_cpp_tree(args.workdir)
    info = c.machine()
    runs: list[dict] = []
    with c.LoadWatch() as load:
        for rep in range(args.reps):
            for quant in args.quants:
                order = paths(quant)
                order = order[rep % len(order):] + order[:rep % len(order)]
                for path in order:
                    with c.scratch(args.workdir, "quantization") as folder:
                        cold = not args.no_drop_caches and c.drop_caches()
                        result = run_path(path, quant, source, folder, python, tree)
                    runs.append({"quant": quant, "path": path, "rep": rep, "cold_cache": cold, **result,
                                 "loadavg": round(os.getloadavg()[0], 2)})
                    print(f"round {rep + 1} {quant:6} {path:17} {result['wall_s']:7.1f} s  "
                          f"peak RSS {c.gb(result['peak_rss']):5.2f} GB  steps {result['steps_s']}", flush=True)
    rows = []
    for quant in args.quants:
        base = c.median([r["wall_s"] for r in runs if r["quant"] == quant and r["path"] == "llama.cpp 2-step"])
        for path in paths(quant):
            mine = [r for r in runs if r["quant"] == quant and r["path"] == path]
            wall = c.median([r["wall_s"] for r in mine])
            rows.append({"quant": quant, "path": path, "wall_s": wall, "x_llama_2step": round(wall / base, 2),
                         "wall_sync_s": c.median([r["wall_sync_s"] for r in mine]),
                         "peak_rss_gb": c.gb(max(r["peak_rss"] for r in mine)),
                         "tree_rss_gb": c.gb(max(r["tree_rss"] for r in mine)), "out_gb": c.gb(mine[0]["out_bytes"])})
    print()
    print(c.table(rows, ["quant", "path", "wall_s", "x_llama_2step", "wall_sync_s", "peak_rss_gb", "tree_rss_gb",
                         "out_gb"], f"HF -> quantized GGUF, {args.shape} shapes, median of {args.reps}"))
    c.save("quantization", args.shape, {"machine": info, "load": load.summary(), "shape": args.shape,
                                        "reps": args.reps, "threads": os.cpu_count(), "summary": rows, "runs": runs})


if __name__ == "__main__":
    main()
