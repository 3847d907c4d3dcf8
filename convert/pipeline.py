"""`convert()`: a Hugging Face Qwen3 checkpoint in, one GGUF per requested type out.

Float types are written directly from the safetensors shards; quantized types are made by llama.cpp's quantizer
from one lossless intermediate (the checkpoint's own dtype) that several quants share. Every output appears
under its final name only when complete; nothing partial survives an error or Ctrl+C.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from localqwen.constants import DEFAULT_QUANT, DEFAULT_REPO
from localqwen.errors import BadRequest
from localqwen.fileio import (
    atomic_output,
    check_writable_target,
    disk_error,
    remove_stale_partials,
    temporary_beside,
)
from localqwen.progress import Bars, progress_bars

from .checkpoint import Checkpoint, load_checkpoint
from .gguf_file import FLOAT_TYPES, FloatGGUF
from .quantize import QUANT_TYPES, quantize

OUTPUT_TYPES = (*FLOAT_TYPES, *QUANT_TYPES)
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "README.md"]


def parse_quants(quants: Sequence[str]) -> list[str]:
    chosen: list[str] = []
    for quant in quants:
        name = quant.strip().lower()
        if name not in OUTPUT_TYPES:
            raise BadRequest(f"unknown quantization {quant!r} (choose from {', '.join(OUTPUT_TYPES)})")
        if name not in chosen:
            chosen.append(name)
    return chosen or [DEFAULT_QUANT]


@contextlib.contextmanager
def source_folder(source: str, *, quiet: bool = False) -> Iterator[Path]:
    """A local folder as is; a hub repo id ("owner/name") downloaded (or found) in the shared HF cache and shown
    under a folder named after the repository, so it converts to the same bytes as `localqwen pull` makes."""
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        yield path
        return
    from localqwen.hub import download_checkpoint

    snapshot = download_checkpoint(source, "main", HUB_FILES, quiet=quiet)
    with tempfile.TemporaryDirectory(prefix="localqwen-source-") as workspace:
        yield linked_folder(Path(workspace), source, snapshot.files)


def linked_folder(workspace: Path, repo: str, files: dict[str, Path]) -> Path:
    """`files` under workspace/<repo name> as links (no copies). gguf-py names the model after its folder, as
    llama.cpp's converter does for a `hf download --local-dir` folder, never after a cache's commit hash."""
    folder = workspace / repo.split("/")[-1]
    try:
        for name, path in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).symlink_to(path.resolve())
    except OSError:  # no symlinks here (some Windows setups): the files' own folder then
        return next(iter(files.values())).parent
    return folder


def intermediate_type(checkpoint: Checkpoint) -> str:
    """The float type that holds the checkpoint's weights without loss."""
    dtypes = {t.dtype for t in checkpoint.tensors.values() if len(t.shape) > 1}
    return {frozenset({"BF16"}): "bf16", frozenset({"F16"}): "f16"}.get(frozenset(dtypes), "f32")


@contextlib.contextmanager
def scratch_file(folder: Path, name: str) -> Iterator[Path]:
    """A temporary file beside the outputs (same disk: quantizing reads it back), always removed."""
    tmp = temporary_beside(folder / name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def convert(source: str = DEFAULT_REPO, quants: Sequence[str] = (DEFAULT_QUANT,), *, outdir: Path | None = None,
            outfile: Path | None = None, force: bool = False, keep_intermediate: bool = False,
            quiet: bool = False) -> list[Path]:
    """Convert `source` (a folder or hub repo id) to GGUF files; returns their paths, in the order asked."""
    quants = parse_quants(quants)
    if outfile is not None and (outdir is not None or len(quants) > 1):
        raise BadRequest("--outfile names a single output: use it with one --quant and without --outdir")
    with source_folder(source, quiet=quiet) as folder:
        checkpoint = load_checkpoint(folder)
        base_type = intermediate_type(checkpoint)
        float_files = {q: FloatGGUF(checkpoint, q) for q in dict.fromkeys(
            [q for q in quants if q in FLOAT_TYPES] + [base_type])}
        namer = float_files[base_type]
        targets = {q: outfile or (outdir or Path.cwd()) / namer.file_name(q) for q in quants}
        keep_base = keep_intermediate and base_type not in quants and any(q in QUANT_TYPES for q in quants)
        if keep_base:
            targets[base_type] = targets[quants[0]].parent / namer.file_name(base_type)
        for target in targets.values():
            check_writable_target(target, force=force)
        for parent in {target.parent for target in targets.values()}:
            remove_stale_partials(parent)  # the next run recovers from one that was killed

        try:
            with progress_bars(quiet) as bars:
                return _write_all(float_files, base_type, targets, quants, bars)
        except OSError as exc:
            raise disk_error(exc, Path(exc.filename) if exc.filename else next(iter(targets.values())).parent) from exc


def _write_all(float_files: dict[str, FloatGGUF], base_type: str, targets: dict[str, Path], quants: list[str],
               bars: Bars) -> list[Path]:
    def write_float(quant: str, path: Path) -> None:
        gguf_file = float_files[quant]
        gguf_file.write(path, bars.bytes(f"writing {quant}", gguf_file.source_bytes))

    for quant in [q for q in targets if q in FLOAT_TYPES]:
        with atomic_output(targets[quant]) as tmp:
            write_float(quant, tmp)
    quantized = [q for q in quants if q in QUANT_TYPES]
    if quantized:
        with contextlib.ExitStack() as stack:
            if base_type in targets:
                base = targets[base_type]
            else:
                base = stack.enter_context(scratch_file(targets[quantized[0]].parent, f"intermediate-{base_type}"))
                write_float(base_type, base)
            for quant in quantized:
                with atomic_output(targets[quant]) as tmp:
                    quantize(base, tmp, quant, bars.steps(f"quantizing {quant}"))
    return [targets[q] for q in quants]
