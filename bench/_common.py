"""Shared helpers for the bench scripts: shapes, the work folder, timed subprocesses, tables and result files.

Benchmarks need big files (an 8 GB checkpoint, several GGUFs); they live in a work folder outside the repository
($LOCALQWEN_BENCH_DIR or /tmp/localqwen-bench) and are made on first use. Results go to bench/results/*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from localqwen.synthetic import QWEN3_0_6B, QWEN3_4B, QwenShape, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
LOCALQWEN = [PYTHON, "-m", "localqwen"]
# The smallest shape on which llama.cpp's K-quants really apply (rows a multiple of 256): for smoke runs.
TINY = QwenShape(256, 512, 2, 4, 2, 64)
SHAPES = {"4b": QWEN3_4B, "0.6b": QWEN3_0_6B, "tiny": TINY}
# Folder names as on the hub: the converters name their outputs after them.
MODEL_NAMES = {"4b": "Qwen3-4B-Thinking-2507", "0.6b": "Qwen3-0.6B-Synthetic", "tiny": "Qwen3-Tiny-Synthetic"}
# The text the quality and inference benchmarks read: the model card and config the project started from.
SEEDS = REPO.parent / "shared" / "seeds"
# The installed llama-cpp-python: its sdist's vendor/llama.cpp is the llama.cpp localqwen runs on.
LLAMA_CPP_VERSION = metadata.version("llama-cpp-python")
GiB, MiB = 1 << 30, 1 << 20


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="0.6b",
                   help="checkpoint shape (default 0.6b; 4b is the real one)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("LOCALQWEN_BENCH_DIR", "/tmp/localqwen-bench")),
                   help="where checkpoints and GGUFs are kept (default $LOCALQWEN_BENCH_DIR or /tmp/localqwen-bench)")
    return p


# --- inputs ----------------------------------------------------------------------------------------------------

def checkpoint(shape: str, workdir: Path) -> Path:
    """The synthetic checkpoint of `shape` (bf16, 3 shards, real tokenizer), written on first use."""
    folder = workdir / "checkpoints" / shape / MODEL_NAMES[shape]
    done = folder.parent / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"writing the {shape} checkpoint to {folder} ...", file=sys.stderr, flush=True)
        write_checkpoint(folder, SHAPES[shape], seed=0, shards=3)
        done.touch()
    return folder


def gguf(shape: str, quant: str, workdir: Path) -> Path:
    """localqwen's GGUF of the synthetic checkpoint, converted on first use."""
    return ggufs(shape, [quant], workdir)[0]


def ggufs(shape: str, quants: Sequence[str], workdir: Path) -> list[Path]:
    """Several GGUFs of the synthetic checkpoint; the missing ones are made in one conversion (one intermediate)."""
    from localqwen.convert import convert

    paths = [workdir / "gguf" / shape / f"{MODEL_NAMES[shape]}-{q.upper()}.gguf" for q in quants]
    missing = [q for q, path in zip(quants, paths, strict=True) if not path.exists()]
    if missing:
        staging = workdir / "gguf" / shape / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        print(f"converting {shape} to {', '.join(missing)} ...", file=sys.stderr, flush=True)
        made = convert(str(checkpoint(shape, workdir)), missing, outdir=staging, quiet=True)
        for quant, path in zip(missing, made, strict=True):
            Path(path).rename(paths[quants.index(quant)])
        shutil.rmtree(staging)
    return paths


