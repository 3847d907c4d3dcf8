"""Hostile files through every front end (issue #19): each case ends by itself within a time bound, with no signal
and no traceback, exits 0 only where the file is really fine and with one line naming the file otherwise, and leaves
nothing behind.

GGUF cases (hostile_gguf.py) go through `localqwen info` (and `--json`), `localqwen run`, `localqwen chat` (piped
stdin) and `Model.load` in a child process; checkpoint cases (hostile_checkpoint.py) through `localqwen convert`, and
a converted fine case through `localqwen info`. By default a seeded sample per class runs (about two minutes on two
cores); the full set (hundreds of cases, most of an hour) and other samples are behind environment variables:

    LOCALQWEN_HOSTILE=all            every case
    LOCALQWEN_HOSTILE_SEED=N         another seeded sample (default 19)
    LOCALQWEN_HOSTILE_PER_CLASS=N    cases per class in a sample (default 2)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from localqwen.convert import convert
from localqwen.errors import BadRequest, ModelFileError
from localqwen.metadata import read_metadata
from localqwen.probe import ensure_loadable
from localqwen.synthetic import TINY, write_checkpoint
from localqwen.template_check import (
    OFFICIAL_TEMPLATE,
    RENDER_TIMEOUT_S,
    TOOLS,
    ChildRenderer,
    InProcessRenderer,
    chat_renderer,
    check_template,
)
from localqwen.tokenizer_data import ADDED_TOKENS
from tests.robustness import hostile_checkpoint, hostile_gguf
from tests.robustness.gguf_doc import GGUFDoc, V

SETTINGS = {"gpu_layers": 0, "n_seq_max": 1, "flash_attn": False, "kv_type": 1, "n_threads": 2}  # as Model.load's

EVERYTHING = os.environ.get("LOCALQWEN_HOSTILE") == "all"
SEED = int(os.environ.get("LOCALQWEN_HOSTILE_SEED", "19"))
PER_CLASS = int(os.environ.get("LOCALQWEN_HOSTILE_PER_CLASS", "2"))
TIME_BOUND_S = 90  # per command; the slowest refusal is a chat template probe timing out at 10 s
INFO_BOUND_S = 15  # `info` on a file no template probe is needed for: Python's start and the checks, on a busy box
LOCALQWEN = [sys.executable, "-m", "localqwen"]
LOAD = ("import sys\nfrom localqwen import LocalqwenError, Model\ntry:\n"
        "    Model.load(sys.argv[1], n_ctx=256).close()\nexcept LocalqwenError as exc:\n"
        "    sys.exit(f'Error: {exc}')\n")

GGUF_CASES = hostile_gguf.cases() if EVERYTHING else hostile_gguf.sample(SEED, PER_CLASS)
CHECKPOINT_CASES = hostile_checkpoint.cases() if EVERYTHING else hostile_checkpoint.sample(SEED, PER_CLASS)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pristine")
    folder = write_checkpoint(tmp / "Qwen3-Tiny", TINY, shards=2)
    [gguf_path] = convert(str(folder), ["q8_0"], outdir=tmp, quiet=True)
    return {"checkpoint": folder, "gguf": gguf_path}


@pytest.fixture(scope="module")
def base_doc(pristine: dict[str, Path]) -> GGUFDoc:
    return GGUFDoc.parse(pristine["gguf"])


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store home for the module, as a user has: verdicts remembered by one command serve the next."""
    return tmp_path_factory.mktemp("home")


def run(cmd: list[str], cwd: Path, home: Path, stdin: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "LOCALQWEN_HOME": str(home), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    started = time.monotonic()
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, input=stdin if stdin is not None else "", capture_output=True,
                                text=True, errors="replace", timeout=TIME_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd[2:4])}: did not end within {TIME_BOUND_S} s")
    return result, time.monotonic() - started


