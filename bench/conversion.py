"""Conversion HF safetensors -> bf16 GGUF: localqwen against llama.cpp's convert_hf_to_gguf.py and a plain copy.

    python bench/conversion.py --shape 4b --reps 3

The three run alternately (the order rotates each round), each from a cold page cache where the sandbox allows
dropping it. Wall time is the command's; "+sync" adds flushing its writes to disk. Peak RSS: see _common.measure.
The copy (`cp` of the shards) is the disk's limit: a converter cannot beat it by much, only come close.
"""

from __future__ import annotations

import os
from pathlib import Path

import _common as c

TOOLS = ("copy", "localqwen", "llama.cpp")


def command(tool: str, source: Path, out: Path, python: str, tree: Path) -> tuple[list[str], dict | None]:
    if tool == "copy":
        out.mkdir()
        return ["cp", *map(str, sorted(source.glob("*.safetensors"))), str(out)], None
    if tool == "localqwen":
        return [*c.LOCALQWEN, "convert", str(source), "--quant", "bf16", "--outfile", str(out), "--quiet"], None
    return c.llama_cpp_convert_cmd(python, tree, source, "bf16", out)


def main() -> None:
    p = c.parser(__doc__)
    p.add_argument("--reps", type=int, default=3, help="rounds of the three commands (default 3)")
    p.add_argument("--no-drop-caches", action="store_true", help="keep the page cache between runs")
    args = p.parse_args()
    source = c.checkpoint(args.shape, args.workdir)
    python, tree = c.reference_python(), c.llama_cpp_tree(args.workdir)
    info = c.machine()
    runs: list[dict] = []
    with c.LoadWatch() as load:
        for rep in range(args.reps):
            order = TOOLS[rep % 3:] + TOOLS[:rep % 3]
            for tool in order:
                with c.scratch(args.workdir, "conversion") as folder:
                    out = folder / ("shards" if tool == "copy" else "out.gguf")
                    cmd, env = command(tool, source, out, python, tree)
                    cold = not args.no_drop_caches and c.drop_caches()
                    result = c.measure(cmd, env=env, cwd=folder)
                    size = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
                    runs.append({"tool": tool, "rep": rep, "cold_cache": cold, "out_bytes": size, **result,
                                 "loadavg": round(os.getloadavg()[0], 2)})
                    print(f"round {rep + 1} {tool:10} {result['wall_s']:7.1f} s  +sync {result['wall_sync_s']:7.1f} s"
                          f"  peak RSS {c.gb(result['peak_rss']):5.2f} GB", flush=True)
    source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    copy_wall = c.median([r["wall_s"] for r in runs if r["tool"] == "copy"])
    copy_sync = c.median([r["wall_sync_s"] for r in runs if r["tool"] == "copy"])
    rows = []
    for tool in TOOLS:
        mine = [r for r in runs if r["tool"] == tool]
        wall, synced = c.median([r["wall_s"] for r in mine]), c.median([r["wall_sync_s"] for r in mine])
        rows.append({"tool": tool, "wall_s": wall, "wall_sync_s": synced, "x_copy": round(wall / copy_wall, 2),
                     "x_copy_sync": round(synced / copy_sync, 2),
                     "peak_rss_gb": c.gb(max(r["peak_rss"] for r in mine)),
                     "tree_rss_gb": c.gb(max(r["tree_rss"] for r in mine)),
                     "out_gb": c.gb(mine[0]["out_bytes"]), "runs": len(mine)})
    print()
    print(c.table(rows, ["tool", "wall_s", "x_copy", "wall_sync_s", "x_copy_sync", "peak_rss_gb", "tree_rss_gb",
                         "out_gb"], f"HF -> bf16 GGUF, {args.shape} shapes ({c.gb(source_bytes)} GB of shards), "
                                    f"median of {args.reps}"))
    c.save("conversion", args.shape, {"machine": info, "load": load.summary(), "shape": args.shape, "reps": args.reps,
                                      "source_bytes": source_bytes,
                                      "summary": rows, "runs": runs})


if __name__ == "__main__":
    main()
