"""Memory plan accuracy: localqwen's planned bytes against what llama.cpp allocates, per context and KV type.

    python bench/memory_plan.py --shape 4b

Each configuration loads the GGUF in a fresh process (use_mmap=False, so weights are plain allocations and each
byte is counted once) and captures llama.cpp's "... buffer size = N MiB" log lines through llama_log_set; the
process's RSS growth over the load is reported too. Configurations whose plan exceeds free memory are skipped.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
import subprocess
import sys

import _common as c
import psutil

from localqwen.backend import repacked_types
from localqwen.model import GGML_KV_TYPE_IDS
from localqwen.plan import plan_memory, read_shape

CONFIGS = [(4096, "f16", False), (4096, "f16", True), (4096, "q8_0", True), (4096, "q4_0", True),
           (32768, "f16", False), (32768, "f16", True), (32768, "q8_0", True), (32768, "q4_0", True),
           (131072, "q8_0", True), (131072, "q4_0", True), (262144, "q4_0", True)]
BUFFER_LINE = re.compile(r"^\w+:\s+(\S+)\s+(model|KV|compute|output) buffer size\s*=\s*([\d.]+) MiB", re.M)
KINDS = {"model": "weights_cpu", "KV": "kv_cpu", "compute": "compute_cpu", "output": "output"}


def child(path: str, n_ctx: int, kv_type: str, flash: bool) -> None:
    """Load once, print what llama.cpp logged (MiB per kind) and the RSS growth as JSON."""
    import llama_cpp

    from localqwen.backend import open_llama

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    before = psutil.Process().memory_info().rss
    llama = open_llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_gpu_layers=0, flash_attn=flash,
                       type_k=GGML_KV_TYPE_IDS[kv_type], type_v=GGML_KV_TYPE_IDS[kv_type], use_mmap=False,
                       op_offload=False)
    rss = psutil.Process().memory_info().rss - before
    sizes = dict.fromkeys(KINDS, 0.0)
    for _, kind, mib in BUFFER_LINE.findall("".join(lines)):
        sizes[kind] += float(mib)
    print(json.dumps({"mib": sizes, "rss_growth": rss, "n_ctx": llama.n_ctx()}))
    with contextlib.suppress(Exception):
        llama.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1")
    p = c.parser(__doc__)
    p.add_argument("--quant", default="q4_k_m")
    args = p.parse_args()
    path = c.gguf(args.shape, args.quant, args.workdir)
    shape = read_shape(path)
    info = c.machine()
    rows = []
    with c.LoadWatch() as load:
        for n_ctx, kv_type, flash in CONFIGS:
            plan = plan_memory(shape, n_ctx, kv_type=kv_type, flash_attn=flash, repack_types=repacked_types())
            row = {"n_ctx": n_ctx, "kv_type": kv_type, "flash_attn": flash, "planned_gib": round(plan.total / c.GiB, 3)}
            free = psutil.virtual_memory().available
            if plan.total > 0.85 * free:
                rows.append({**row, "note": f"skipped: {free / c.GiB:.1f} GiB free"})
                print(f"{n_ctx:>7} {kv_type:5} fa={flash:d}: skipped ({plan.total / c.GiB:.1f} GiB planned)",
                      flush=True)
                continue
            done = subprocess.run([c.PYTHON, __file__, "--child", str(path), str(n_ctx), kv_type, str(int(flash))],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({**row, "note": f"load failed: {done.stderr.strip().splitlines()[-1:]}"})
                continue
            got = json.loads(done.stdout.strip().splitlines()[-1])
            measured = sum(got["mib"].values()) * c.MiB
            for kind, field in KINDS.items():
                row[f"{kind}_planned_mib"] = round(getattr(plan, field) / c.MiB, 1)
                row[f"{kind}_measured_mib"] = got["mib"][kind]
            row.update(measured_gib=round(measured / c.GiB, 3), error_pct=round(100 * (plan.total / measured - 1), 2),
                       rss_growth_gib=round(got["rss_growth"] / c.GiB, 3), n_ctx_llama=got["n_ctx"])
            rows.append(row)
            print(f"{n_ctx:>7} {kv_type:5} fa={flash:d}: planned {row['planned_gib']:.3f} GiB, llama.cpp "
                  f"{row['measured_gib']:.3f} GiB ({row['error_pct']:+.2f}%), RSS +{row['rss_growth_gib']:.3f} GiB",
                  flush=True)
    print()
    print(c.table(rows, ["n_ctx", "kv_type", "flash_attn", "planned_gib", "measured_gib", "error_pct",
                         "compute_planned_mib", "compute_measured_mib", "rss_growth_gib", "note"],
                  f"{path.name}: planned vs allocated (CPU, n_batch 512)"))
    c.save("memory_plan", args.shape, {"machine": info, "load": load.summary(), "shape": args.shape,
                                       "gguf": str(path), "rows": rows})


if __name__ == "__main__":
    main()
