"""llama.cpp's own `llama-server` and `llama-bench`, built from the sources vendored in llama-cpp-python's sdist.

    python bench/llama_server.py build                         # once: about 5 minutes on 2 cores, then cached
    python bench/llama_server.py serve MODEL.gguf -- -np 4 -t 2  # on a free loopback port until Ctrl+C

The peers' numbers only compare with ours when they come from the same llama.cpp: the sdist of the installed
llama-cpp-python version (its `vendor/llama.cpp`, found or fetched by `_common.llama_cpp_tree`), built with the
same native CPU flags as pip's build of the wheel. pip's build leaves the server out, hence this script. The build
lives in the user cache folder (`~/.cache/localqwen/llama.cpp/VERSION/`, or `$LOCALQWEN_LLAMA_CPP_CACHE/VERSION/`),
shared by every checkout of the repository, and is redone only when the flags change.

As a module (bench/ on sys.path): `binaries()` builds on first use and returns the paths; `LlamaServer.start(...)`
runs a server and waits until `/health` says ok; `stop()` (or leaving the `with` block) ends it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import _common as c
import httpx
import platformdirs

TOOLS = ("llama-server", "llama-bench")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",              # this CPU's instruction set, as pip's build of the wheel does
    "-DBUILD_SHARED_LIBS=OFF",       # self-contained binaries: they can be copied elsewhere and still run
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",          # the web UI needs npm ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",   # ... or a download from a Hugging Face bucket: the server runs without it
    "-DLLAMA_OPENSSL=OFF",           # loopback only; no HTTPS model downloads (this version has no curl option)
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
# Printed by llama-server once the model is loaded and the port is bound (tools/server/server.cpp).
LISTENING = re.compile(r"listening on (http://\S+)")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def cache_dir() -> Path:
    root = os.environ.get("LOCALQWEN_LLAMA_CPP_CACHE") or platformdirs.user_cache_dir("localqwen") + "/llama.cpp"
    return Path(root) / c.LLAMA_CPP_VERSION


def binaries() -> dict[str, Path]:
    """{tool name: path} of the built tools; builds them first when missing or built with other flags."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    build, stamp = folder / "build", folder / "build.json"
    paths = {tool: build / "bin" / tool for tool in TOOLS}
    # One build at a time: several checkouts on this machine share the folder.
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = json.loads(stamp.read_text()) if stamp.exists() else {}
        if built.get("cmake_flags") != list(CMAKE_FLAGS) or not all(p.is_file() for p in paths.values()):
            stamp.unlink(missing_ok=True)
            stamp.write_text(json.dumps(_build(c.llama_cpp_tree(folder), build), indent=2) + "\n")
    return paths


def _build(tree: Path, build: Path) -> dict:
    if not shutil.which("cmake"):
        sys.exit("building llama-server needs cmake and a C++ compiler (apt-get install cmake g++)")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = str(os.cpu_count() or 1)
    log = build.parent / "build.log"
    print(f"building {', '.join(TOOLS)} from {tree} into {build} ({jobs} jobs, log {log}) ...", file=sys.stderr,
          flush=True)
    started = time.perf_counter()
    with open(log, "wb") as out:
        for step in (["cmake", "-S", str(tree), "-B", str(build), *generator, *CMAKE_FLAGS],
                     ["cmake", "--build", str(build), "--parallel", jobs, "--target", *TOOLS]):
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                sys.exit(f"{' '.join(step)} failed (log {log}):\n{tail}")
    seconds = round(time.perf_counter() - started, 1)
    print(f"built in {seconds} s", file=sys.stderr)
    return {"llama_cpp_python": c.LLAMA_CPP_VERSION, "source": str(tree), "cmake_flags": list(CMAKE_FLAGS),
            "jobs": int(jobs), "build_s": seconds, "cpu": c.machine()["cpu"]}


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it ends, so no server outlives a killed run."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class LlamaServer:
    """A running llama-server child process and its base URL (http://127.0.0.1:PORT, no /v1)."""

    process: subprocess.Popen
    url: str
    log: Path

    @classmethod
    def start(cls, model: Path, args: Sequence[str] = (), *, log: Path, timeout: float = 300) -> LlamaServer:
        """Serve `model` with extra llama-server `args` on a free loopback port; return once /health is ok.

        The port is 0 (the kernel picks a free one; no race with other processes) and read back from the log.
        stdout and stderr go to `log`; a server that exits or does not come up raises with the log's tail.
        """
        command = [str(binaries()["llama-server"]), "-m", str(model), "--host", "127.0.0.1", "--port", "0", *args]
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=_die_with_parent)
        server = cls(process, "", log)
        deadline = time.monotonic() + timeout
        try:
            while not server.url:
                server._check_alive(deadline)
                if found := LISTENING.search(log.read_text(errors="replace")):
                    server.url = found.group(1)
                time.sleep(0.1)
            while httpx.get(f"{server.url}/health", timeout=5).json().get("status") != "ok":
                server._check_alive(deadline)
                time.sleep(0.1)
        except BaseException:
            server.stop()
            raise
        return server

    def _check_alive(self, deadline: float) -> None:
        if self.process.poll() is not None:
            problem = f"exited with code {self.process.returncode}"
        elif time.monotonic() > deadline:
            problem = "did not come up in time"
        else:
            return
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"llama-server {problem} (log {self.log}):\n{tail}")

    def stop(self) -> None:
        """SIGTERM (llama-server then frees its slots and exits), SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build (or find) llama-server and llama-bench; print their paths")
    serve = sub.add_parser("serve", help="serve a GGUF on a free loopback port until Ctrl+C")
    serve.add_argument("--log", type=Path, default=Path("llama-server.log"), help="the server's output")
    serve.add_argument("model", type=Path)
    serve.add_argument("args", nargs=argparse.REMAINDER, help="more llama-server arguments (after an optional --)")
    options = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # `kill` too stops the server (leaving the `with`)
    if options.command == "build":
        for tool, path in binaries().items():
            print(f"{tool}: {path}")
        print(f"build record: {cache_dir() / 'build.json'}")
        return
    if not options.model.is_file():
        sys.exit(f"{options.model}: no such GGUF file")
    extra = options.args[1:] if options.args[:1] == ["--"] else options.args
    try:
        server = LlamaServer.start(options.model, extra, log=options.log)
    except RuntimeError as e:
        sys.exit(str(e))
    with server:
        print(f"{server.url} (log {server.log}); Ctrl+C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.process.wait()


if __name__ == "__main__":
    main()