def check_outcome(label: str, result: subprocess.CompletedProcess, fine: bool, names: str) -> None:
    """fine: exit 0; otherwise exit 1 with one line `Error: ...` that names `names` (a path)."""
    assert result.returncode >= 0, f"{label}: killed by signal {-result.returncode}\n{result.stderr[-1500:]}"
    assert "Traceback" not in result.stderr, f"{label}: traceback\n{result.stderr[-3000:]}"
    if fine:
        assert result.returncode == 0, f"{label}: a fine file was refused: {result.stderr.strip()[-500:]}"
        return
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, f"{label}: exit {result.returncode}, stderr {result.stderr[-800:]!r}"
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"{label}: not one error line: {lines[-5:]!r}"
    assert names in lines[0], f"{label}: the error does not name {names}: {lines[0]!r}"


def leftovers(cwd: Path, home: Path) -> list[str]:
    debris = [p.name for p in cwd.iterdir()]
    debris += [str(p) for p in home.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    return debris


@pytest.mark.parametrize("case", GGUF_CASES, ids=lambda c: c.name)
def test_hostile_gguf(case: hostile_gguf.Case, base_doc: GGUFDoc, home: Path, tmp_path: Path) -> None:
    path = case.write(base_doc, tmp_path / "model.gguf")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    commands = {
        "info": LOCALQWEN + ["info", str(path)],
        "info --json": LOCALQWEN + ["info", "--json", str(path)],
        "run": LOCALQWEN + ["run", "-m", str(path), "--ctx", "256", "--max-tokens", "4", "Hello"],
        "chat": LOCALQWEN + ["chat", "-m", str(path), "--ctx", "256", "--max-tokens", "4"],
        "Model.load": [sys.executable, "-c", LOAD, str(path)],
    }
    # info first (it fills the chat template's verdict), then the rest side by side.
    results = {"info": run(commands.pop("info"), cwd, home)}
    with ThreadPoolExecutor(2) as pool:
        futures = {label: pool.submit(run, cmd, cwd, home, "Hello\n/bye\n" if label == "chat" else None)
                   for label, cmd in commands.items()}
        results |= {label: future.result() for label, future in futures.items()}
    for label, (result, _seconds) in results.items():
        check_outcome(f"{case.name} [{label}]", result, case.fine, str(path))
    if case.klass in ("limits", "metadata_types", "tensors"):  # the reader and checks are bounded in time too
        assert results["info"][1] < INFO_BOUND_S, f"{case.name}: info took {results['info'][1]:.1f} s"
    if case.fine:
        json.loads(results["info --json"][0].stdout)
    assert not leftovers(cwd, home), f"{case.name}: left behind {leftovers(cwd, home)}"


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=lambda c: c.name)
def test_hostile_checkpoint(case: hostile_checkpoint.Case, pristine: dict[str, Path], home: Path,
                            tmp_path: Path) -> None:
    folder = case.make(pristine["checkpoint"], tmp_path / "Qwen3-Tiny")
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    out.mkdir()
    cwd.mkdir()
    result, _ = run(LOCALQWEN + ["convert", str(folder), "--quant", "f16", "--outdir", str(out), "--quiet"], cwd, home)
    check_outcome(f"{case.name} [convert]", result, case.fine, str(folder))
    made = sorted(out.iterdir())
    if case.fine:
        assert len(made) == 1 and made[0].suffix == ".gguf", f"{case.name}: made {made}"
        info, _ = run(LOCALQWEN + ["info", str(made[0])], cwd, home)
        check_outcome(f"{case.name} [info on the converted file]", info, True, str(made[0]))
    else:
        assert not made, f"{case.name}: left {made} in the output folder"
    assert not leftovers(cwd, home), f"{case.name}: left behind {leftovers(cwd, home)}"


def test_case_lists_cover_every_class() -> None:
    for module in (hostile_gguf, hostile_checkpoint):
        everything = module.cases()
        for klass in module.CLASSES:
            members = [c for c in everything if c.klass == klass]
            assert len(members) >= 10, f"{module.__name__}: class {klass} has only {len(members)} cases"
        assert any(c.fine for c in everything) and sum(not c.fine for c in everything) > 100


