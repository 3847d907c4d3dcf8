"""The exceptions localqwen raises for expected failures: each carries a one-line message.

Apps catch `LocalqwenError` (or a subclass); the CLI turns every one into `Error: <message>` and a non-zero exit
(localqwen.cli), and the server maps each kind to its HTTP status (localqwen.server). Nothing here imports a CLI
or web framework.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BadRequest", "CheckpointError", "ContextOverflow", "HubError", "LocalqwenError", "ModelBusy",
           "ModelFileError", "RemoteError"]


class LocalqwenError(Exception):
    """An expected failure (bad input, missing file, full disk), with a one-line message naming what failed."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        self.message = f"{path}: {message}" if path is not None else message
        super().__init__(self.message)


class ModelFileError(LocalqwenError):
    """A GGUF file that cannot be used: missing, damaged, not a Qwen3 model, or beyond what llama.cpp accepts."""


class CheckpointError(LocalqwenError):
    """A Hugging Face checkpoint folder that cannot be converted."""


class HubError(LocalqwenError):
    """Downloading from the hub, or verifying what was downloaded against the lock, failed."""


class BadRequest(LocalqwenError):
    """Arguments to a generation (messages, sampling, limits, settings) that cannot be used as given."""


class ContextOverflow(BadRequest):
    """The prompt does not fit the context."""

    def __init__(self, prompt_tokens: int, n_ctx: int) -> None:
        self.prompt_tokens, self.n_ctx = prompt_tokens, n_ctx
        super().__init__(f"the prompt is {prompt_tokens} tokens, {prompt_tokens - n_ctx + 1} more than the context "
                         f"of {n_ctx} allows")


class ModelBusy(LocalqwenError):
    """Every generation slot is taken and the caller chose not to wait."""


class RemoteError(LocalqwenError):
    """A remote endpoint (localqwen.remote) could not be reached, timed out, or answered with an HTTP error; the
    message names the endpoint (and the status). `detail`: what went wrong, in the endpoint's words when it answered;
    `status`: its HTTP status (None when no answer came); `code`: the error code it gave, if any."""

    def __init__(self, detail: str, endpoint: str, status: int | None = None, code: str | None = None) -> None:
        self.endpoint, self.detail, self.status, self.code = endpoint, detail, status, code
        super().__init__(detail if status is None else f"HTTP {status}: {detail}", endpoint)