def corpus() -> str:
    """Plain English and code-ish text available offline: the model card and the model's config/template."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(SEEDS.glob("*.txt")))


def llama_cpp_tree(workdir: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (its converter and tools), fetched with pip once."""
    sdist = f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    for candidate in (os.environ.get("LLAMA_CPP_DIR"), f"/tmp/sdist/{sdist}/vendor/llama.cpp",
                      workdir / sdist / "vendor" / "llama.cpp"):
        if candidate and (Path(candidate) / "convert_hf_to_gguf.py").is_file():
            return Path(candidate)
    subprocess.run([PYTHON, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(workdir)], check=True)
    shutil.unpack_archive(workdir / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz", workdir)
    return workdir / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"


def reference_python() -> str:
    """A Python with torch (CPU) + transformers for llama.cpp's convert_hf_to_gguf.py (see bench/README.md)."""
    python = os.environ.get("LOCALQWEN_REFERENCE_PYTHON", "/tmp/refvenv/bin/python")
    probe = subprocess.run([python, "-c", "import torch, transformers"], capture_output=True)
    if probe.returncode != 0:
        sys.exit(f"{python} cannot import torch and transformers: set LOCALQWEN_REFERENCE_PYTHON (bench/README.md)")
    return python


def llama_cpp_convert_cmd(python: str, tree: Path, source: Path, outtype: str, outfile: Path) -> tuple[list[str], dict]:
    """llama.cpp's own converter, with the sdist's gguf-py (not the installed gguf) and no network."""
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [python, str(tree / "convert_hf_to_gguf.py"), str(source), "--outtype", outtype, "--outfile", str(outfile)]
    return cmd, env


# --- measuring -------------------------------------------------------------------------------------------------

def drop_caches() -> bool:
    """Empty the page cache so every run reads from disk (needs root; False where the sandbox forbids it)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def measure(cmd: Sequence[str], env: dict | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run cmd; wall time, time to flush its writes (sync), and peak RSS.

    peak_rss: the largest single process of the tree (wait4's ru_maxrss, which covers children the command waited
    for). tree_rss: the sum over the process tree, sampled every 50 ms (catches a parent and child alive together).
    """
    started = time.perf_counter()
    child = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = psutil.Process(child.pid)
    tree_peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal tree_peak
        while not stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                tree_peak = max(tree_peak, _tree_rss(proc))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = child.stderr.read() if child.stderr else b""
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    os.sync()
    synced = time.perf_counter() - started
    if child.returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed with exit {child.returncode}:\n" + "\n".join(tail))
    return {"wall_s": round(wall, 3), "wall_sync_s": round(synced, 3), "peak_rss": usage.ru_maxrss * 1024,
            "tree_rss": max(tree_peak, usage.ru_maxrss * 1024)}


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- reporting -------------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """Where the numbers came from, and how busy the machine was while they were taken."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cores": psutil.cpu_count(logical=False), "threads": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / GiB, 1), "os": platform.platform(),
            "python": platform.python_version(), "llama_cpp_python": metadata.version("llama-cpp-python"),
            "localqwen_commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all processes, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system  # children: those already waited for


class LoadWatch:
    """How busy the machine was while a benchmark ran: load average, and the CPU other processes took."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(5):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadWatch:
        self._start = (time.monotonic(), _busy_seconds(), _own_seconds())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        wall, busy, own = (b - a for a, b in zip(self._start, (time.monotonic(), _busy_seconds(), _own_seconds()),
                                                 strict=True))
        self.others_pct = round(100 * max(0.0, busy - own) / (wall * (os.cpu_count() or 1)), 1)

    def summary(self) -> dict[str, float]:
        s = self.samples or [os.getloadavg()[0]]
        return {"loadavg_mean": round(statistics.mean(s), 2), "loadavg_max": round(max(s), 2),
                "others_cpu_pct": getattr(self, "others_pct", float("nan"))}


def table(rows: list[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """A Markdown table (also readable on a terminal) of the given columns."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return (f"{title}\n\n" if title else "") + "\n".join(lines)


def save(name: str, shape: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{shape}.json"
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path.relative_to(REPO)}")
    return path


@contextlib.contextmanager
def scratch(workdir: Path, name: str) -> Iterator[Path]:
    """An empty folder under the work folder, removed afterwards (outputs must not fill the disk)."""
    folder = workdir / "scratch" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def gb(n: float) -> float:
    return round(n / 1e9, 2)