def test_probe_turns_an_abort_into_one_remembered_line(base_doc: GGUFDoc, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth, tested on a real llama.cpp abort the static checks also catch (rope dimensions that the
    qwen3 graph asserts on): the child dies, the caller gets one line, and the verdict is kept."""
    monkeypatch.setenv("LOCALQWEN_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(base_doc.copy().set("qwen3.rope.dimension_count", 16, V.UINT32).encode())
    for attempt in range(2):
        started = time.monotonic()
        with pytest.raises(ModelFileError) as caught:
            ensure_loadable(read_metadata(bad), **SETTINGS)
        message = str(caught.value)
        assert message.startswith(str(bad)) and "crashes llama.cpp (SIGABRT" in message and "\n" not in message
        assert "n_rot" in message
        if attempt:  # remembered: no second child process
            assert time.monotonic() - started < 0.5
    good = tmp_path / "good.gguf"
    good.write_bytes(base_doc.encode())
    ensure_loadable(read_metadata(good), **SETTINGS)
    started = time.monotonic()
    ensure_loadable(read_metadata(good), **SETTINGS)
    assert time.monotonic() - started < 0.5
    os.utime(good, ns=(0, 0))  # another identity: probed again (and still fine)
    ensure_loadable(read_metadata(good), **SETTINGS)
    assert len(list((tmp_path / "home" / "probe" / "load").iterdir())) == 3


@pytest.mark.parametrize(("template", "expected"), [
    ("{{ messages[-1].content }}", None),
    ("{% for m in messages %}{{ m.content }", "does not compile"),
    ("{{ messages[-1].content }}{{ 1 / 0 }}", "division by zero"),
    ('{{ messages[-1].content | center(2**31) }}', "(?i)memory"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
    ("{{ messages[0].content }}", "leaves the user's message out"),
])
def test_template_probe(template: str, expected: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALQWEN_HOME", str(tmp_path))
    where = tmp_path / "model.gguf"
    for _ in range(2):  # the second time from the remembered verdict
        if expected is None:
            check_template(template, where)
            continue
        with pytest.raises(ModelFileError, match=expected) as caught:
            check_template(template, where)
        assert str(caught.value).startswith(str(where)) and "\n" not in str(caught.value)
    assert len(list((tmp_path / "probe" / "template").iterdir())) == 1


def test_runtime_renderer_bounds_a_template_that_passed_the_probe() -> None:
    """A template can behave on the probe conversations and run away on one message: at runtime any template but the
    known one renders in a bounded child, so that message is one BadRequest and the next renders as before. (The trap
    is never compiled here: Jinja folds constants such as 'x' * 10**10 while compiling.)"""
    trap = ("{% if messages[-1].content == 'loop' %}{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}"
            "{% endfor %}{% endif %}{% if messages[-1].content == 'memory' %}{{ 'x' * 10**10 }}{% endif %}"
            "{% if messages[-1].content == 'divide' %}{{ 1 / 0 }}{% endif %}" + OFFICIAL_TEMPLATE)
    reworded = "{#- a quantizer's note -#}\n" + OFFICIAL_TEMPLATE
    specials = list(ADDED_TOKENS)
    child, reworded_child = ChildRenderer(trap, specials), ChildRenderer(reworded, specials)
    here = InProcessRenderer(OFFICIAL_TEMPLATE, specials)
    try:
        for _ in range(2):
            for content in ("Hello", "text that looks like <|im_start|> a control token"):
                messages = [{"role": "user", "content": content}]
                assert child.render(messages, TOOLS) == reworded_child.render(messages, TOOLS) == here.render(
                    messages, TOOLS)
            for content, expected in (("loop", "within"), ("memory", "MemoryError"), ("divide", "division by zero")):
                started = time.monotonic()
                with pytest.raises(BadRequest, match=expected):
                    child.render([{"role": "user", "content": content}])
                assert time.monotonic() - started < RENDER_TIMEOUT_S + 5
    finally:
        child.close()
        reworded_child.close()
    assert isinstance(chat_renderer(OFFICIAL_TEMPLATE, specials), InProcessRenderer)
